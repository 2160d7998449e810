"""Foundation: presets, diffusers folders written by the test itself, and every bad MODEL input."""

import json
import shutil

import pytest
import torch

from sdrt.cli import main
from sdrt.errors import SdrtError
from sdrt.models import load_model, save_diffusers_folder
from sdrt.specs import PRESETS, Family
from sdrt.tokenizer import builtin_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    save_diffusers_folder(load_model("tiny-sdxl", seed=5), path)
    return path


@pytest.mark.parametrize("name,family,prediction", [("tiny", Family.SD1, "epsilon"),
                                                    ("tiny-sd2", Family.SD2, "v_prediction"),
                                                    ("tiny-sdxl", Family.SDXL, "epsilon")])
def test_tiny_presets_build_with_real_architectures(name, family, prediction):
    c = load_model(name)
    assert (c.family, c.prediction_type) == (family, prediction)
    assert len(c.text_encoders) == len(c.tokenizers) == (2 if family is Family.SDXL else 1)
    ids = c.tokenizers[0](["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = c.text_encoders[0](ids).last_hidden_state
    assert hidden.shape == (1, 77, c.text_encoders[0].config.hidden_size)
    assert sum(p.numel() for m in c.modules.values() for p in m.parameters()) < 5e6  # "a few million"


@pytest.mark.parametrize("name,upcast", [("tiny", False), ("tiny-sd2", False), ("tiny-sdxl", True)])
def test_only_sdxl_keeps_its_vae_in_fp32_at_fp16(name, upcast):
    # diffusers' AutoencoderKL says force_upcast=True by default, so every preset's VAE config does; the SD 1.x/2.x
    # pipelines ignore it and decode in fp16, the SDXL ones honour it. Eager (and the torch backend, which builds on
    # it) must do the same, or its fp16 rows pay an fp32 VAE that diffusers' don't.
    from sdrt.backends import Precision
    from sdrt.backends.eager import EagerBackend

    c = load_model(name)
    assert c.vae.config.force_upcast and c.vae_force_upcast is upcast
    vae = EagerBackend(c, Precision.FP16, "cpu").vae
    assert next(vae.parameters()).dtype == (torch.float32 if upcast else torch.float16)


def test_presets_are_seeded_and_reproducible():
    a, b, c = load_model("tiny", seed=1), load_model("tiny", seed=1), load_model("tiny", seed=2)
    wa, wb, wc = (next(m.unet.parameters()) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.source_hash == b.source_hash != c.source_hash


def test_full_size_presets_are_specs_with_the_released_configs():
    # Building sd15/sdxl takes tens of seconds; the architectures are checked as data here.
    assert PRESETS["sd15"].unet["cross_attention_dim"] == 768
    assert PRESETS["sd21"].prediction_type == "v_prediction" and PRESETS["sd21"].default_size == 768
    assert PRESETS["sdxl"].unet["addition_embed_type"] == "text_time" and len(PRESETS["sdxl"].text_encoders) == 2
    assert PRESETS["sdxl"].vae_scale == 0.13025 and PRESETS["sd-turbo"].scheduler["timestep_spacing"] == "trailing"


def test_builtin_tokenizer_is_clip_bpe():
    tok = builtin_tokenizer()
    ids = tok("A photo of an astronaut", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:6]) == ["a</w>", "photo</w>", "of</w>", "an</w>", "astronaut</w>"]
    assert ids[6] == tok.eos_token_id and set(ids[7:]) == {tok.pad_token_id}
    # An unseen word still tokenizes, into byte-level BPE pieces, and decodes back.
    unseen = tok("zyxq").input_ids[1:-1]
    assert len(unseen) > 1 and tok.decode(unseen).strip() == "zyxq"


def test_diffusers_folder_round_trip(tiny_folder):
    ref, c = load_model("tiny-sdxl", seed=5), load_model(str(tiny_folder))
    assert c.family is Family.SDXL and c.default_size == 64
    assert type(c.text_encoders[1]).__name__ == "CLIPTextModelWithProjection"
    for name, module in ref.modules.items():
        for (k, v), (k2, v2) in zip(module.state_dict().items(), c.modules[name].state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2)
    assert c.tokenizers[1].pad_token == "!"


def test_folder_hash_tracks_weights(tiny_folder, tmp_path):
    other = tmp_path / "other"
    save_diffusers_folder(load_model("tiny-sdxl", seed=6), other)
    assert load_model(str(other)).source_hash != load_model(str(tiny_folder)).source_hash


def test_folder_hash_tracks_configs(tiny_folder, tmp_path):
    # the cached ONNX export keys on it: an edited norm_eps is another model (35 dB off when the export was reused)
    from sdrt.models import source_hash

    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    config = other / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "norm_eps": 1e-3}))
    assert source_hash(str(other)) == load_model(str(other)).source_hash != source_hash(str(tiny_folder))


