"""TensorRT backend. Without TensorRT: the one-line refusal and import hygiene. With TensorRT and a GPU (the GPU
suite): real builds of the toy graphs, every verb against onnxruntime, CUDA-graph replay, profile errors, refit."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sdrt.backends.tensorrt import INSTALL_HINT, TensorRTBackend, component_name, create, tensorrt_available
from sdrt.errors import SdrtError

HAVE_TRT, WHY = tensorrt_available()
gpu = pytest.mark.skipif(not HAVE_TRT, reason=WHY)


def test_importing_is_free_of_heavy_modules():
    code = ("import sys, sdrt.backends.tensorrt, sdrt.export.trt_build, sdrt.export.trt_builder, "
            "sdrt.export.build_cli, sdrt.cli\n"
            "print([m for m in ('torch', 'onnx', 'tensorrt', 'diffusers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_availability_is_a_reason_not_an_exception():
    ok, why = tensorrt_available()
    assert isinstance(ok, bool) and why and "\n" not in why


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is importable here")
def test_backend_without_tensorrt_says_how_to_install(tmp_path):
    with pytest.raises(SdrtError) as e:
        TensorRTBackend(tmp_path)
    assert str(e.value) == INSTALL_HINT and "pip install tensorrt" in str(e.value)


def test_create_needs_an_export_directory(tmp_path):
    with pytest.raises(SdrtError, match="runs engines from `sdrt build ONNX_DIR`: pass the export directory"):
        create(None, components=None, onnx_dir=None)
    if not HAVE_TRT:
        with pytest.raises(SdrtError, match="pip install tensorrt"):
            create(None, onnx_dir=tmp_path)


def test_text_encoder_component_names():
    assert [component_name(i) for i in range(2)] == ["text_encoder", "text_encoder_2"]


# --- with TensorRT and a CUDA GPU --------------------------------------------------------------------------

def _ort(onnx_dir, component, feeds):
    import onnxruntime as ort

    m = json.loads((onnx_dir / "manifest.json").read_text())
    sess = ort.InferenceSession(str(onnx_dir / m["components"][component]["file"]))
    return dict(zip([o.name for o in sess.get_outputs()],
                    sess.run(None, {k: v.cpu().numpy() for k, v in feeds.items()})))


@gpu
def test_real_engines_match_onnxruntime(tmp_path, make_onnx_dir):
    import torch
    from sdrt.export.trt_build import BuildOptions, build_engines
    from sdrt.export.trt_builder import TensorRTBuilder
    from sdrt.export.trt_profiles import parse_profiles

    onnx_dir, engines = make_onnx_dir(tmp_path / "onnx"), tmp_path / "engines"
    options = BuildOptions(precision="fp32", profiles=parse_profiles(["64x64@1-2", "128x96@1"], 64), opt_level=0,
                           refittable=True)
    build_engines(onnx_dir, engines, options, TensorRTBuilder())
    be = TensorRTBackend(engines)
    g = torch.Generator().manual_seed(0)
    for batch, h, w in [(2, 64, 64), (1, 128, 96), (2, 64, 64)]:  # the repeat replays the captured graph
        ids = torch.randint(0, 900, (batch, 77), generator=g)
        out = be.text_encoder(0, ids)
        ref = _ort(onnx_dir, "text_encoder", {"input_ids": ids})
        np.testing.assert_allclose(out["last_hidden_state"].cpu().numpy(), ref["last_hidden_state"], atol=1e-5)
        feeds = {"sample": torch.randn(2 * batch, 4, h // 8, w // 8, generator=g),
                 "timestep": torch.full((2 * batch,), 500.0), "encoder_hidden_states": torch.randn(2 * batch, 77, 8)}
        out = be.unet(**{k: v.cuda() for k, v in feeds.items()})
        np.testing.assert_allclose(out.cpu().numpy(), _ort(onnx_dir, "unet", feeds)["noise_pred"], atol=1e-4)
        latent = torch.randn(batch, 4, h // 8, w // 8, generator=g)
        np.testing.assert_allclose(be.vae_decoder(latent.cuda()).cpu().numpy(),
                                   _ort(onnx_dir, "vae_decoder", {"latent": latent})["image"], atol=1e-4)
        image = torch.rand(batch, 3, h, w, generator=g) * 2 - 1
        np.testing.assert_allclose(be.vae_encoder(image.cuda()).cpu().numpy(),
                                   _ort(onnx_dir, "vae_encoder", {"image": image})["latent"], atol=1e-3)
    assert len(be.engines["unet"].slots) == 2 and all(s.graph is not None for s in be.engines["unet"].slots.values())
    with pytest.raises(SdrtError, match=r"fits none of the engine's profiles \(64x64@1-2, 128x96@1\)"):
        be.vae_decoder(torch.randn(1, 4, 20, 20, device="cuda"))
    # new weights, same graph: refit, and the refit engine computes with the new weights
    new_dir = make_onnx_dir(tmp_path / "onnx", seeds={"unet": 9})
    records = build_engines(new_dir, engines, options, TensorRTBuilder())
    assert {r.component: r.decision.action.value for r in records}["unet"] == "refit"
    feeds = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.full((2,), 1.0),
             "encoder_hidden_states": torch.randn(2, 77, 8)}
    out = TensorRTBackend(engines).unet(**{k: v.cuda() for k, v in feeds.items()})
    np.testing.assert_allclose(out.cpu().numpy(), _ort(new_dir, "unet", feeds)["noise_pred"], atol=1e-4)
