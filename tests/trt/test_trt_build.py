"""Build orchestration end to end with a fake builder: engines.json, reasons, refit, timing cache, failures,
lock, precision modes (no TensorRT)."""

import dataclasses
import hashlib
import json

import pytest
from sdrt.export.engine_cache import BuildLock, load_trusted
from sdrt.export.trt_build import BuildOptions, Mode, build_engines, summary
from sdrt.export.trt_profiles import parse_profiles

from sdrt.errors import SdrtError

ALL = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
OPTS = BuildOptions(precision="fp16", profiles=parse_profiles(["64x64@1-2"], 64))


def build(onnx, engines, builder, **kw):
    lines = []
    records = build_engines(onnx, engines, dataclasses.replace(OPTS, **kw), builder, log=lines.append)
    return {r.component: r.decision.reason for r in records}, lines


def manifest(engines):
    return json.loads((engines / "engines.json").read_text())


def test_first_build_then_everything_is_cached(tmp_path, onnx_dir, fake_builder):
    engines, fb = tmp_path / "engines", fake_builder()
    reasons, lines = build(onnx_dir, engines, fb)
    assert reasons == dict.fromkeys(ALL, "new")
    assert fb.actions() == [("build", n) for n in ALL]  # pipeline order
    assert any(line.startswith("[2/4] unet: build (new): fp16, 1 profile(s) [64x64@1-2]") for line in lines)
    assert any("unet: build done in" in line and "MB)" in line for line in lines)
    m = manifest(engines)
    assert m["model"]["name"] == "toy" and m["profiles"] == ["64x64@1-2"] and m["precision"] == "fp16"
    unet = m["engines"]["unet"]
    assert unet["reason"] == "new" and unet["key"]["trt_version"] == "10.0.1"
    assert unet["key"]["compute_capability"] == "8.9" and unet["key"]["sdrt_version"] == "0.1.0"
    assert unet["profiles"][0]["inputs"]["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 8, 8]}
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet["sha256"] == hashlib.sha256((engines / "unet.plan").read_bytes()).hexdigest()
    assert (engines / "timing.cache").read_bytes() == b"text_encoder;unet;vae_decoder;vae_encoder;"
    assert set(load_trusted(engines, "10.0.1", "8.9")) == set(ALL)

    fb2 = fake_builder()
    reasons, lines = build(onnx_dir, engines, fb2)
    assert fb2.calls == [] and set(reasons.values()) == {"up to date"}
    assert "[2/4] unet: up to date (fp16; built because: new)" in lines
    assert "up to date" in summary(build_engines(onnx_dir, engines, OPTS, fb2, log=lambda s: None))


def test_timing_cache_is_reused_on_the_same_gpu_only(tmp_path, onnx_dir, fake_builder):
    engines = tmp_path / "engines"
    build(onnx_dir, engines, fake_builder())
    fb = fake_builder()
    build(onnx_dir, engines, fb, force=True, components=("unet",))
    assert fb.calls[0][4] == b"text_encoder;unet;vae_decoder;vae_encoder;"
    other = fake_builder(compute_capability="9.0")
    reasons, lines = build(onnx_dir, engines, other, components=("unet",))
    assert other.calls[0][4] is None and any("starting a fresh one" in line for line in lines)
    assert reasons == {"unet": "GPU changed (8.9 -> 9.0)"}


def test_graph_change_rebuilds_only_that_component(tmp_path, make_onnx_dir, fake_builder):
    engines = tmp_path / "engines"
    build(make_onnx_dir(tmp_path / "onnx"), engines, fake_builder())
    fb = fake_builder()
    reasons, _ = build(make_onnx_dir(tmp_path / "onnx", extra_node=("vae_decoder",)), engines, fb)
    assert fb.actions() == [("build", "vae_decoder")]
    assert reasons["vae_decoder"] == "graph changed" and manifest(engines)["engines"]["vae_decoder"]["reason"] == \
        "graph changed"


def test_weights_change_refits_refittable_engines(tmp_path, make_onnx_dir, fake_builder):
    engines = tmp_path / "engines"
    build(make_onnx_dir(tmp_path / "onnx"), engines, fake_builder(), refittable=True)
    assert manifest(engines)["engines"]["unet"]["refittable"]
    before = (engines / "unet.plan").read_bytes()
    fb = fake_builder()
    reasons, _ = build(make_onnx_dir(tmp_path / "onnx", seeds={"unet": 7}), engines, fb, refittable=True)
    assert fb.actions() == [("refit", "unet")] and reasons["unet"] == "weights changed (refit)"
    assert (engines / "unet.plan").read_bytes() == before + b"+refit"
    e = manifest(engines)["engines"]["unet"]
    assert e["action"] == "refit" and e["reason"] == "weights changed (refit)"
    assert set(load_trusted(engines, "10.0.1", "8.9")) == set(ALL)  # the refit engine is trusted


def test_weights_change_rebuilds_engines_that_are_not_refittable(tmp_path, make_onnx_dir, fake_builder):
    engines = tmp_path / "engines"
    build(make_onnx_dir(tmp_path / "onnx"), engines, fake_builder())
    fb = fake_builder()
    reasons, _ = build(make_onnx_dir(tmp_path / "onnx", seeds={"text_encoder": 3}), engines, fb)
    assert fb.actions() == [("build", "text_encoder")]
    assert reasons["text_encoder"] == "weights changed (rebuild: engine not built with --refittable)"


def test_new_resolution_rebuilds_unet_and_vae_but_not_the_text_encoder(tmp_path, onnx_dir, fake_builder):
    engines = tmp_path / "engines"
    build(onnx_dir, engines, fake_builder())
    fb = fake_builder()
    reasons, _ = build(onnx_dir, engines, fb, profiles=parse_profiles(["64x64@1-2", "128x128@1-2"], 64))
    assert reasons == {"text_encoder": "up to date", "unet": "profiles changed", "vae_decoder": "profiles changed",
                       "vae_encoder": "profiles changed"}
    m = manifest(engines)
    assert [p["name"] for p in m["engines"]["unet"]["profiles"]] == ["64x64@1-2", "128x128@1-2"]
    assert [p["name"] for p in m["engines"]["text_encoder"]["profiles"]] == ["64x64@1-2|128x128@1-2"]


@pytest.mark.parametrize("change,message", [
    ({"precision": "fp32"}, "precision fp16 -> fp32"),
    ({"cfg": False}, "cfg True -> False"),
    ({"profiles": parse_profiles(["64x64@1-2", "128x128@1"], 64)}, r"profiles \['64x64@1-2'\] -> "),
])
def test_a_partial_build_cannot_change_what_the_directory_is_built_for(tmp_path, onnx_dir, fake_builder, change,
                                                                       message):
    # engines.json's precision, cfg and profiles speak for every engine; the backend refuses requests by them
    engines = tmp_path / "engines"
    build(onnx_dir, engines, fake_builder())
    before = manifest(engines)
    fb = fake_builder()
    with pytest.raises(SdrtError, match=f"text_encoder, vae_decoder, vae_encoder engine.*{message}"):
        build(onnx_dir, engines, fb, components=("unet",), **change)
    assert fb.calls == [] and manifest(engines) == before
    build(onnx_dir, engines, fake_builder(), **change)  # without --components the whole directory may change
    (field, value), = change.items()
    assert manifest(engines)[field] == ([str(p) for p in value] if field == "profiles" else value)


@pytest.mark.parametrize("change,reason", [
    ({"trt_version": "10.3.0"}, "TensorRT version changed (10.0.1 -> 10.3.0)"),
    ({"compute_capability": "8.6"}, "GPU changed (8.9 -> 8.6)"),
])
def test_new_tensorrt_or_gpu_rebuilds_everything(tmp_path, onnx_dir, fake_builder, change, reason):
    engines = tmp_path / "engines"
    build(onnx_dir, engines, fake_builder())
    reasons, _ = build(onnx_dir, engines, fake_builder(**change))
    assert reasons == dict.fromkeys(ALL, reason)


def test_options_and_force_and_tampering(tmp_path, onnx_dir, fake_builder):
    engines = tmp_path / "engines"
    build(onnx_dir, engines, fake_builder())
    reasons, _ = build(onnx_dir, engines, fake_builder(), opt_level=5, components=("unet",))
    assert reasons == {"unet": "build options changed (opt_level=3 refit=0 -> opt_level=5 refit=0)"}
    reasons, _ = build(onnx_dir, engines, fake_builder(), opt_level=5, force=True, components=("unet",))
    assert reasons == {"unet": "forced (--force)"}
    (engines / "vae_encoder.plan").write_bytes(b"someone else's engine")
    reasons, _ = build(onnx_dir, engines, fake_builder(), components=("vae_encoder",))
    assert reasons == {"vae_encoder": "engine file missing or changed on disk"}


def test_a_failed_build_leaves_nothing_the_cache_trusts(tmp_path, onnx_dir, fake_builder):
    engines = tmp_path / "engines"
    with pytest.raises(RuntimeError, match="simulated TensorRT failure in unet"):
        build(onnx_dir, engines, fake_builder(fail_on="unet"))
    assert sorted(p.name for p in engines.iterdir()) == [".build.lock", "engines.json", "text_encoder.plan",
                                                         "timing.cache"]
    assert list(manifest(engines)["engines"]) == ["text_encoder"]  # the finished work is kept
    fb = fake_builder()
    reasons, _ = build(onnx_dir, engines, fb)
    assert reasons == {"text_encoder": "up to date", "unet": "new", "vae_decoder": "new", "vae_encoder": "new"}


def test_a_failed_rebuild_keeps_the_old_engine_consistent(tmp_path, make_onnx_dir, fake_builder):
    engines = tmp_path / "engines"
    build(make_onnx_dir(tmp_path / "onnx"), engines, fake_builder())
    old = (engines / "unet.plan").read_bytes()
    with pytest.raises(RuntimeError):
        build(make_onnx_dir(tmp_path / "onnx", extra_node=("unet",)), engines, fake_builder(fail_on="unet"))
    assert (engines / "unet.plan").read_bytes() == old
    assert set(load_trusted(engines, "10.0.1", "8.9")) == set(ALL)  # old engine, old entry: still a pair
    reasons, _ = build(tmp_path / "onnx", engines, fake_builder())
    assert reasons["unet"] == "graph changed"


def test_a_second_builder_is_refused(tmp_path, onnx_dir, fake_builder):
    engines = tmp_path / "engines"
    with BuildLock(engines), pytest.raises(SdrtError, match="another `sdrt build`"):
        build(onnx_dir, engines, fake_builder())
    assert not (engines / "engines.json").exists()


def test_int8_modes(tmp_path, make_onnx_dir, fake_builder):
    # fp16 Q/DQ graph: strongly typed, no precision flags; everything else as fp16
    fb = fake_builder()
    build(make_onnx_dir(tmp_path / "q16", precision="int8", qdq=True, quantization={"algo": "smoothquant"}),
          tmp_path / "e16", fb, precision="int8", refittable=True)
    modes = {c[1]: (c[2], c[3]) for c in fb.calls}
    assert modes["unet"] == (Mode.INT8_STRONG.value, ("REFIT",))
    assert modes["vae_decoder"] == ("fp16", ("FP16", "REFIT"))
    keys = {n: e["key"]["quantization"] for n, e in manifest(tmp_path / "e16")["engines"].items()}
    assert keys.pop("unet") is not None and set(keys.values()) == {None}  # only the quantized graph's key
    # fp32 Q/DQ graph: weakly typed, INT8 + FP16
    fb = fake_builder()
    build(make_onnx_dir(tmp_path / "q32", precision="fp32", qdq=True), tmp_path / "e32", fb, precision="int8")
    assert {c[1]: c[3] for c in fb.calls}["unet"] == ("INT8", "FP16")
    with pytest.raises(SdrtError, match="unet.onnx is quantized with uint8 activations .* symmetric int8 Q/DQ"):
        build(make_onnx_dir(tmp_path / "u8", qdq="u8"), tmp_path / "e", fake_builder(), precision="int8")
    with pytest.raises(SdrtError, match="--precision int8 needs an int8 \\(Q/DQ\\) export; .* is fp32"):
        build(make_onnx_dir(tmp_path / "plain"), tmp_path / "e", fake_builder(), precision="int8")
    with pytest.raises(SdrtError, match="unet.onnx is an int8 \\(Q/DQ\\) graph: build it with --precision int8"):
        build(tmp_path / "q32", tmp_path / "e", fake_builder(), precision="fp16")


def test_vaes_that_overflow_in_fp16_stay_fp32(tmp_path, make_onnx_dir, fake_builder):
    fb = fake_builder()
    build(make_onnx_dir(tmp_path / "xl", family="sdxl"), tmp_path / "exl", fb)
    assert {c[1]: c[2] for c in fb.calls} == {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16",
                                              "vae_decoder": "fp32", "vae_encoder": "fp32"}
    fb = fake_builder()  # an fp16 export whose VAE the exporter kept in fp32
    build(make_onnx_dir(tmp_path / "h", precision="fp16", dtypes={"vae_decoder": "float32"}), tmp_path / "eh", fb)
    assert {c[1]: c[2] for c in fb.calls}["vae_decoder"] == "fp32"
    fb = fake_builder()
    build(tmp_path / "h", tmp_path / "e32", fb, precision="fp32")
    assert {c[2] for c in fb.calls} == {"fp32"} and {c[3] for c in fb.calls} == {()}


def test_default_profile_is_the_model_size(tmp_path, onnx_dir, fake_builder):
    build_engines(onnx_dir, tmp_path / "e", BuildOptions(), fake_builder(), log=lambda s: None)
    assert manifest(tmp_path / "e")["profiles"] == ["64x64@1-4"]


def test_profiles_must_fit_the_export(tmp_path, onnx_dir, fake_builder):
    m = json.loads((onnx_dir / "manifest.json").read_text())
    (onnx_dir / "manifest.json").write_text(json.dumps(dict(m, min_size=32, size_multiple=16)))
    with pytest.raises(SdrtError, match="--profile 16-64x64@1: 16 px is below the export's minimum 32 px"):
        build(onnx_dir, tmp_path / "e", fake_builder(), profiles=parse_profiles(["16-64x64"], 64))
    with pytest.raises(SdrtError, match="multiples of 16 px for this export"):
        build(onnx_dir, tmp_path / "e", fake_builder(), profiles=parse_profiles(["40x64"], 64))


def test_unknown_component(tmp_path, onnx_dir, fake_builder):
    with pytest.raises(SdrtError, match="no component 'controlnet' in .*; it has text_encoder, unet, vae_decoder"):
        build(onnx_dir, tmp_path / "e", fake_builder(), components=("controlnet",))


def _unet(m, **change):
    return {**m, "components": {**m["components"], "unet": {**m["components"]["unet"], **change}}}


def _no_tensorrt(options):
    raise SdrtError("TensorRT is not installed")  # what a machine without it says, once everything else passed


@pytest.mark.parametrize("edit,argv,message", [
    (lambda m: [1], [], "lists no components"),
    (lambda m: {**m, "model": 5}, [], "has no model description with a default_size"),
    (lambda m: {**m, "components": {**m["components"], "unet": 5}}, [], "the unet entry lacks its file or inputs"),
    (lambda m: _unet(m, graph_bytes=10**6), [], "unet: unet.onnx has .* bytes, the manifest says 1000000"),
    (None, ["--components", "foo"], "no component 'foo'"),
    (None, ["-o", "{tmp}/file/engines"], "cannot create the engine directory"),
    (None, ["--lock-timeout", "-5"], "--lock-timeout must be a number of seconds >= 0"),
    (lambda m: {**m, "components": {k: v for k, v in m["components"].items() if k != "unet"}}, [],
     r"has no unet \(an export that did not finish\?\).*--components"),  # what an interrupted export leaves
], ids=["manifest a list", "model a number", "entry a number", "truncated graph", "unknown component",
        "engine dir under a file", "negative lock timeout", "no unet"])
def test_the_users_mistakes_come_before_tensorrt(tmp_path, onnx_dir, edit, argv, message):
    # each was an internal error (AttributeError, TypeError, FileNotFoundError) or hid behind "TensorRT is not
    # installed" on a machine without it
    import argparse

    from sdrt.export import build_cli

    if edit is not None:
        path = onnx_dir / "manifest.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    (tmp_path / "file").write_text("")
    p = argparse.ArgumentParser(prog="sdrt build")
    build_cli.add_arguments(p)
    args = p.parse_args([str(onnx_dir), *(a.format(tmp=tmp_path) for a in argv)])
    with pytest.raises(SdrtError, match=message):
        build_cli.run(args, make_builder=_no_tensorrt)


def test_an_unreadable_graph_is_a_user_error(tmp_path, onnx_dir, fake_builder):
    # a manifest without sizes (hand-made) cannot catch the truncation; onnx's DecodeError was an internal error
    (onnx_dir / "unet.onnx").write_bytes((onnx_dir / "unet.onnx").read_bytes()[:100])
    with pytest.raises(SdrtError, match="unet.onnx: not a readable ONNX graph"):
        build(onnx_dir, tmp_path / "e", fake_builder())


def test_load_manifest_refuses_a_model_that_is_not_an_object(onnx_dir):
    from sdrt.export.onnx_manifest import load_manifest, read_manifest

    path = onnx_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model": 5}))  # was an AttributeError
    with pytest.raises(SdrtError, match="not a format-1 sdrt manifest"):
        load_manifest(onnx_dir)
    assert read_manifest(onnx_dir) is None  # the exporter starts afresh, as with any unreadable manifest
