"""int8 export on `tiny`: the Q/DQ graph follows the recipe, weights are per channel, the export is reproducible,
the quality gate passes and refuses, and onnxruntime:int8 runs the result."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

PROMPTS = ["a red fox in a snowy forest", "a bowl of ramen, top view"]
# tiny's random weights at 64 px over 4 steps land at 30-37 dB; 20 dB is "same picture" with room for noise
# from other machines' ORT kernels, 1000 dB is impossible (identical images are inf, but int8 never is).
GATE = dict(calibration_prompts=PROMPTS, calibration_steps=4, gate_seeds=(0,), min_psnr=20.0, progress=False)


@pytest.fixture(scope="module")
def tiny():
    from sdrt.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="module")
def fp32_dir(tiny, tmp_path_factory):
    from sdrt.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("tiny-fp32")
    export_model(tiny, out, components=["text_encoder", "unet", "vae_decoder"], progress=False)
    return out


@pytest.fixture(scope="module")
def int8(tiny, fp32_dir, tmp_path_factory):
    from sdrt.export.int8 import export_int8

    out = tmp_path_factory.mktemp("tiny-int8")
    return export_int8(tiny, fp32_dir, out, **GATE), out


def _graph(path):
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: t for t in m.graph.initializer}
    return m, producer, inits


def test_qdq_around_quantized_ops_and_none_around_kept_ones(int8, fp32_dir):
    from sdrt.export.int8_recipe import RECIPES, excluded_nodes

    manifest, out = int8
    assert manifest["precision"] == "int8" and manifest["components"]["unet"]["weights_dtype"] == "int8"
    excluded = excluded_nodes(onnx.load(str(fp32_dir / "unet.onnx"), load_external_data=False), RECIPES["ort-cpu"])
    assert {why.split(":")[0] for why in excluded.values()} == {"conditioning", "attention", "skip concat",
                                                                "first layer", "last layer"}
    m, producer, inits = _graph(out / "unet.onnx")
    by_name = {n.name: n for n in m.graph.node}
    quantized = [n for n in m.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.name not in excluded]
    assert len(quantized) > 40
    for n in quantized:  # activation and weight both arrive through DequantizeLinear
        assert producer[n.input[0]].op_type == "DequantizeLinear", n.name
        assert producer[n.input[1]].op_type == "DequantizeLinear", n.name
    for name in excluded:  # kept fp32: no DequantizeLinear feeds them, weights stay float initializers
        n = by_name[name]
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in n.input), name
    for n in m.graph.node:  # norms and softmax run in float
        if n.op_type in ("Softmax", "InstanceNormalization", "LayerNormalization", "GroupNormalization"):
            assert producer.get(n.input[0]) is None or producer[n.input[0]].op_type != "DequantizeLinear", n.name
    # the first and last convolutions by role
    conv_in = [n for n in m.graph.node if n.op_type == "Conv" and n.input[0] == "sample"]
    assert len(conv_in) == 1 and conv_in[0].name in excluded


def test_weights_are_int8_per_output_channel(int8):
    _, out = int8
    m, producer, inits = _graph(out / "unet.onnx")
    checked = 0
    for n in m.graph.node:
        if n.op_type not in ("Conv", "MatMul") or producer.get(n.input[1]) is None:
            continue
        dq = producer[n.input[1]]
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        w, scale = inits[dq.input[0]], onnx.numpy_helper.to_array(inits[dq.input[1]])
        assert w.data_type == onnx.TensorProto.INT8
        out_channels = w.dims[0] if n.op_type == "Conv" else w.dims[1]  # Conv (O, I, kh, kw); MatMul B (K, N)
        assert scale.shape == (out_channels,), n.name
        checked += 1
    assert checked > 40


def test_reproducible_and_up_to_date(tiny, fp32_dir, int8, tmp_path):
    from sdrt.export.int8 import export_int8

    manifest, out = int8
    again = export_int8(tiny, fp32_dir, tmp_path / "again", **GATE)
    assert (tmp_path / "again" / "unet.onnx").read_bytes() == (out / "unet.onnx").read_bytes()
    assert again["components"]["unet"]["graph_sha256"] == manifest["components"]["unet"]["graph_sha256"]
    assert export_int8(tiny, fp32_dir, out, **GATE) == manifest  # same settings: a no-op


def test_gate_passes_and_refuses_unless_forced(tiny, fp32_dir, int8, tmp_path):
    from sdrt.export.int8 import export_int8

    from sdrt.errors import SdrtError

    gate = int8[0]["int8"]["quality_gate"]
    assert gate["passed"] and gate["psnr_db"] >= 20.0 and gate["latent_max_abs"] > 0
    impossible = {**GATE, "min_psnr": 1000.0, "calibration_steps": 1}  # the gate's logic, not its numbers
    with pytest.raises(SdrtError, match="quality gate"):
        export_int8(tiny, fp32_dir, tmp_path / "refused", **impossible)
    assert not (tmp_path / "refused" / "manifest.json").exists()
    forced = export_int8(tiny, fp32_dir, tmp_path / "forced", force=True, **impossible)
    assert forced["int8"]["quality_gate"]["passed"] is False
    with pytest.raises(SdrtError, match="quality gate"):  # not "up to date": it failed, and this run has no --force
        export_int8(tiny, fp32_dir, tmp_path / "forced", **impossible)


class Redone(Exception):
    pass


@pytest.mark.parametrize("change", ["vae weights", "sdrt version", "gate"])
def test_up_to_date_means_the_same_model_sdrt_and_gate(tiny, fp32_dir, int8, tmp_path, monkeypatch, change):
    # The UNet graph alone does not identify the export: the other graphs are linked from the fp32 export (another
    # VAE with the same UNet), and another sdrt or gate must not be answered with this one's result.
    import shutil

    from sdrt.export import int8 as int8_module

    import sdrt

    src, out = tmp_path / "fp32", tmp_path / "int8"
    shutil.copytree(fp32_dir, src)
    shutil.copytree(int8[1], out)
    assert int8_module.export_int8(tiny, src, out, **GATE) == int8[0]  # unchanged: up to date
    (out / ".sdrt-tmp-999999999-int8").mkdir()  # a killed export's leftovers (no such pid)
    gate = dict(GATE)
    if change == "vae weights":
        m = json.loads((src / "manifest.json").read_text())
        m["components"]["vae_decoder"]["graph_sha256"] = "0" * 64
        (src / "manifest.json").write_text(json.dumps(m))
    elif change == "sdrt version":
        monkeypatch.setattr(sdrt, "__version__", "9.9.9")
    else:
        gate["min_psnr"] = 25.0
    monkeypatch.setattr(int8_module, "calibrate_and_quantize", lambda *a, **kw: (_ for _ in ()).throw(Redone()))
    with pytest.raises(Redone):
        int8_module.export_int8(tiny, src, out, **gate)
    assert not (out / ".sdrt-tmp-999999999-int8").exists()


def test_calibration_refuses_what_it_cannot_use(tiny, tmp_path, monkeypatch):
    from sdrt.export.int8 import export_int8
    from sdrt.export.int8_calibrate import RangeStats, ranges_for
    from sdrt.export.int8_recipe import RECIPES

    from sdrt.errors import SdrtError

    for bad in (0, 1, -1, 2.5, True):
        with pytest.raises(SdrtError, match="max_samples must be an integer >= 2"):
            export_int8(tiny, None, tmp_path / "out", max_samples=bad, progress=False)
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SdrtError, match="is a file, not a directory"):
        export_int8(tiny, None, tmp_path / "file", progress=False)
    assert not (tmp_path / "cache").exists()  # refused before the fp32 export
    lo, hi = np.array([[0.0, -1.0]], np.float32), np.array([[np.nan, 2.0]], np.float32)  # an overflowed tensor a
    for recipe in RECIPES.values():
        stats = RangeStats(["a", "b"], recipe.percentile, mins=lo, maxs=hi, lows=lo, highs=hi, timesteps=[1.0])
        with pytest.raises(SdrtError, match=r"calibration range of a is not finite \(0.0, nan\)"):
            ranges_for(stats, recipe)


def test_an_interrupted_redo_leaves_no_old_entry_for_a_new_file(tiny, fp32_dir, int8, tmp_path, monkeypatch):
    # Another calibration gives an int8 UNet of (nearly: here 6 bytes apart) the same size, and the runtime checks
    # sizes only: die after the new files are in place, before the new manifest, and the old manifest must vouch
    # for none of them.
    import shutil

    from sdrt.export import int8 as int8_module
    from sdrt.export.int8 import export_int8
    from sdrt.export.onnx_manifest import load_manifest, sha256_file

    from sdrt.errors import SdrtError

    out = tmp_path / "int8"
    shutil.copytree(int8[1], out)
    real = int8_module._write

    def dies_after_write(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(int8_module, "_write", dies_after_write)
    with pytest.raises(KeyboardInterrupt):
        export_int8(tiny, fp32_dir, out, **{**GATE, "calibration_steps": 3})
    assert sha256_file(out / "unet.onnx") != int8[0]["components"]["unet"]["graph_sha256"]  # a new UNet is in place
    with pytest.raises(SdrtError, match="partial export, missing"):  # not listed at all, whatever its size
        load_manifest(out, require=["unet"], verify_hashes=False)


@pytest.mark.parametrize("content", [None, b"", b"\n  \n", b"\xff\xfe\x00bin", "dir"])
def test_bad_calibration_prompts_file(tiny, fp32_dir, tmp_path, content):
    from sdrt.export.int8 import export_int8

    from sdrt.errors import SdrtError

    path = tmp_path / "prompts.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SdrtError, match="calibration prompts file"):
        export_int8(tiny, fp32_dir, tmp_path / "out", calibration_prompts=path, progress=False)


def test_prompts_file_is_read_one_per_line(tmp_path):
    from sdrt.export.int8_calibrate import read_prompts

    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]


def test_tensorrt_recipe_is_symmetric_int8(tiny, fp32_dir, tmp_path):
    from sdrt.export.int8 import calibrate_and_quantize
    from sdrt.export.int8_recipe import RECIPES

    calibrate_and_quantize(tiny, fp32_dir / "unet.onnx", tmp_path / "unet.onnx", PROMPTS[:1], 2, 64, 0,
                           RECIPES["tensorrt"])
    m, producer, inits = _graph(tmp_path / "unet.onnx")
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:  # zero point 0, int8: what TensorRT accepts
        zp = onnx.numpy_helper.to_array(inits[q.input[2]])
        assert zp.dtype == np.int8 and not zp.any()
    for n in m.graph.node:  # Q/DQ only where a conv or linear layer reads the tensor (ModelOpt's placement)
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            assert {c.op_type for c in m.graph.node if n.output[0] in c.input} & {"Conv", "MatMul", "Gemm"}
    for n in m.graph.node:  # biases stay float (TensorRT adds them in float)
        if n.op_type == "Conv" and len(n.input) > 2:
            assert n.input[2] in inits and inits[n.input[2]].data_type == onnx.TensorProto.FLOAT


def test_onnxruntime_int8_backend_runs_the_export(tiny, int8):
    from sdrt.backends import make_backend
    from sdrt.image import psnr
    from sdrt.pipeline import GenerationRequest, Pipeline

    _, out = int8
    req = GenerationRequest(prompt=PROMPTS[0], steps=4, seed=3, height=64, width=64)
    got = Pipeline.from_components(tiny, make_backend("onnxruntime:int8", components=tiny, onnx_dir=out)).generate(req)
    ref = Pipeline.from_components(tiny, make_backend("eager", components=tiny)).generate(req)
    assert np.isfinite(got.pixels).all()
    assert psnr(got.pixels, ref.pixels, peak=1.0) > 20.0


def test_export_cli_int8(tmp_path, capsys):
    from sdrt.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\na cat on a sofa\n")
    out = tmp_path / "int8"
    assert main(["export", "tiny", "-o", str(out), "--precision", "int8", "--calibration-prompts", str(prompts),
                 "--calibration-steps", "2", "-q"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "int8" and m["int8"]["quality_gate"]["passed"]
    assert "quality gate" in capsys.readouterr().out
    assert main(["export", "tiny", "-o", str(tmp_path / "x"), "--precision", "int8",
                 "--calibration-prompts", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.txt" in err


@pytest.mark.parametrize("argv,message", [
    (["--calibration-steps", "2"], "--calibration-steps: only for --precision int8"),
    (["--int8-recipe", "tensorrt", "--calibration-size", "64"], "--calibration-size, --int8-recipe: only for"),
    (["--precision", "int8", "--components", "unet"], "--components is for fp32 and fp16 exports"),
    (["--precision", "int8", "--opset", "17"], "--opset 17: int8 quantizes the opset-18 fp32 export"),
])
def test_export_flags_of_the_other_precision_are_refused(tmp_path, capsys, argv, message):
    from sdrt.cli import main

    assert main(["export", "tiny", "-o", str(tmp_path / "x"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdrt export: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
