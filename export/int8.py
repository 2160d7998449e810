"""`export_int8`: an fp32 ONNX export -> an int8 export whose UNet is an explicit Q/DQ graph, calibrated on real
denoising steps, with a quality gate.

    fp32 export (sdrt export MODEL -o FP32)                 int8 export (OUT)
      unet.onnx ─ record_unet_inputs ─ collect_ranges ─┐      unet.onnx       QuantizeLinear/DequantizeLinear around
      (eager pipeline over calibration prompts)       ├──▶                   convs and linear layers (int8_recipe)
                                      int8_recipe ────┘
      text_encoder, vae_decoder, vae_encoder ───── hard-linked (or copied) ──▶ the same fp32 graphs
      manifest.json ──────────────────────────────────────────────────────────▶ precision "int8", recipe, calibration,
                                                                               quality gate
Only the UNet is quantized: it runs `steps` times per image; the text encoder runs once and the VAE decoder is
sensitive (its error lands directly on pixels). The gate denoises fixed seeds twice, with the fp32 eager UNet and
with the int8 graph (everything else identical), and refuses the export when the decoded images' PSNR is below
`min_psnr` (SdrtError, unless force=True).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from sdrt.export.onnx_export import export_lock

from sdrt.errors import SdrtError

# 30 dB on [0, 1] pixels is an RMS error of 0.032 (8 levels of 255): the same picture with texture-level
# differences. Below it int8 changes composition, not just detail, which a runtime switch must not do silently.
MIN_PSNR_DB = 30.0
# The gate's prompt is held out of DEFAULT_PROMPTS: calibration must not be graded on its own inputs.
GATE_PROMPT = "a cup of coffee on a windowsill, morning light"
TMP_PREFIX = ".sdrt-tmp-"


def export_int8(model, fp32_onnx_dir, out_dir, calibration_prompts=None, calibration_steps: int = 8,
                seed: int = 0, force: bool = False, recipe="ort-cpu", size: int | None = None,
                max_samples: int = 32, min_psnr: float = MIN_PSNR_DB, gate_seeds=(0, 1), gate_steps: int | None = None,
                progress: bool = True) -> dict:
    """Quantize the UNet of the fp32 export in `fp32_onnx_dir` into `out_dir`; returns the new manifest.

    model: MODEL string or fp32 `Components` (its eager pipeline makes the calibration inputs and the gate's
    reference). fp32_onnx_dir: an fp32 `sdrt export` of the same weights; None: the onnxruntime backend's cached
    one (exported first if missing). calibration_prompts: None (DEFAULT_PROMPTS), a file (one prompt per line) or
    a list. calibration_steps: denoising steps per calibration prompt. size: calibration and gate resolution in
    pixels (default: the model's). max_samples: UNet calls kept for calibration (evenly over all trajectories).
    recipe: a name in RECIPES or an Int8Recipe. min_psnr, gate_seeds, gate_steps (default calibration_steps): the
    quality gate. force: write even if the gate fails, and redo an up-to-date export."""
    from sdrt.export.int8_calibrate import check_max_samples, resolve_prompts
    from sdrt.export.int8_recipe import get_recipe
    from sdrt.export.onnx_export import _clean_temp
    from sdrt.export.onnx_manifest import forget, load_manifest, read_manifest, write_manifest

    from sdrt import __version__

    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    recipe, prompts = get_recipe(recipe), resolve_prompts(calibration_prompts)
    for name, v in (("calibration steps", calibration_steps), ("gate steps", gate_steps or 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SdrtError(f"{name} must be an integer >= 1, got {v!r}")
    check_max_samples(max_samples)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # before the fp32 export, which can take minutes
        raise SdrtError(f"{out_dir} is a file, not a directory")
    c = _components(model)
    _check_size(c, size)
    fp32_dir, src = _fp32_source(c, fp32_onnx_dir, say if progress else None)
    if out_dir.resolve() == fp32_dir.resolve():
        raise SdrtError("the int8 export needs its own directory (it links the fp32 graphs it does not change)")
    size = int(size or c.default_size)
    # Everything the result depends on: an export is "up to date" only for the same fp32 graphs and weights (every
    # component's, since the others are linked), calibration, recipe, gate and sdrt.
    settings = {"prompts": prompts, "steps": calibration_steps, "seed": seed, "size": size,
                "max_samples": max_samples, "recipe": recipe.summary(), "source_hash": src["model"]["source_hash"],
                "fp32": {n: [e.get("graph_sha256"), e.get("weights_sha256")] for n, e in src["components"].items()},
                "gate": {"min_psnr": min_psnr, "seeds": [int(s) for s in gate_seeds],
                         "steps": gate_steps or calibration_steps},
                "sdrt_version": __version__}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdrtError(f"cannot create {out_dir}: {e.strerror}") from None
    with export_lock(out_dir, say):
        old = read_manifest(out_dir)
        done = (old or {}).get("int8", {})
        # a forced export that failed its gate is never taken as good by a later run without --force
        if (not force and old and old.get("precision") == "int8" and done.get("settings") == settings
                and done.get("quality_gate", {}).get("passed")):
            try:
                load_manifest(out_dir, require=list(src["components"]))
                say(f"{out_dir}: up to date (same fp32 export, prompts, recipe and gate), nothing to do (--force "
                    "redoes it)")
                return old
            except SdrtError:
                pass

        _clean_temp(out_dir)  # a killed export's copy of the fp32 UNet (3.4 GB for sd15)
        t0 = time.perf_counter()
        tmp = out_dir / f"{TMP_PREFIX}{os.getpid()}-int8"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            say(f"int8 ({recipe.name}): recording {len(prompts)} prompts x {calibration_steps} steps at {size}px "
                f"with the fp32 eager pipeline")
            report = calibrate_and_quantize(c, fp32_dir / src["components"]["unet"]["file"], tmp / "unet.onnx",
                                            prompts, calibration_steps, size, seed, recipe, max_samples, say)
            say(f"  quality gate: {len(gate_seeds)} seeds x {gate_steps or calibration_steps} steps, "
                f"int8 vs fp32 UNet")
            gate = quality(c, tmp / "unet.onnx", seeds=gate_seeds, steps=gate_steps or calibration_steps, size=size)
            gate["min_psnr"] = min_psnr
            gate["passed"] = bool(gate["psnr_db"] >= min_psnr)
            say(f"  image PSNR {gate['psnr_db']:.2f} dB (min over seeds {gate['psnr_min_db']:.2f}), latent max_abs "
                f"{gate['latent_max_abs']:.3g}, rel rms {gate['latent_rel_rms']:.3g}: "
                f"{'pass' if gate['passed'] else 'FAIL'} (>= {min_psnr} dB)")
            if not gate["passed"] and not force:
                raise SdrtError(f"int8 UNet fails the quality gate: image PSNR {gate['psnr_db']:.1f} dB < "
                                f"{min_psnr} dB vs fp32 after {gate['steps']} steps (--force writes it anyway)")
            if old is not None:  # _write replaces every file: no old entry may vouch for one of them meanwhile
                forget(out_dir, old, list(old["components"]))
            manifest = _write(src, fp32_dir, out_dir, tmp, report, gate, settings, time.perf_counter() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_manifest(out_dir, manifest)
        say(f"wrote {out_dir / 'manifest.json'} in {time.perf_counter() - t0:.1f} s")
        return manifest


def _check_size(c, size: int | None) -> None:
    from sdrt.export.onnx_specs import size_bounds

    from sdrt.pipeline import MAX_SIZE

    lo = size_bounds(c)["min_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size % 8
                             or not lo <= size <= MAX_SIZE):
        raise SdrtError(f"calibration size must be a multiple of 8 in [{lo}, {MAX_SIZE}] for {c.name}, got {size!r}")


def calibrate_and_quantize(c, fp32_unet, out_unet, prompts, steps, size, seed, recipe, max_samples=32,
                           say=lambda s: None) -> dict:
    """Record, calibrate and write the Q/DQ UNet to `out_unet`; returns the calibration summary."""
    from collections import Counter

    import onnx
    from sdrt.export.int8_calibrate import collect_ranges, ranges_for, record_unet_inputs, tensors_to_calibrate
    from sdrt.export.int8_recipe import excluded_nodes

    from sdrt.backends.onnxruntime import physical_cores

    t0 = time.perf_counter()
    feeds = record_unet_inputs(c, prompts, steps, size, seed=seed, max_samples=max_samples)
    graph = onnx.load(str(fp32_unet), load_external_data=False)
    _name_nodes(graph)
    excluded = excluded_nodes(graph, recipe)
    names = tensors_to_calibrate(graph, recipe, excluded)
    t1 = time.perf_counter()
    say(f"  {len(feeds)} UNet calls recorded in {t1 - t0:.1f} s; calibrating {len(names)} activations "
        f"({len(excluded)} nodes kept fp32)")
    stats = collect_ranges(fp32_unet, feeds, names, recipe.percentile, threads=physical_cores())
    t2 = time.perf_counter()
    quantize(fp32_unet, out_unet, ranges_for(stats, recipe), excluded, recipe)
    t3 = time.perf_counter()
    say(f"  ranges in {t2 - t1:.1f} s, Q/DQ graph in {t3 - t2:.1f} s")
    return {"calls": len(feeds), "timesteps": sorted({round(x, 3) for x in stats.timesteps}),
            "activations": len(names), "kept_fp32": dict(Counter(why.split(":")[0] for why in excluded.values())),
            "record_s": round(t1 - t0, 1), "calibrate_s": round(t2 - t1, 1), "quantize_s": round(t3 - t2, 1)}


def quantize(fp32_unet, out_unet, ranges: dict, excluded: dict, recipe) -> None:
    """quantize_static over precomputed ranges (passed as its calibration cache): QDQ format, per-channel int8
    weights, the recipe's activation type, the excluded nodes left in float."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    graph = onnx.load(str(fp32_unet), load_external_data=False)
    external = any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
                   for t in graph.graph.initializer)
    s8 = recipe.activations == "s8"
    extra = {"ActivationSymmetric": s8, "WeightSymmetric": True,
             # ORT's own const-B test follows Reshape shape constants; the recipe's exclusions are the real filter
             "MatMulConstBOnly": True,
             "OpTypesToExcludeOutputQuantization": list(recipe.float_outputs),
             # TensorRT takes float biases (it fuses them in float); ORT's QLinearConv wants int32 ones
             "QuantizeBias": not s8}
    # quantize_static reads its input with onnx, which refuses weight files that are symlinks or hard links (a
    # shared export cache links them) and writes `<name>-inferred.onnx` beside it: give it a private copy, graph
    # with named nodes, next to the output (same file system).
    with tempfile.TemporaryDirectory(prefix="sdrt-int8-", dir=Path(out_unet).parent) as tmp:
        cache = Path(tmp) / "ranges.json"
        data = {k: (np.float32(a), np.float32(b)) for k, (a, b) in sorted(ranges.items())}
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        _name_nodes(graph)
        model_path = Path(tmp) / Path(fp32_unet).name
        onnx.save_model(graph, str(model_path))
        for t in graph.graph.initializer if external else ():
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and not (Path(tmp) / loc).exists():
                shutil.copyfile(Path(fp32_unet).parent / loc, Path(tmp) / loc)
        quantize_static(str(model_path), str(out_unet), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(recipe.op_types), per_channel=recipe.per_channel,
                        activation_type=QuantType.QInt8 if s8 else QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=sorted(excluded), calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=external, extra_options=extra, calibration_cache_path=str(cache))


