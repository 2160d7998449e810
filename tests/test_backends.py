"""Backends: spec parsing, the one dispatch dict, and each backend's verbs against the PyTorch modules."""

import pytest
import torch

from sdrt import backends
from sdrt.backends import Backend, BackendSpec, Precision, make_backend, parse_spec
from sdrt.errors import SdrtError
from sdrt.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sdxl():
    return load_model("tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_onnx(sdxl, tmp_path_factory):
    from sdrt.export.onnx_export import export_model

    path = tmp_path_factory.mktemp("onnx") / "tiny-sdxl"
    export_model(sdxl, path, progress=False)
    return path


@pytest.mark.parametrize("text,backend,precision", [
    ("eager", Backend.EAGER, None), ("onnxruntime:fp16", Backend.ONNXRUNTIME, Precision.FP16),
    (" TensorRT:INT8 ", Backend.TENSORRT, Precision.INT8), ("torch:bf16", Backend.TORCH, Precision.BF16),
    ("auto", Backend.ONNXRUNTIME, None), ("auto:fp32", Backend.ONNXRUNTIME, Precision.FP32)])
def test_parse_spec(text, backend, precision):
    assert parse_spec(text, device="cpu") == BackendSpec(backend, precision)


def test_auto_on_a_gpu_is_the_torch_backend(monkeypatch):
    # What the GPU suite measured fastest (4.4x diffusers fp16 on an H100), when Triton is there for its kernels;
    # without Triton, ONNX Runtime only with its CUDA provider, else eager.
    import importlib.util

    import onnxruntime

    monkeypatch.setattr(backends, "default_device", lambda device=None: torch.device("cuda"))
    assert parse_spec("auto") == BackendSpec(Backend.TORCH)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real_find_spec(n, *a))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert parse_spec("auto") == BackendSpec(Backend.EAGER)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    assert parse_spec("auto") == BackendSpec(Backend.ONNXRUNTIME)


@pytest.mark.parametrize("text,match", [("tensorflow", "unknown backend"), ("eager:fp8", "unknown precision"),
                                        ("", "unknown backend")])
def test_bad_specs_are_one_line_errors(text, match):
    with pytest.raises(SdrtError, match=match):
        parse_spec(text)


def test_every_backend_has_a_module_and_missing_ones_fail_cleanly(monkeypatch):
    assert set(backends.MODULES) == set(Backend)
    monkeypatch.setitem(backends.MODULES, Backend.OPENVINO, "sdrt.backends._not_written_yet")
    with pytest.raises(SdrtError, match="backend openvino is not available"):
        make_backend("openvino", onnx_dir="x")


def test_eager_needs_components_and_no_int8():
    with pytest.raises(SdrtError, match="PyTorch weights"):
        make_backend("eager")
    with pytest.raises(SdrtError, match="int8"):
        make_backend("eager:int8", components=load_model("tiny"))


def sdxl_inputs(batch=2, h=6, w=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 900, (batch, 77), generator=g)
    return {"ids": ids, "sample": torch.randn(batch, 4, h, w, generator=g),
            "timestep": torch.tensor([999.0, 13.5])[:batch], "ehs": torch.randn(batch, 77, 96, generator=g),
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[48.0, 80, 0, 0, 48, 80]]).repeat(batch, 1),
            "latent": torch.randn(batch, 4, h, w, generator=g),
            "image": torch.rand(batch, 3, 8 * h, 8 * w, generator=g)}


