"""The openvino backend against eager on the tiny preset: every verb, fp32 and bf16, and a whole generation."""

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from sdrt.backends import make_backend
from sdrt.backends.openvino import OpenVINOBackend, cpu_precision_default
from sdrt.errors import SdrtError
from sdrt.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def components():
    return load_model("tiny")


@pytest.fixture(scope="module")
def onnx_dir(components, tmp_path_factory):
    """tiny's fp32 export in the session's private $SDRT_CACHE, shared with test_bench: exported once."""
    from sdrt.backends import Precision
    from sdrt.backends.onnxruntime import ensure_onnx

    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.getbasetemp() / "sdrt-cache"
        path.mkdir(exist_ok=True)
        mp.setenv("SDRT_CACHE", str(path))
        yield ensure_onnx(components, Precision.FP32)


@pytest.fixture(scope="module")
def eager(components):
    return make_backend("eager", components=components, device="cpu")


def has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def verb_outputs(backend) -> dict[str, torch.Tensor]:
    """Each verb once on fixed inputs of an odd size (latent 9x7: not a multiple of the UNet's 4x downsampling)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 900, (2, 77), generator=g)
    sample, ehs = torch.randn(2, 4, 9, 7, generator=g), torch.randn(2, 77, 64, generator=g)
    te = backend.text_encoder(0, ids)
    return {"last_hidden_state": te["last_hidden_state"], "pooled_output": te["pooled_output"],
            "unet": backend.unet(sample, torch.tensor([999.0, 10.0]), ehs),
            "vae_decoder": backend.vae_decoder(torch.randn(1, 4, 9, 7, generator=g)),
            "vae_encoder": backend.vae_encoder(torch.rand(1, 3, 72, 56, generator=g) * 2 - 1)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# fp32: the same graph in another runtime; only float reassociation (fused kernels, other summation orders) differs.
# bf16: 8 mantissa bits, so each matmul/conv rounds its inputs at ~4e-3 relative; through the tiny UNet's ~20
# layers that compounds to ~1e-2 of the output's norm. 5e-2 keeps a margin without hiding a wrong graph
# (a wrong graph is off by ~1).
@pytest.mark.parametrize("precision,static,tol", [("fp32", True, 1e-4), ("fp32", False, 1e-4), ("bf16", True, 5e-2)])
def test_verbs_match_eager(onnx_dir, eager, precision, static, tol):
    if precision == "bf16" and not has_bf16():
        pytest.skip("this CPU has no bf16 (AVX512-BF16 or AMX)")
    ov = OpenVINOBackend(onnx_dir, precision, static_shapes=static)
    assert ov.precision == precision and ov.dtype == torch.float32
    got, want = verb_outputs(ov), verb_outputs(eager)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert rel_err(got[name], want[name]) < tol, (name, rel_err(got[name], want[name]))


def test_static_shapes_compile_per_shape_and_keep_a_few(onnx_dir, eager):
    from sdrt.backends import openvino

    ov = OpenVINOBackend(onnx_dir, "fp32")
    for side in (8, 9, 10, 11):  # latent sizes: one compile each
        latent = torch.randn(1, 4, side, side)
        assert rel_err(ov.vae_decoder(latent), eager.vae_decoder(latent)) < 1e-4
    assert len(ov.graphs["vae_decoder"].by_shape) == openvino.MAX_SHAPES


def test_default_precision_is_openvinos(onnx_dir):
    ov = make_backend("openvino", onnx_dir=onnx_dir)  # bare name: OpenVINO's own INFERENCE_PRECISION_HINT
    assert ov.precision == cpu_precision_default() == ("bf16" if has_bf16() else "fp32")


def test_generation_matches_eager(components, onnx_dir, eager):
    from sdrt.image import psnr
    from sdrt.pipeline import GenerationRequest, Pipeline

    r = GenerationRequest(prompt="a red cube", steps=3, seed=1)
    want = Pipeline.from_components(components, eager).generate(r)
    got = Pipeline.from_components(components, make_backend("openvino:fp32", onnx_dir=onnx_dir)).generate(r)
    assert psnr(got.pixels, want.pixels) > 60  # fp32: float noise only
    assert np.abs(got.latents.numpy() - want.latents.numpy()).max() < 1e-3


def test_errors_are_one_line(onnx_dir, tmp_path):
    with pytest.raises(SdrtError, match="fp32, bf16 or int8"):
        make_backend("openvino:fp16", onnx_dir=onnx_dir)
    with pytest.raises(SdrtError, match="reads the int8 export"):  # int8 runs the Q/DQ graphs, not these
        make_backend("openvino:int8", onnx_dir=onnx_dir)
    with pytest.raises(SdrtError, match="sdrt export"):
        make_backend("openvino")
    with pytest.raises(SdrtError, match="manifest"):
        make_backend("openvino", onnx_dir=tmp_path)


def test_int8_runs_the_qdq_export(onnx_dir, tmp_path):
    from sdrt.export.int8 import export_int8

    from sdrt.image import psnr
    from sdrt.pipeline import GenerationRequest, Pipeline

    components = load_model("tiny")
    int8_dir = tmp_path / "int8"
    export_int8(components, onnx_dir, int8_dir, calibration_prompts=["a red car"], calibration_steps=2,
                progress=False)
    r = GenerationRequest("a red car", steps=2, seed=0)
    want = Pipeline.from_components(components, make_backend("eager", components=components)).generate(r)
    got = Pipeline.from_components(components, make_backend("openvino:int8", onnx_dir=int8_dir)).generate(r)
    assert psnr(got.pixels, want.pixels) > 25  # int8 UNet (+ bf16 elsewhere on this CPU): the export's gate is 30


@pytest.mark.parametrize("argv,message", [
    (["--backend", "openvino:fp16"], "openvino runs fp32, bf16 or int8 on the CPU, not fp16"),
    (["--backend", "openvino", "--device", "foo"], r"unknown device 'foo' (cpu, cuda or cuda:N)"),
    (["--backend", "openvino", "--device", "cuda"], "the openvino backend runs on the CPU, not cuda"),
])
def test_a_spec_openvino_cannot_run_fails_before_the_export(tmp_path, monkeypatch, capsys, argv, message):
    from sdrt.cli import main

    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "tiny", "a cat", "--steps", "1", "-o", str(tmp_path / "x.png"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"sdrt generate: error: {message}" and not (tmp_path / "cache").exists()  # nothing exported


def copy_export(onnx_dir, dest, edit):
    import json
    import shutil

    shutil.copytree(onnx_dir, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest, dest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_a_broken_export_is_refused_by_name(onnx_dir, tmp_path):
    def swap(m, d):  # the manifest names the decoder's graph for the UNet and the other way round
        c = m["components"]
        c["unet"], c["vae_decoder"] = c["vae_decoder"], c["unet"]

    def corrupt(m, d):  # same size, not a graph
        path = d / m["components"]["unet"]["file"]
        path.write_bytes(b"\x07" * path.stat().st_size)

    for edit, message in [(swap, r"vae_decoder.onnx: takes latent, not the inputs given \(encoder_hidden_states, "
                                 r"sample, timestep\); re-export"), (corrupt, r"unet.onnx: OpenVINO cannot load it: ")]:
        ov = OpenVINOBackend(copy_export(onnx_dir, tmp_path / edit.__name__, edit), "fp32")
        with pytest.raises(SdrtError, match=message) as e:
            ov.unet(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 64))
        assert "\n" not in str(e.value)
    partial = copy_export(onnx_dir, tmp_path / "partial", lambda m, d: m["components"].pop("text_encoder"))
    with pytest.raises(SdrtError, match="partial export, missing text_encoder"):
        OpenVINOBackend(partial, "fp32")


def test_an_export_of_other_weights_is_refused(onnx_dir):
    import types

    with pytest.raises(SdrtError, match="exported from other weights than the model given"):
        make_backend("openvino:fp32", components=types.SimpleNamespace(source_hash="other"), onnx_dir=onnx_dir)


def test_sizes_follow_the_export(components, onnx_dir):
    # tiny's graphs serve 32 px (its manifest's min_size), below the pipeline's default floor of 64, as on onnxruntime
    from sdrt.pipeline import GenerationRequest, Pipeline

    r = GenerationRequest(prompt="a red cube", steps=1, seed=1, height=32, width=40)
    for spec in ("openvino:fp32", "onnxruntime"):
        assert Pipeline.from_components(components, make_backend(spec, onnx_dir=onnx_dir)).generate(r).pixels.shape \
            == (1, 32, 40, 3)
