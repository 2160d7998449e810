"""OpenVINO backend: our exporter's ONNX graphs compiled by OpenVINO for the CPU.

It reads the same fp32 ONNX folder as the onnxruntime backend (`sdrt export MODEL -o DIR`), so it doubles as the
OpenVINO peer row in `sdrt bench`. Precision is OpenVINO's INFERENCE_PRECISION_HINT, not a different graph:
  openvino       OpenVINO's own default for the CPU: bf16 on CPUs with AVX512-BF16 or AMX, f32 elsewhere
  openvino:bf16  bf16 matmuls/convolutions, f32 I/O (errors out on a CPU without bf16: it would silently be f32)
  openvino:fp32  f32 everywhere: the graph as exported, for drift checks
Each graph is reshaped to the static input shapes of its first call and compiled then (OpenVINO's advice for SD on
CPUs: fixed shapes let it pick blocked layouts and plan memory once). On sd15 at 256x256, CFG batch 2, a static UNet
step was 7-12% faster than the dynamic-shape compile (bf16, two interleaved A/B runs). A new shape compiles again
(~10 s for sd15's UNet) and each compiled shape holds its own copy of the weights, so at most MAX_SHAPES are kept
per graph. `static_shapes=False` compiles once with the dynamic axes left dynamic instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdrt.errors import SdrtError

# ONNX component file per verb; text encoder `index` 1 is SDXL's second encoder.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# The ONNX contract's output names per graph; ports can carry internal names beside these.
OUTPUTS = {"text_encoder": {"last_hidden_state", "pooled_output", "penultimate_hidden_state"},
           "text_encoder_2": {"last_hidden_state", "pooled_output", "penultimate_hidden_state"},
           "unet": {"noise_pred"}, "vae_decoder": {"image"}, "vae_encoder": {"latent"}}
# sdrt precision -> INFERENCE_PRECISION_HINT. int8 runs the Q/DQ export: its quantized convolutions and matmuls
# run as int8 (OpenVINO reads Q/DQ natively), the rest at OpenVINO's default (bf16 here).
HINTS = {None: None, "fp32": "f32", "bf16": "bf16", "int8": None}
MAX_SHAPES = 3  # static mode: compiled shapes kept per graph, oldest dropped first


def cpu_precision_default() -> str:
    """What bare `openvino` runs at here: OpenVINO's INFERENCE_PRECISION_HINT default, as an sdrt name."""
    import openvino as ov

    hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32" or "f16"
    return {"bf16": "bf16", "f16": "fp16"}.get(hint, "fp32")


def preflight(precision=None, device=None):
    """The checks that need no model (device, OpenVINO installed, precision and the CPU's support for it): the CLI
    runs them before it loads or exports a model, so a wrong spec fails in a second, not after an export.
    Returns the ov.Core."""
    if device is not None:
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError):
            raise SdrtError(f"unknown device {device!r} (cpu, cuda or cuda:N)") from None
        if kind != "cpu":
            raise SdrtError(f"the openvino backend runs on the CPU, not {device}")
    try:
        import openvino as ov
    except ImportError:
        raise SdrtError("the openvino backend needs OpenVINO: pip install 'sdrt[openvino]'") from None
    precision = getattr(precision, "value", precision)
    if precision not in HINTS:
        raise SdrtError(f"openvino runs fp32, bf16 or int8 on the CPU, not {precision}")
    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise SdrtError("openvino:bf16 needs a CPU with bf16 units (AVX512-BF16, AMX or AVX2-VNNI-2); this one has "
                        "none")
    return core


def create(precision=None, components=None, onnx_dir=None, device=None) -> OpenVINOBackend:
    """The backends' factory signature. precision None keeps OpenVINO's default (see the top of this file)."""
    if onnx_dir is None:
        raise SdrtError("the openvino backend reads an ONNX export: run `sdrt export MODEL -o DIR` and pass DIR")
    preflight(precision, device)
    return OpenVINOBackend(onnx_dir, precision, expect_hash=getattr(components, "source_hash", None))