def bad_input(tmp_path, tiny_folder, case):
    if case == "missing path":
        return str(tmp_path / "nope")
    if case == "unknown preset":
        return "sd99"
    if case == "not a model file":
        (tmp_path / "model.ckpt").write_bytes(b"x")
        return str(tmp_path / "model.ckpt")
    folder = tmp_path / "copy"
    shutil.copytree(tiny_folder, folder)
    if case == "no model_index":
        (folder / "model_index.json").unlink()
    elif case == "bad model_index":
        (folder / "model_index.json").write_text("{")
    elif case == "missing component":
        shutil.rmtree(folder / "vae")
    elif case == "missing scheduler config":
        (folder / "scheduler" / "scheduler_config.json").unlink()
    elif case == "truncated weights":
        w = next((folder / "unet").glob("*.safetensors"))
        w.write_bytes(w.read_bytes()[:1000])
    elif case == "corrupt weights":
        w = next((folder / "vae").glob("*.safetensors"))
        w.write_bytes(b"\xff" * 64)
    elif case == "empty tokenizer folder":  # transformers made a 2-token tokenizer of it, max_length 1e30
        shutil.rmtree(folder / "tokenizer")
        (folder / "tokenizer").mkdir()
    elif case in BAD_JSON:
        file, change, _ = BAD_JSON[case]
        data = json.loads((folder / file).read_text())  # a dict change is merged in, anything else replaces it
        (folder / file).write_text(json.dumps({**data, **change} if isinstance(change, dict) else change))
    return str(folder)


# JSON of the wrong shape, each an internal error (exit 2) or a nonsense tokenizer once: file, change, message.
BAD_JSON = {
    "model_index not an object": ("model_index.json", [1, 2, 3], "model_index.json: expected a JSON object"),
    "component entry a number": ("model_index.json", {"text_encoder": 5}, "'text_encoder' must be"),
    "component entry empty": ("model_index.json", {"text_encoder": []}, "'text_encoder' must be"),
    "scheduler config a list": ("scheduler/scheduler_config.json", [1], "scheduler_config.json: expected a JSON"),
    "unet config a list": ("unet/config.json", [1], "config.json: expected a JSON object"),
    "sample_size a string": ("unet/config.json", {"sample_size": "abc"}, "sample_size must be a positive integer"),
    "vae config unbuildable": ("vae/config.json", {"block_out_channels": []}, "config.json: cannot build vae"),
    "tokenizer max length": ("tokenizer/tokenizer_config.json", {"model_max_length": 1000},
                             "model_max_length is 1000, not CLIP's 77"),
}


CASES = {"missing path": "neither a preset", "unknown preset": "neither a preset",
         "not a model file": "expected a diffusers folder", "no model_index": "no model_index.json",
         "bad model_index": "invalid JSON", "missing component": "component 'vae' is missing",
         "missing scheduler config": "scheduler_config.json", "truncated weights": "cannot load unet",
         "corrupt weights": "cannot load vae", "empty tokenizer folder": "tokenizer: no tokenizer vocabulary",
         **{case: message for case, (_, _, message) in BAD_JSON.items()}}


@pytest.mark.parametrize("case", CASES)
def test_bad_model_input_is_one_line_and_exit_1(case, tmp_path, tiny_folder, capsys):
    model = bad_input(tmp_path, tiny_folder, case)
    with pytest.raises(SdrtError, match=CASES[case]):
        load_model(model)
    assert main(["info", model]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and CASES[case] in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["info", "export"])