def quality(c, int8_unet, seeds=(0, 1), steps: int = 8, size: int | None = None, prompt: str | None = None,
            threads: int | None = None) -> dict:
    """int8 vs fp32 after a full denoise: the eager fp32 pipeline, then the same with the UNet replaced by the
    int8 graph in ONNX Runtime. Returns PSNR of the decoded images (pixels in [0, 1]; mean over seeds and the
    worst seed) and the final latents' max-abs and relative RMS error."""
    import onnxruntime as ort

    from sdrt.backends.eager import EagerBackend
    from sdrt.backends.onnxruntime import physical_cores
    from sdrt.image import psnr
    from sdrt.pipeline import GenerationRequest, Pipeline

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or physical_cores()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(int8_unet), so, providers=["CPUExecutionProvider"])
    eager = EagerBackend(c)
    swapped = _SwappedUnet(eager, sess)
    size = int(size or c.default_size)
    dbs, max_abs, rel = [], 0.0, []
    for s in seeds:
        req = GenerationRequest(prompt=prompt or GATE_PROMPT, steps=steps, seed=int(s), height=size,
                                width=size)
        ref = Pipeline.from_components(c, eager).generate(req)
        got = Pipeline.from_components(c, swapped).generate(req)
        dbs.append(psnr(got.pixels, ref.pixels, peak=1.0))
        d = (got.latents - ref.latents).float()
        max_abs = max(max_abs, d.abs().max().item())
        rel.append((d.norm() / ref.latents.float().norm().clamp_min(1e-12)).item())
    return {"psnr_db": round(float(np.mean(dbs)), 2), "psnr_min_db": round(float(min(dbs)), 2),
            "latent_max_abs": round(max_abs, 5), "latent_rel_rms": round(float(np.mean(rel)), 5),
            "seeds": [int(s) for s in seeds], "steps": steps, "size": size}


