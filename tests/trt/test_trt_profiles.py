"""--profile parsing, per-component min/opt/max derivation, profile selection and bucketing (no TensorRT)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sdrt.export.trt_profiles import (
    ComponentProfile,
    InputRange,
    ProfileSpec,
    Span,
    bucket_for,
    component_profiles,
    derive_profile,
    parse_profile,
    parse_profiles,
    select_profile,
)

from sdrt.errors import SdrtError

TEXT = [{"name": "input_ids", "shape": ["batch", 77]}]
UNET = [{"name": "sample", "shape": ["batch", 4, "latent_height", "latent_width"]},
        {"name": "timestep", "shape": ["batch"]},
        {"name": "encoder_hidden_states", "shape": ["batch", 77, 768]}]
UNET_XL = UNET + [{"name": "text_embeds", "shape": ["batch", 1280]}, {"name": "time_ids", "shape": ["batch", 6]}]
VAE_DEC = [{"name": "latent", "shape": ["batch", 4, "latent_height", "latent_width"]}]
VAE_ENC = [{"name": "image", "shape": ["batch", 3, "height", "width"]}]


@pytest.mark.parametrize("text,h,w,b", [
    ("512x512@1", (512,) * 3, (512,) * 3, (1, 1, 1)),
    ("768x1024@1-4", (768,) * 3, (1024,) * 3, (1, 1, 4)),            # MIN-MAX: tuned for MIN
    ("512-768-1024x512-1024@1-2-4", (512, 768, 1024), (512, 512, 1024), (1, 2, 4)),
    ("64x64", (64,) * 3, (64,) * 3, (1, 1, 1)),                     # batch defaults to 1
    (" 512X512@2 ", (512,) * 3, (512,) * 3, (2, 2, 2)),
])
def test_parse_profile(text, h, w, b):
    spec = parse_profile(text)
    assert (spec.height, spec.width, spec.batch) == (Span(*h), Span(*w), Span(*b))
    assert parse_profile(str(spec)) == spec  # str() is the canonical spelling


@pytest.mark.parametrize("text,fragment", [
    ("512", "expected HxW"), ("512x", "expected HxW"), ("512x512@", "expected HxW"), ("axb", "expected HxW"),
    ("512x512@1-2-3-4", "expected HxW"), ("512*512", "expected HxW"),
    ("512x512@0", "MIN <= OPT <= MAX"), ("512x512@4-1", "MIN <= OPT <= MAX"), ("1024-512x512", "MIN <= OPT"),
    ("500x512", "multiples of 8"), ("512x512-516", "multiples of 8"),
])
def test_bad_profiles_are_one_line_errors(text, fragment):
    with pytest.raises(SdrtError, match=fragment) as e:
        parse_profile(text)
    assert "\n" not in str(e.value)


def test_parse_profiles_default_and_duplicates():
    assert [str(s) for s in parse_profiles(None, 64)] == ["64x64@1-4"]
    assert [str(s) for s in parse_profiles(["512x512@1", "512x512@1", "768x768"], 512)] == ["512x512@1",
                                                                                          "768x768@1"]


def test_unet_batch_doubles_with_cfg_and_latent_is_an_eighth():
    p = derive_profile("unet", UNET, parse_profile("512x768@1-4"), cfg=True)
    assert p.inputs["sample"] == InputRange((1, 4, 64, 96), (2, 4, 64, 96), (8, 4, 64, 96))
    assert p.inputs["timestep"] == InputRange((1,), (2,), (8,))
    assert p.inputs["encoder_hidden_states"] == InputRange((1, 77, 768), (2, 77, 768), (8, 77, 768))
    nocfg = derive_profile("unet", UNET, parse_profile("512x768@1-4"), cfg=False)
    assert nocfg.inputs["sample"] == InputRange((1, 4, 64, 96), (1, 4, 64, 96), (4, 4, 64, 96))


def test_sdxl_unet_extra_inputs_follow_the_batch():
    p = derive_profile("unet", UNET_XL, parse_profile("1024x1024@1-2"), cfg=True)
    assert p.inputs["text_embeds"] == InputRange((1, 1280), (2, 1280), (4, 1280))
    assert p.inputs["time_ids"] == InputRange((1, 6), (2, 6), (4, 6))


def test_text_encoder_and_vae_profiles():
    spec = parse_profile("512-768-1024x512@1-2-3")
    # the text encoder serves one call per prompt set or one concatenated [uncond; cond] call
    assert derive_profile("text_encoder_2", TEXT, spec, True).inputs["input_ids"] == InputRange((1, 77), (2, 77),
                                                                                                (6, 77))
    assert derive_profile("vae_decoder", VAE_DEC, spec, True).inputs["latent"] == InputRange(
        (1, 4, 64, 64), (2, 4, 96, 64), (3, 4, 128, 64))
    assert derive_profile("vae_encoder", VAE_ENC, spec, True).inputs["image"] == InputRange(
        (1, 3, 512, 512), (2, 3, 768, 512), (3, 3, 1024, 512))


def test_unknown_dynamic_axis_is_named():
    with pytest.raises(SdrtError, match="unet.sample: dynamic axis 'frames'"):
        derive_profile("unet", [{"name": "sample", "shape": ["batch", "frames", 4]}], parse_profile("64x64"), True)


def test_buckets_give_one_profile_each_but_text_encoders_share():
    specs = (parse_profile("512x512@1-2"), parse_profile("768x768@1-2"))
    unet = component_profiles("unet", UNET, specs, True)
    text = component_profiles("text_encoder", TEXT, specs, True)
    assert [p.name for p in unet] == ["512x512@1-2", "768x768@1-2"]
    assert [p.name for p in text] == ["512x512@1-2|768x768@1-2"]
    assert ComponentProfile.from_json(unet[1].to_json()) == unet[1]


def _sample(b, h, w):
    return {"sample": (b, 4, h, w), "timestep": (b,), "encoder_hidden_states": (b, 77, 768)}


def test_select_profile_prefers_the_closest_opt():
    specs = ("512x512@1-4", "512x512@1-3-4", "256-512-1024x512@1", "512x512@1-4")
    profiles = component_profiles("unet", UNET, tuple(parse_profile(t) for t in specs), cfg=False)
    assert [p.name for p in profiles] == ["512x512@1-4", "512x512@1-3-4", "256-512-1024x512@1"]  # repeat merged
    assert select_profile("unet", profiles, _sample(1, 64, 64)) == 0   # opt of 0 and 2: the first wins
    assert select_profile("unet", profiles, _sample(3, 64, 64)) == 1   # exactly profile 1's opt
    assert select_profile("unet", profiles, _sample(2, 64, 64)) == 1   # |2-3|/3 < |2-1|/1
    assert select_profile("unet", profiles, _sample(1, 96, 64)) == 2   # only profile 2 has 768 rows


def test_select_profile_ties_go_to_the_first():
    profiles = [derive_profile("unet", UNET, parse_profile("512x512@1-4"), True)] * 2
    assert select_profile("unet", profiles, _sample(3, 64, 64)) == 0


def test_shape_outside_every_profile_names_them():
    profiles = component_profiles("unet", UNET, (parse_profile("512x512@1"), parse_profile("768x768@1")), True)
    with pytest.raises(SdrtError, match=r"unet: sample \(2, 4, 80, 80\).*fits none of the engine's profiles "
                                        r"\(512x512@1, 768x768@1\)"):
        select_profile("unet", profiles, _sample(2, 80, 80))
    with pytest.raises(SdrtError):  # wrong rank is outside too
        select_profile("unet", profiles, {"sample": (2, 4, 64)})


def test_bucket_for_requests():
    specs = [parse_profile("512x512@1-4"), parse_profile("512-1024x512-1024@1")]
    assert str(bucket_for(specs, 512, 512, 1)) == "512x512@1-4"   # the static bucket's opt is exact
    assert str(bucket_for(specs, 768, 640, 1)) == "512-1024x512-1024@1"
    with pytest.raises(SdrtError, match=r"1024x1024 at batch 2 is outside every engine profile .*--profile "
                                        r"1024x1024@2"):
        bucket_for(specs, 1024, 1024, 2)


spans = st.tuples(st.integers(1, 16), st.integers(0, 16), st.integers(0, 16)).map(
    lambda t: Span(t[0], t[0] + t[1], t[0] + t[1] + t[2]))


@settings(max_examples=60, deadline=None)
@given(h=spans, w=spans, b=st.tuples(st.integers(1, 4), st.integers(0, 4), st.integers(0, 4)), cfg=st.booleans())
def test_every_derived_profile_contains_its_own_corners(h, w, b, cfg):
    spec = ProfileSpec(Span(8 * h.min, 8 * h.opt, 8 * h.max), Span(8 * w.min, 8 * w.opt, 8 * w.max),
                       Span(b[0], b[0] + b[1], b[0] + b[1] + b[2]))
    assert parse_profile(str(spec)) == spec
    for name, inputs in [("unet", UNET), ("vae_decoder", VAE_DEC), ("vae_encoder", VAE_ENC), ("text_encoder", TEXT)]:
        p = derive_profile(name, inputs, spec, cfg)
        for corner in ("min", "opt", "max"):
            shapes = {n: getattr(r, corner) for n, r in p.inputs.items()}
            assert select_profile(name, [p], shapes) == 0
        assert all(r.min <= r.opt <= r.max for r in p.inputs.values())