class _Graph:
    """One ONNX graph compiled for the CPU: torch tensors in, torch tensors out (named by the ONNX outputs)."""

    def __init__(self, core, path: Path, config: dict, static_shapes: bool, outputs: set[str]):
        self.core, self.path, self.config, self.outputs = core, path, config, outputs
        self.by_shape: dict[tuple, tuple] = {}  # static mode: input shapes -> (compiled model, infer request)
        # Dynamic mode compiles straight from the file, so no second copy of the weights stays behind in an ov.Model.
        self.dynamic = None if static_shapes else self._compile(None)

    def _compile(self, shapes: dict | None) -> tuple:
        try:
            model = str(self.path)
            if shapes:
                model = self.core.read_model(model)
                takes = sorted(n for port in model.inputs for n in port.get_names())
                if not set(shapes) <= set(takes):  # a manifest naming another graph for this component
                    raise SdrtError(f"{self.path}: takes {', '.join(takes)}, not the inputs given "
                                    f"({', '.join(shapes)}); re-export")
                model.reshape(shapes)
            compiled = self.core.compile_model(model, "CPU", self.config)
            return compiled, compiled.create_infer_request()
        except RuntimeError as e:  # OpenVINO's: "Exception from src/...cpp:N:" then the reason, on later lines
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = next((line for line in lines if not line.startswith("Exception from")), type(e).__name__)
            raise SdrtError(f"{self.path}: OpenVINO cannot load it: {reason}") from None

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.dynamic:
            compiled, request = self.dynamic
        else:
            key = tuple((n, tuple(t.shape)) for n, t in sorted(inputs.items()))
            if key not in self.by_shape:
                if len(self.by_shape) >= MAX_SHAPES:
                    self.by_shape.pop(next(iter(self.by_shape)))
                self.by_shape[key] = self._compile({n: list(shape) for n, shape in key})
            compiled, request = self.by_shape[key]
        # numpy in the graph's own element types (int64 ids, f32 tensors), in the graph's input order. A port can
        # carry several tensor names once OpenVINO has folded a reshaped graph, so match on the set of them.
        arrays = [inputs[_name(p, inputs)].detach().cpu().numpy().astype(p.get_element_type().to_dtype(), copy=False)
                  for p in compiled.inputs]
        result = request.infer(arrays, share_inputs=True)  # outputs come back as fresh copies (share_outputs=False)
        return {_name(p, self.outputs): torch.from_numpy(result[p]) for p in compiled.outputs}


def _name(port, contract) -> str:
    """The port's name among the contract's I/O names (a port may carry internal tensor names too)."""
    names = port.get_names() & set(contract)
    if not names:
        raise SdrtError(f"the OpenVINO graph has a port {port.get_any_name()} that is not one of {', '.join(contract)}")
    return names.pop()


class OpenVINOBackend:
    name = "openvino"

    def __init__(self, onnx_dir: str | Path, precision=None, static_shapes: bool = True,
                 expect_hash: str | None = None):
        from sdrt.backends.onnxruntime import size_bounds
        from sdrt.export.onnx_manifest import load_manifest, model_components

        core = preflight(precision)
        precision = getattr(precision, "value", precision)
        self.onnx_dir = Path(onnx_dir)
        # File sizes only: hashing a 3.4 GB UNet on every start is too slow. txt2img needs no VAE encoder.
        manifest = load_manifest(self.onnx_dir, require=["unet", "vae_decoder"], verify_hashes=False)
        missing = [c for c in model_components(manifest["model"]) if c not in manifest["components"]
                   and c != "vae_encoder"]
        if missing:
            raise SdrtError(f"{self.onnx_dir}: partial export, missing {', '.join(missing)} (re-run `sdrt export`)")
        wanted = "int8" if precision == "int8" else "fp32"
        if manifest["precision"] != wanted:
            raise SdrtError(f"{onnx_dir}: openvino{':' + precision if precision else ''} reads the {wanted} export "
                            f"(this one is {manifest['precision']})")
        if expect_hash and manifest["model"].get("source_hash") not in (None, expect_hash):
            raise SdrtError(f"{onnx_dir} was exported from other weights than the model given; re-export it")
        self.size_multiple, self.min_size = size_bounds(self.onnx_dir, manifest)
        config = {"PERFORMANCE_HINT": "LATENCY"}  # one request at a time, all cores on it
        if HINTS[precision]:
            config["INFERENCE_PRECISION_HINT"] = HINTS[precision]
        self.precision = precision or cpu_precision_default()
        self.device, self.dtype = torch.device("cpu"), torch.float32  # I/O is f32 whatever runs inside
        self.graphs = {name: _Graph(core, self.onnx_dir / entry["file"], config, static_shapes, OUTPUTS[name])
                       for name, entry in manifest["components"].items() if name in OUTPUTS}

    def _graph(self, name: str) -> _Graph:
        if name not in self.graphs:
            raise SdrtError(f"{self.onnx_dir}: the export has no {name} graph")
        return self.graphs[name]

    def text_encoder(self, index: int, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._graph(TEXT_ENCODERS[index])(input_ids=input_ids)

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None) -> torch.Tensor:
        extra = {} if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self._graph("unet")(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                   **extra)["noise_pred"]

    def vae_decoder(self, latent) -> torch.Tensor:
        return self._graph("vae_decoder")(latent=latent)["image"]

    def vae_encoder(self, image) -> torch.Tensor:
        return self._graph("vae_encoder")(image=image)["latent"]