class _SwappedUnet:
    """The eager backend with its UNet replaced by an ONNX Runtime session (fp32 I/O)."""

    def __init__(self, eager, session):
        self.eager, self.session = eager, session
        self.name, self.device, self.dtype, self.size_multiple = "int8-unet", eager.device, eager.dtype, 8
        self.inputs = [i.name for i in session.get_inputs()]

    def text_encoder(self, index, input_ids):
        return self.eager.text_encoder(index, input_ids)

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        import torch

        feeds = dict(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                     text_embeds=text_embeds, time_ids=time_ids)
        out = self.session.run(["noise_pred"], {k: feeds[k].float().contiguous().numpy() for k in self.inputs})
        return torch.from_numpy(out[0])

    def vae_decoder(self, latent):
        return self.eager.vae_decoder(latent)

    def vae_encoder(self, image):
        return self.eager.vae_encoder(image)


# ---- files and manifest --------------------------------------------------------------------------------------------

def _write(src: dict, fp32_dir: Path, out_dir: Path, tmp: Path, report: dict, gate: dict, settings: dict,
           seconds: float) -> dict:
    """Move the int8 UNet into out_dir, link the other graphs and tokenizers, and return the new manifest."""
    from sdrt.export.onnx_manifest import sha256_file

    comps = {}
    for name, entry in src["components"].items():
        if name == "unet":
            continue
        for f in (entry["file"], entry.get("external_data")):
            if f:
                _link(fp32_dir / f, out_dir / f)
        comps[name] = dict(entry)
    for tok in src["model"].get("tokenizers", []):
        if (fp32_dir / tok).is_dir():
            shutil.rmtree(out_dir / tok, ignore_errors=True)
            shutil.copytree(fp32_dir / tok, out_dir / tok)
    graph, data = tmp / "unet.onnx", tmp / "unet.onnx.data"
    u = dict(src["components"]["unet"])
    u.update(file="unet.onnx", external_data=data.name if data.exists() else None,
             graph_sha256=sha256_file(graph), graph_bytes=graph.stat().st_size,
             weights_sha256=sha256_file(data) if data.exists() else None,
             weights_bytes=data.stat().st_size if data.exists() else None, weights_dtype="int8",
             validation={**u.get("validation", {}), "int8_gate": gate}, export_s=round(seconds, 2))
    u["bytes"] = u["graph_bytes"] + (u["weights_bytes"] or 0)
    if data.exists():
        data.chmod(0o644)  # onnx writes it 0600 (a temp file); the graphs beside it are world-readable
        os.replace(data, out_dir / data.name)
    elif (out_dir / data.name).exists():
        (out_dir / data.name).unlink()
    os.replace(graph, out_dir / "unet.onnx")
    comps["unet"] = u
    order = [n for n in src["components"] if n in comps]
    return {**{k: v for k, v in src.items() if k != "components"}, "precision": "int8",
            "sdrt_version": settings["sdrt_version"],  # made by this sdrt, whatever made the fp32 export
            "components": {n: comps[n] for n in order},
            "int8": {"settings": settings, "calibration": report, "quality_gate": gate}}


