"""Shared tiny models and exports: each export runs once per session (tiny: ~10 s, the rest a few seconds each)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny():
    from sdrt.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from sdrt.models import load_model

    return load_model("tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd2():
    from sdrt.models import load_model

    return load_model("tiny-sd2")


def _export(c, tmp_path_factory, **kw):
    from sdrt.export.onnx_export import export_model

    out = tmp_path_factory.mktemp(f"{c.name}-{kw.get('precision', 'fp32')}")
    return export_model(c, out, progress=False, **kw), out


@pytest.fixture(scope="session")
def tiny_fp32(tiny, tmp_path_factory):
    """(manifest, dir) of `tiny`, every component, fp32."""
    return _export(tiny, tmp_path_factory)


@pytest.fixture(scope="session")
def sdxl_fp32(tiny_sdxl, tmp_path_factory):
    return _export(tiny_sdxl, tmp_path_factory)


@pytest.fixture(scope="session")
def sd2_fp16(tiny_sd2, tmp_path_factory):
    return _export(tiny_sd2, tmp_path_factory, precision="fp16")


@pytest.fixture(scope="session")
def sdxl_fp16(tiny_sdxl, tmp_path_factory):
    """SDXL in fp16: only the UNet (fp32 time ids) and the VAE decoder (stays fp32: force_upcast)."""
    return _export(tiny_sdxl, tmp_path_factory, precision="fp16", components=["unet", "vae_decoder"])