@pytest.mark.parametrize("seed", [-1, 2**63, 99999999999999999999999])
def test_preset_seed_out_of_range_is_exit_1(command, seed, tmp_path, capsys):
    # torch.manual_seed overflowed past 2^64 (an internal error) and folded negatives onto other seeds
    argv = [command, "tiny", "--seed", str(seed)] + (["-o", str(tmp_path / "out")] if command == "export" else [])
    assert main(argv) == 1
    assert "seed must be an integer in [0, 2^63)" in capsys.readouterr().err


def test_info_cli_prints_components(capsys):
    assert main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    for needle in ("family:      sd1", "prediction:  epsilon", "unet", "vae", "text_encoder", "64x64", "PNDM"):
        assert needle in out


def test_model_index_names_components(tiny_folder):
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]


def _folder_with(tmp_path, tiny_folder, unet=None, vae=None):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = tmp_path / "variant"
    shutil.copytree(tiny_folder, folder)
    if unet is not None:  # weights of a UNet built with these config changes
        UNet2DConditionModel(**{**PRESETS["tiny-sdxl"].unet, **unet}).save_pretrained(folder / "unet")
    if vae is not None:
        AutoencoderKL(**{**PRESETS["tiny-sdxl"].vae, **vae}).save_pretrained(folder / "vae")
    return str(folder)


@pytest.mark.parametrize("unet, vae, message", [
    ({"time_cond_proj_dim": 32}, None, "an LCM-distilled UNet"),
    ({"in_channels": 9}, None, "unet takes 9 input channels where the VAE's latents have 4"),
    ({"num_class_embeds": 10}, None, "unet has a class embedding"),  # the x4 upscaler's noise-level embedding
    (None, {"latents_mean": [0.1] * 4, "latents_std": [0.9] * 4}, "vae has latents_mean/latents_std"),
    ({"addition_embed_type": None}, None, "unet has addition_embed_type=None beside 2 text encoder"),
    ({"cross_attention_dim": 64}, None, "the text encoders give 96 channels where the unet's cross-attention takes 64"),
], ids=["lcm unet", "inpainting unet", "class embedding", "latents mean", "sd unet in sdxl", "narrow unet"])
def test_variants_with_another_pipeline_are_refused(tmp_path, tiny_folder, capsys, unet, vae, message):
    # each once ran as plain text-to-image: 38 dB (LCM), a VAE error (9 channels), 30 dB from diffusers (latents_mean)
    model = _folder_with(tmp_path, tiny_folder, unet, vae)
    with pytest.raises(SdrtError, match=message):
        load_model(model)
    capsys.readouterr()  # the libraries' loading bars: the CLI turns them off, the API leaves them be
    assert main(["info", model]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "not supported" in err


def test_an_sdxl_unet_with_one_text_encoder_is_refused(tmp_path, tiny_folder):
    # once an IndexError in the pipeline: family_of says SDXL from the UNet alone
    folder = tmp_path / "one-encoder"
    shutil.copytree(tiny_folder, folder)
    for sub in ("text_encoder_2", "tokenizer_2"):
        shutil.rmtree(folder / sub)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items()
                                                         if k not in ("text_encoder_2", "tokenizer_2")}))
    with pytest.raises(SdrtError, match="addition_embed_type='text_time' beside 1 text encoder"):
        load_model(str(folder))


@pytest.mark.parametrize("karras, want", [(True, "dpmpp-2m-karras"), (False, "dpmpp-2m")])
def test_a_dpm_folder_defaults_to_dpm(tmp_path, tiny_folder, karras, want):
    folder = tmp_path / "dpm"
    shutil.copytree(tiny_folder, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": karras}))
    assert load_model(str(folder)).defaults["scheduler"] == want


def test_sdxl_presets_run_ddim_as_the_released_config_says():
    # SDXL's scheduler_config.json says clip_sample false: DDIM without it clamps x0 to [-1, 1] (14 dB off)
    from sdrt.schedulers import make_schedule

    for name in ("sdxl", "sd-turbo", "tiny-sdxl"):
        assert make_schedule("ddim", PRESETS[name].scheduler, 4).clip is None, name
