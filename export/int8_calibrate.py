"""Calibration for int8: record the UNet's real inputs along denoising trajectories, then measure activation ranges.

1. `record_unet_inputs`: the fp32 eager pipeline runs the calibration prompts; a recording backend keeps every
   UNet call's inputs (CFG batch [uncond; cond], the scheduler's timesteps, the text embeddings). Activations at
   t=999 (pure noise) and t~0 (an almost clean latent) differ by several x in range, so calibrating on random
   tensors or a single step misses both ends. Calls are then subsampled evenly to `max_samples`.
2. `collect_ranges`: the fp32 ONNX UNet, with the activations to be quantized added as graph outputs, runs each
   recorded call once in ONNX Runtime; per tensor and per call we keep min, max and the two-sided percentile
   (from top-k, so nothing is stored per element). `ranges_for(stats, recipe)` combines them as the recipe says.
Everything is seeded: the same model, prompts and settings give the same ranges, hence the same graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.errors import SdrtError

# Varied subjects, styles and compositions (portrait, landscape, text-heavy, abstract, night, macro...), so the
# activations cover more than one kind of image. Short: the tokenizer pads all of them to 77 tokens anyway.
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old fisherman, dramatic lighting, 85mm",
    "a bowl of ramen on a wooden table, top view",
    "futuristic city skyline at night, neon lights, rain",
    "a red fox in a snowy forest",
    "isometric pixel art of a cozy bedroom",
    "macro shot of a dew drop on a leaf",
    "an oil painting of a stormy sea in the style of turner",
    "a minimalist logo of a mountain, flat vector",
    "a crowded market street in marrakech, golden hour",
    "abstract swirling colors, fluid art",
)


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file; anything else is a one-line SdrtError."""
    p = Path(path).expanduser()
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SdrtError(f"calibration prompts file {p}: no such file") from None
    except IsADirectoryError:
        raise SdrtError(f"calibration prompts file {p}: is a directory") from None
    except OSError as e:
        raise SdrtError(f"calibration prompts file {p}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SdrtError(f"calibration prompts file {p}: not UTF-8 text (one prompt per line)") from None
    if "\x00" in text:
        raise SdrtError(f"calibration prompts file {p}: binary data, expected one prompt per line")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SdrtError(f"calibration prompts file {p}: no prompts (one per line)")
    return prompts


def resolve_prompts(prompts) -> list[str]:
    """None: DEFAULT_PROMPTS; a path: read_prompts(path); else a non-empty list of strings."""
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise SdrtError("calibration prompts must be a non-empty list of non-empty strings")
    return prompts


class RecordingBackend:
    """The eager backend's verbs, recording every unet(...) call's inputs as numpy arrays (ONNX input names)."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self.name, self.device, self.dtype = backend.name, backend.device, backend.dtype
        self.size_multiple = getattr(backend, "size_multiple", 8)

    def text_encoder(self, index, input_ids):
        return self.backend.text_encoder(index, input_ids)

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        if text_embeds is not None:
            feeds.update(text_embeds=text_embeds, time_ids=time_ids)
        self.calls.append({k: v.detach().float().cpu().numpy().copy() for k, v in feeds.items()})
        return self.backend.unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids)

    def vae_decoder(self, latent):
        return self.backend.vae_decoder(latent)

    def vae_encoder(self, image):
        return self.backend.vae_encoder(image)


def check_max_samples(max_samples) -> None:
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
        raise SdrtError(f"max_samples must be an integer >= 2 (the first and last UNet calls are kept), got "
                        f"{max_samples!r}")


def record_unet_inputs(components, prompts, steps: int, size: int, seed: int = 0, guidance: float | None = None,
                       scheduler: str | None = None, max_samples: int = 32) -> list[dict]:
    """UNet input feeds from denoising `prompts` with the fp32 eager pipeline, `steps` steps each at size x size
    pixels (seed + i for prompt i), evenly subsampled to at most `max_samples` calls (first and last kept)."""
    from sdrt.backends.eager import EagerBackend
    from sdrt.pipeline import GenerationRequest, Pipeline

    rec = RecordingBackend(EagerBackend(components))
    pipe = Pipeline.from_components(components, rec)
    for i, prompt in enumerate(prompts):
        pipe.generate(GenerationRequest(prompt=prompt, steps=steps, guidance=guidance, scheduler=scheduler,
                                        seed=seed + i, height=size, width=size))
    check_max_samples(max_samples)
    calls = rec.calls
    if len(calls) > max_samples:
        keep = np.unique(np.linspace(0, len(calls) - 1, max_samples).round().astype(int))
        calls = [calls[k] for k in keep]
    return calls


# ---- activation ranges ---------------------------------------------------------------------------------------------

@dataclass
class RangeStats:
    """Per calibrated tensor, one row per calibration call: min, max, low and high percentile."""

    names: list[str]
    percentile: float
    mins: np.ndarray   # (calls, tensors) float32
    maxs: np.ndarray
    lows: np.ndarray
    highs: np.ndarray
    timesteps: list[float]


def tensors_to_calibrate(model, recipe, excluded: dict) -> list[str]:
    """Activation tensors the quantizer will put Q/DQ on: inputs (not weights) and outputs of the quantized nodes."""
    inits = {t.name for t in model.graph.initializer}
    names = []
    for n in model.graph.node:
        if n.op_type in recipe.op_types and n.name not in excluded:
            ins = [n.input[0]] if n.op_type != "MatMul" else list(n.input[:2])
            outs = [] if n.op_type in recipe.float_outputs else [n.output[0]]
            names += [t for t in ins + outs if t and t not in inits]
    return list(dict.fromkeys(names))


def collect_ranges(onnx_path, feeds: list[dict], names: list[str], percentile: float = 99.99,
                   threads: int | None = None) -> RangeStats:
    """Run the fp32 graph at `onnx_path` once per feed with `names` as extra outputs and keep their ranges."""
    import onnx
    import onnxruntime as ort
    import torch

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in names if t not in known)
    stats = {k: np.zeros((len(feeds), len(names)), np.float32) for k in ("mins", "maxs", "lows", "highs")}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    # the augmented graph goes to ORT as bytes and its weights are read from the original folder: no 3.4 GB copy
    # (ORT and onnx refuse symlinked weight files)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(onnx_path.parent))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del model
    inputs = [i.name for i in sess.get_inputs()]
    for c, feed in enumerate(feeds):
        outs = sess.run(names, {k: feed[k] for k in inputs})
        for j, arr in enumerate(outs):
            x = torch.from_numpy(arr).reshape(-1)
            # two-sided percentile from the k most extreme values on each side (k = 0.5 * (100 - p) % of n)
            k = min(x.numel(), max(1, int(round(x.numel() * (100.0 - percentile) / 200.0)) + 1))
            hi, lo = torch.topk(x, k).values, torch.topk(x, k, largest=False).values
            stats["maxs"][c, j], stats["highs"][c, j] = hi[0], hi[-1]
            stats["mins"][c, j], stats["lows"][c, j] = lo[0], lo[-1]
        del outs
    timesteps = [float(f["timestep"].reshape(-1)[0]) for f in feeds]
    return RangeStats(names, percentile, timesteps=timesteps, **stats)


def ranges_for(stats: RangeStats, recipe) -> dict[str, tuple[float, float]]:
    """{tensor: (low, high)} as the recipe combines the per-call ranges; always containing 0 (the quantizer's
    zero point must be representable) and never empty."""
    lo, hi = (stats.mins, stats.maxs) if recipe.calibration == "minmax" else (stats.lows, stats.highs)
    if recipe.percentile != stats.percentile and recipe.calibration == "percentile":
        raise SdrtError(f"ranges were collected at percentile {stats.percentile}, the recipe wants "
                        f"{recipe.percentile}")
    if recipe.combine == "mean":
        lows, highs = lo.mean(axis=0), hi.mean(axis=0)
    else:
        lows, highs = lo.min(axis=0), hi.max(axis=0)
    out = {}
    for name, a, b in zip(stats.names, lows, highs):
        if not (np.isfinite(a) and np.isfinite(b)):  # min(nan, 0.0) is nan: it would become the scale
            raise SdrtError(f"calibration range of {name} is not finite ({a}, {b}): the fp32 UNet overflows on the "
                            "calibration inputs; check the model in fp32 first")
        a, b = min(float(a), 0.0), max(float(b), 0.0)
        if recipe.activations == "s8":  # symmetric: zero point 0, the range is +-amax
            a, b = -max(-a, b), max(-a, b)
        if b - a < 1e-8:
            b = a + 1e-8
        out[name] = (a, b)
    return out