def test_eager_verbs_compute_what_the_modules_compute(sdxl):
    be = make_backend("eager", components=sdxl)
    x = sdxl_inputs()
    with torch.no_grad():
        out = sdxl.text_encoders[1](x["ids"], output_hidden_states=True)
        te = be.text_encoder(1, x["ids"])
        assert torch.equal(te["pooled_output"], out.text_embeds)  # SDXL's 2nd encoder: the projected pooled output
        assert torch.equal(te["penultimate_hidden_state"], out.hidden_states[-2])
        assert te["last_hidden_state"].shape == (2, 77, 32)
        ref = sdxl.unet(x["sample"], x["timestep"], x["ehs"], added_cond_kwargs={
            "text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
        assert torch.equal(be.unet(x["sample"], x["timestep"], x["ehs"], x["text_embeds"], x["time_ids"]), ref)
        assert torch.equal(be.vae_decoder(x["latent"]), sdxl.vae.decode(x["latent"]).sample)
        moments = be.vae_encoder(x["image"])
        assert moments.shape == (2, 8, 6, 10)
        assert torch.equal(moments.chunk(2, 1)[0], sdxl.vae.encode(x["image"]).latent_dist.mean)


@pytest.mark.parametrize("io_binding", [False, True])  # IO binding is the CUDA path; ORT's CPU EP runs it too
def test_onnxruntime_verbs_match_eager(sdxl, sdxl_onnx, io_binding):
    from sdrt.backends.onnxruntime import OnnxRuntimeBackend

    eager = make_backend("eager", components=sdxl)
    ort = OnnxRuntimeBackend(sdxl_onnx, Precision.FP32, io_binding=io_binding)
    assert "vae_encoder" not in ort.sessions  # opened on first use only
    assert (ort.size_multiple, ort.min_size) == (8, 32)  # from the manifest
    x = sdxl_inputs()

    def close(a, b):  # max error relative to the output's range, as the exporter's check measures it
        return float((a - b).abs().max() / b.abs().max()) < 2e-5

    for k in range(2):
        e, o = eager.text_encoder(k, x["ids"]), ort.text_encoder(k, x["ids"])
        assert all(close(o[name], e[name]) for name in ("last_hidden_state", "pooled_output",
                                                        "penultimate_hidden_state"))
    args = (x["sample"], x["timestep"], x["ehs"], x["text_embeds"], x["time_ids"])
    assert close(ort.unet(*args), eager.unet(*args))
    assert close(ort.vae_decoder(x["latent"]), eager.vae_decoder(x["latent"]))
    assert close(ort.vae_encoder(x["image"]), eager.vae_encoder(x["image"]))
    assert ort.unet(*args).dtype == torch.float32 and ort.unet(*args).device.type == "cpu"


def test_onnxruntime_session_options(sdxl_onnx):
    import os

    import onnxruntime

    from sdrt.backends.onnxruntime import physical_cores

    be = make_backend("onnxruntime", onnx_dir=sdxl_onnx)
    assert be.options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert be.options.intra_op_num_threads == physical_cores() <= os.cpu_count()
    assert be.providers == ["CPUExecutionProvider"] and not be.io_binding
    # idle ORT threads must not spin on the cores torch uses between UNet calls (and a bench's next row)
    assert be.options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_onnxruntime_errors(tmp_path, sdxl_onnx):
    with pytest.raises(SdrtError, match="needs an ONNX directory"):
        make_backend("onnxruntime", onnx_dir=tmp_path)
    with pytest.raises(SdrtError, match="fp32 export, not fp16"):
        make_backend("onnxruntime:fp16", onnx_dir=sdxl_onnx)
    with pytest.raises(SdrtError, match="other weights"):
        make_backend("onnxruntime", components=load_model("tiny-sdxl", seed=1), onnx_dir=sdxl_onnx)


def test_onnx_cache_exports_once_and_reuses(monkeypatch, tmp_path):
    from sdrt.export import onnx_export

    from sdrt.backends import onnxruntime as ort_backend

    monkeypatch.setenv("SDRT_CACHE", str(tmp_path))
    c = load_model("tiny")
    calls = []
    real = onnx_export.export_model
    monkeypatch.setattr(onnx_export, "export_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = ort_backend.ensure_onnx(c, Precision.FP32)
    assert first == tmp_path / "onnx" / f"{c.source_hash[:16]}-fp32" and len(calls) == 1
    assert ort_backend.ensure_onnx(c, Precision.FP32) == first and len(calls) == 1  # cached
    (first / "unet.onnx").write_bytes(b"truncated")  # a damaged cache is re-exported, not trusted
    ort_backend.ensure_onnx(c, Precision.FP32)
    assert len(calls) == 2
    backend = make_backend("onnxruntime", components=c)  # no onnx_dir: the cache
    assert backend.onnx_dir == first and len(calls) == 2


def test_ensure_onnx_never_overwrites_a_foreign_export(sdxl, sdxl_onnx):
    from sdrt.backends.onnxruntime import ensure_onnx

    before = (sdxl_onnx / "manifest.json").read_bytes()
    with pytest.raises(SdrtError, match="holds a fp32 export, not int8"):
        ensure_onnx(sdxl, Precision.INT8, sdxl_onnx)
    with pytest.raises(SdrtError, match="export of other weights"):
        ensure_onnx(load_model("tiny-sdxl", seed=1), Precision.FP32, sdxl_onnx)
    assert (sdxl_onnx / "manifest.json").read_bytes() == before
    assert ensure_onnx(sdxl, Precision.FP32, sdxl_onnx) == sdxl_onnx  # its own export is reused as it is


def _edited_export(sdxl_onnx, tmp_path, edit):
    import json
    import shutil

    d = tmp_path / "edited"
    shutil.copytree(sdxl_onnx, d)
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _swap(m, a, b):
    m["components"][a], m["components"][b] = m["components"][b], m["components"][a]


def _set_bounds(m, **kw):  # where the exporter put them: the model entry, or the top level
    (m if "min_size" in m else m["model"]).update(kw)


@pytest.mark.parametrize("edit, match", [
    (lambda m: _swap(m, "unet", "vae_decoder"), r"vae_decoder\.onnx: takes latent, not the unet's inputs"),
    (lambda m: _set_bounds(m, min_size="abc"), "the manifest's min_size is 'abc', not a multiple of 8"),
    (lambda m: _set_bounds(m, size_multiple=12), "size_multiple is 12"),
], ids=["swapped graphs", "min_size a string", "size_multiple 12"])
def test_a_hand_edited_manifest_is_a_clear_error(sdxl, sdxl_onnx, tmp_path, edit, match):
    # each was an internal error (KeyError 'latent', ValueError) once
    d = _edited_export(sdxl_onnx, tmp_path, edit)
    with pytest.raises(SdrtError, match=match):
        x = sdxl_inputs()
        make_backend("onnxruntime", onnx_dir=d).unet(x["sample"], x["timestep"], x["ehs"], x["text_embeds"],
                                                     x["time_ids"])


def test_an_onnx_dir_that_is_a_file_is_refused_before_any_work(sdxl, tmp_path, capsys):
    from sdrt.backends.onnxruntime import ensure_onnx

    (tmp_path / "afile").write_text("x")
    with pytest.raises(SdrtError, match="--onnx-dir .*afile is a file, not a directory"):
        ensure_onnx(sdxl, Precision.FP32, tmp_path / "afile", log=print)
    assert capsys.readouterr().out == ""  # no "exporting ..." line before the error
