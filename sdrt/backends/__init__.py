"""Backends: one small object per runtime with the pipeline's four verbs, chosen by the one dict below.

Every backend has `name`, `device`, `dtype`, `size_multiple` (heights and widths must be multiples of it) and
    text_encoder(index, input_ids) -> {ONNX output name: tensor}
    unet(sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None) -> noise_pred
    vae_decoder(latent) -> image in [-1, 1], un-clamped            (latent already divided by vae_scale)
    vae_encoder(image) -> moments (mean ‖ logvar), (B, 8, H/8, W/8) (sampled and scaled by the pipeline)
and optionally denoise(latents, embeds, sched, guidance, text_embeds, time_ids, noise) -> final latents, which
takes over the whole scheduler loop (sdrt.loop; the torch backend captures it in one CUDA graph).
All tensors are torch tensors; a backend converts to numpy or binds device memory itself.

A spec is `NAME[:PRECISION]`, e.g. `eager`, `onnxruntime:fp16`, `auto`. A module is imported only when chosen, so a
backend whose runtime is not installed (or not written yet) fails with a one-line SdrtError, never at import.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
from dataclasses import dataclass

from sdrt.errors import SdrtError


class Backend(str, enum.Enum):
    EAGER = "eager"              # the PyTorch modules as loaded: the baseline every other backend is compared to
    ONNXRUNTIME = "onnxruntime"  # the exporter's ONNX graphs in ONNX Runtime (CPU, or CUDA with IO binding)
    TORCH = "torch"              # optimized PyTorch: sdrt's kernels and passes, the loop as one CUDA graph
    TENSORRT = "tensorrt"        # TensorRT engines built from the ONNX graphs
    OPENVINO = "openvino"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"

    @property
    def torch_dtype(self):
        import torch

        # int8 quantizes weights; activations (and so the tensors the pipeline sees) stay fp16.
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float16}[self.value]


# The one place a backend name becomes code. Each module defines
# `create(precision or None, components=None, onnx_dir=None, device=None)` returning the backend object.
MODULES = {
    Backend.EAGER: "sdrt.backends.eager",
    Backend.ONNXRUNTIME: "sdrt.backends.onnxruntime",
    Backend.TORCH: "sdrt.backends.torch_opt",
    Backend.TENSORRT: "sdrt.backends.tensorrt",
    Backend.OPENVINO: "sdrt.backends.openvino",
}


@dataclass(frozen=True)
class BackendSpec:
    backend: Backend
    precision: Precision | None = None  # None: the backend's own default (fp32 for eager and onnxruntime)

    def __str__(self) -> str:
        return self.backend.value + (f":{self.precision.value}" if self.precision else "")


def parse_spec(spec: str, device=None) -> BackendSpec:
    """'NAME[:PRECISION]' -> BackendSpec; 'auto' resolves to the fastest backend available on `device`."""
    name, _, precision = str(spec).strip().lower().partition(":")
    if name == "auto":
        backend = auto_backend(device)
    else:
        try:
            backend = Backend(name)
        except ValueError:
            raise SdrtError(f"unknown backend {name!r}; choose auto or one of: "
                            f"{', '.join(b.value for b in Backend)}") from None
    try:
        prec = Precision(precision) if precision else None
    except ValueError:
        raise SdrtError(f"unknown precision {precision!r} in backend spec {spec!r}; choose one of: "
                        f"{', '.join(p.value for p in Precision)}") from None
    return BackendSpec(backend, prec)


def auto_backend(device=None) -> Backend:
    """The fastest backend available here, measured (benchmarks/results/):
    - on a CUDA GPU, `torch`: fp16, sdrt's Triton kernels, the whole loop as one CUDA graph (sd15 512^2 at 50 steps
      on an H100: 4.4x diffusers' fp16 pipeline, 3.6x eager fp16). It needs Triton; without it, ONNX Runtime's CUDA
      provider if installed, else eager. TensorRT needs engines built first (`sdrt build`), so it is asked for by name.
    - on CPU, ONNX Runtime: its fused CPU kernels beat eager PyTorch, with fp32's accuracy (OpenVINO's bf16 default
      is faster still on CPUs with bf16 units, at 48 dB from fp32: asked for by name)."""
    on_gpu = default_device(device).type == "cuda"
    if on_gpu and importlib.util.find_spec("triton") is not None:
        return Backend.TORCH
    try:
        import onnxruntime
    except ImportError:
        return Backend.EAGER
    if on_gpu and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return Backend.EAGER
    return Backend.ONNXRUNTIME


def _module(spec: BackendSpec):
    try:
        return importlib.import_module(MODULES[spec.backend])
    except ImportError as e:
        raise SdrtError(f"backend {spec.backend.value} is not available: {e}") from None


def make_backend(spec: str | BackendSpec, components=None, onnx_dir=None, device=None):
    """Build the backend named by `spec` over `components` (PyTorch modules) and/or `onnx_dir` (exported graphs)."""
    if not isinstance(spec, BackendSpec):
        spec = parse_spec(spec, device)
    return _module(spec).create(spec.precision, components=components, onnx_dir=onnx_dir, device=device)


def preflight(spec: BackendSpec, device=None) -> None:
    """What a backend can refuse without a model (its runtime missing, a precision or device it does not run), for
    callers to ask before they load or export one. A module may define `preflight(precision, device)`."""
    module = _module(spec)
    if hasattr(module, "preflight"):
        module.preflight(spec.precision, device)


def default_device(device=None):
    """The device a backend runs on: the one asked for, else CUDA when present, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise SdrtError(f"unknown device {device!r} (cpu, cuda or cuda:N)") from None
    if d.type not in ("cpu", "cuda"):
        raise SdrtError(f"device {device!r}: sdrt runs on cpu or cuda")
    if d.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise SdrtError(f"device {device!r}: {why}")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise SdrtError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ..)")
    return d