def _link(a: Path, b: Path) -> None:
    """A graph file is hard-linked (same file system: no copy of a 500 MB text encoder); a weights file (`.data`)
    is copied, since onnx.load refuses external data with several hard links."""
    b.unlink(missing_ok=True)
    if a.suffix != ".data":
        try:
            os.link(a, b)
            return
        except OSError:  # another file system
            pass
    shutil.copyfile(a, b)


def _name_nodes(graph) -> None:
    """nodes_to_exclude works by node name: give unnamed (or duplicate) nodes stable names, op type and position."""
    seen = set()
    for i, n in enumerate(graph.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)


def _fp32_source(c, fp32_onnx_dir, log) -> tuple[Path, dict]:
    """(dir, manifest) of the fp32 export to quantize: the given one, or the onnxruntime backend's cached export
    (made now if missing); it must hold the same weights as the model."""
    from sdrt.export.onnx_manifest import load_manifest

    if fp32_onnx_dir is None:
        from sdrt.backends import Precision
        from sdrt.backends.onnxruntime import ensure_onnx

        fp32_onnx_dir = ensure_onnx(c, Precision.FP32, log=log)
    fp32_dir = Path(fp32_onnx_dir)
    src = load_manifest(fp32_dir, require=["unet"], verify_hashes=False)
    if src.get("precision") != "fp32":
        raise SdrtError(f"{fp32_dir} is a {src.get('precision')} export; int8 is calibrated from an fp32 export")
    if c.source_hash != src["model"]["source_hash"]:
        raise SdrtError(f"{fp32_dir} was exported from other weights than {c.name}; re-export it")
    return fp32_dir, src


def _components(model):
    import torch

    from sdrt.models import load_model

    c = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    if next(c.unet.parameters()).dtype != torch.float32:
        raise SdrtError("int8 calibration needs the fp32 model (its eager pipeline is the reference)")
    return c
