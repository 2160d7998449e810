"""`sdrt bench` report: row summaries, drift, environment, and the JSON / Markdown / PNG outputs.

Row fields (the README documents the schema): stage medians in ms, `e2e_ms` percentiles, throughput, speedups
against the eager fp32 row, cold-start seconds, peak memory and drift. `psnr_vs_eager` is null for the reference
row itself and for a row whose image is bit-identical to it (PSNR would be infinite; `latent_max_abs_vs_eager` is
then 0.0); JSON has no infinity.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from sdrt.errors import SdrtError

STAGES = ("text_encoder_ms", "unet_step_ms", "vae_decode_ms")
STAGE_LABELS = {"text_encoder_ms": "text encoder", "unet_step_ms": "UNet step (CFG batch)",
                "vae_decode_ms": "VAE decode"}
PACKAGES = {"torch": ("torch",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "openvino": ("openvino",),
            "diffusers": ("diffusers",), "transformers": ("transformers",), "triton": ("triton",),
            "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"), "numpy": ("numpy",), "sdrt": ("sdrt",)}


def one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return text if type(e).__name__ == "SdrtError" else f"{type(e).__name__}: {text}"


def describe_row(row, mem, device) -> dict:
    """What a row is and what setting it up cost (time, memory)."""
    on_gpu = row.device.type == "cuda"
    return {"kind": row.spec.kind, "precision": row.precision, "device": str(row.device),
            "cold_start_s": {k: None if v is None else round(v, 2) for k, v in row.cold_s.items()},
            # GPU rows: the CUDA peak allocation or the device memory the row took, whichever is more; CPU rows:
            # peak RSS; each above the row's start (MiB)
            "peak_mem_mb": mem.gpu_mb if on_gpu else mem.rss_mb, "peak_rss_mb": mem.rss_mb,
            "held_rss_mb": mem.held_mb, "peak_cuda_mb": mem.cuda_mb, "held_device_mb": mem.device_mb,
            "notes": list(row.notes)}


def drift(out, reference, is_reference: bool) -> dict:
    """Image PSNR (pixels in [0, 1]) and latent max-abs against the eager fp32 reference's first generation."""
    if is_reference or reference is None:
        return {"psnr_vs_eager": None, "latent_max_abs_vs_eager": None}
    from sdrt.image import psnr

    pixels = np.asarray(out.pixels, dtype=np.float32)
    diff = (out.latents.float().cpu() - reference.latents.float().cpu()).abs().max().item()
    if not (np.isfinite(pixels).all() and np.isfinite(diff)):  # e.g. fp16 overflow: say so, JSON has no NaN
        return {"psnr_vs_eager": None, "latent_max_abs_vs_eager": None, "nonfinite_output": True}
    db = psnr(pixels, np.asarray(reference.pixels, dtype=np.float32), peak=1.0)
    return {"psnr_vs_eager": None if db == float("inf") else round(db, 2), "latent_max_abs_vs_eager": diff}


def percentile(xs, q: float) -> float | None:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else None


def summarize(samples: dict, request) -> dict:
    """Medians of the stage samples, end-to-end percentiles, and the throughput they imply."""
    out = {k: round(percentile(samples[k], 50), 2) for k in STAGES}
    e2e = samples["e2e_ms"]
    out["e2e_ms"] = {f"p{q}": round(percentile(e2e, q), 1) for q in (50, 90, 99)}
    step = percentile(samples["pipeline_unet_step_ms"], 50)
    out["pipeline_unet_step_ms"] = None if step is None else round(step, 2)  # inside generate(): a cross-check
    # generate()'s time outside its denoising loop: text encoding, the initial latents, decode, the copy to the host
    outside = percentile(samples.get("outside_loop_ms", []), 50)
    out["outside_loop_ms"] = None if outside is None else round(outside, 2)
    out["steps_per_s"] = round(1e3 / out["unet_step_ms"], 3)  # denoising steps (UNet at the CFG batch) per second
    out["images_per_s"] = round(len(request.prompts) * request.batch * 1e3 / out["e2e_ms"]["p50"], 4)
    # The least-disturbed sample of each: on a shared machine noise only adds time, so min is the other honest view.
    out["min_ms"] = {k: round(min(vs), 2) for k, vs in samples.items() if vs}
    out["samples"] = {k: [round(v, 2) for v in vs] for k, vs in samples.items()}
    return out


def add_speedups(results: list, unet_flops: int | None = None) -> None:
    """speedup = eager fp32 time / row time, per UNet step and end to end (p50); the reference row is first.
    unet_tflops: the UNet step's FLOPs (counted on eager) over the row's step time: achieved TFLOP/s."""
    ref = next((r for r in results if not r.get("skipped") and "unet_step_ms" in r), None)
    for r in results:
        ok = ref is not None and not r.get("skipped") and "unet_step_ms" in r
        tflops = unet_flops / r["unet_step_ms"] / 1e9 if ok and unet_flops else None
        r["unet_tflops"] = None if tflops is None else float(f"{tflops:.4g}")  # a tiny model's CPU row: 0.000119
        r["speedup_unet_vs_eager"] = round(ref["unet_step_ms"] / r["unet_step_ms"], 3) if ok else None
        r["speedup_e2e_vs_eager"] = round(ref["e2e_ms"]["p50"] / r["e2e_ms"]["p50"], 3) if ok else None
        r["speedup_vs_eager_min"] = {k: round(ref["min_ms"][k] / r["min_ms"][k], 3) for k in ("unet_step_ms", "e2e_ms")
                                     } if ok else None  # the same ratios on the least-disturbed samples


def environment(device) -> dict:
    """Device, library versions and git revision: what a number in the table was measured on."""
    from importlib import metadata

    import torch

    versions = {}
    for key, dists in PACKAGES.items():
        for dist in dists:
            try:
                versions[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or None)
    return {"device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            # 1/5/15-minute load averages when the report was written: above cpu_count, neighbours shared the cores
            "load_avg": [round(x, 2) for x in os.getloadavg()],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "git": git_revision()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def git_revision() -> str | None:
    """HEAD of the sdrt checkout, with "+dirty" when the tree has changes; None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


# ---- outputs ----------------------------------------------------------------------------------------------------

def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _runs(report: dict) -> str:
    """The rounds measured: the configured number, or fewer where the time budget cut them short."""
    asked = report["config"]["runs"]
    done = sorted({r["rounds"] for r in report["results"] if r.get("rounds") is not None})
    if not done or done == [asked]:
        return str(asked)
    return f"{'/'.join(map(str, done))} of {asked} (time budget)"


def markdown(report: dict) -> str:
    """The table for an issue: one line per row, skipped rows with their reason, then where it ran."""
    q, env = report["request"], report["env"]
    gflop = q.get("unet_gflop_per_step")
    head = (f"**{report['config']['model']}** {q['width']}x{q['height']}, {q['steps']} steps ({q['scheduler']}), "
            f"batch {q['batch']}, guidance {q['guidance']} (UNet batch {q['batch'] * (2 if q['guidance'] > 1 else 1)}"
            + (f", {gflop:.1f} GFLOP per UNet step" if gflop else "") + f"), {_runs(report)} runs")
    cols = ["backend", "precision", "text enc ms", "UNet step ms", "VAE dec ms", "e2e p50 ms", "e2e p90 ms",
            "UNet vs eager", "e2e vs eager", "UNet TFLOP/s", "peak MiB", "PSNR vs eager dB", "latent max-abs",
            "cold start s"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["results"]:
        if r.get("skipped"):
            lines.append(f"| {r['backend']} | skipped: {r['skipped'].replace('|', '/')} |" + " |" * (len(cols) - 2))
            continue
        cold = r["cold_start_s"]
        cold_text = " ".join(f"{k} {v:.1f}" for k, v in cold.items() if v is not None)
        lma = r["latent_max_abs_vs_eager"]
        if r.get("nonfinite_output"):
            psnr = lma = "NaN/inf output"
        elif lma is None:
            psnr = lma = "ref"
        else:
            psnr = "identical" if r["psnr_vs_eager"] is None else f"{r['psnr_vs_eager']:.1f}"
            lma = f"{lma:.2e}"
        lines.append("| " + " | ".join([
            r["backend"], r["precision"] or "-", _ms(r["text_encoder_ms"]), _ms(r["unet_step_ms"]),
            _ms(r["vae_decode_ms"]), _ms(r["e2e_ms"]["p50"]), _ms(r["e2e_ms"]["p90"]), _x(r["speedup_unet_vs_eager"]),
            _x(r["speedup_e2e_vs_eager"]), "-" if r["unet_tflops"] is None else f"{r['unet_tflops']:.3g}",
            _ms(r["peak_mem_mb"]), psnr, lma,
            cold_text]) + " |")
    best = [f"{r['backend']} {_x(m['unet_step_ms'])} / {_x(m['e2e_ms'])}"
            for r in report["results"][1:] if (m := r.get("speedup_vs_eager_min"))]
    if best:
        lines += ["", "Speedups on the least-disturbed samples (min; UNet step / e2e): " + ", ".join(best) + "."]
    groups = {}
    for r in report["results"]:
        if not r.get("skipped"):
            groups.setdefault(r.get("group"), []).append(r["backend"])
    if len(groups) > 1:  # ratios across groups assume the machine stayed equally busy between them
        lines += ["", "Measured in separate rounds: " + "; ".join(", ".join(g) for g in groups.values()) + "."]
    from sdrt.bench_profile import markdown as profile_markdown

    if profile := profile_markdown(report["results"]):
        lines += ["", profile]
    v = env["versions"]
    lines += ["", f"Device: {env['gpu'] or env['cpu']} ({env['cpu_count']} CPUs, torch threads "
                  f"{env['torch_threads']}, load average {env['load_avg'][0]}); "
              + ", ".join(f"{k} {v[k]}" for k in PACKAGES if k in v)
              + f"; git {env['git']}.", "", f"`{report['command']}`"]
    return "\n".join(lines)


def plot(report: dict, path) -> Path:
    """Latency by backend: one panel per stage and one end to end, one bar per row, labelled with ms and x vs eager."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; set before pyplot is imported
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if not r.get("skipped")]
    names = [r["backend"] for r in rows]
    # The stages, then what a user waits for: the whole generation (a loop captured as one graph shows only here).
    panels = [(STAGE_LABELS[s], [r[s] for r in rows]) for s in STAGES]
    panels.append(("end to end (p50)", [r["e2e_ms"]["p50"] for r in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 1.2 + 0.45 * len(rows)), squeeze=False)
    for ax, (title, ms) in zip(axes[0], panels):
        ax.barh(names, ms, color=["#888888" if i == 0 else "#3b75af" for i in range(len(rows))])
        ref = ms[0] if ms else None
        for i, v in enumerate(ms):
            ax.text(v, i, f" {_ms(v)}" + (f" ({ref / v:.2f}x)" if ref and i else ""), va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("ms (median)")
        ax.invert_yaxis()
        ax.set_xlim(0, max(ms) * 1.45 if ms else 1)
    q = report["request"]
    fig.suptitle(f"{report['config']['model']} {q['width']}x{q['height']}, batch {q['batch']} on "
                 f"{report['env']['gpu'] or report['env']['cpu']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_json(report: dict) -> str:
    """Strict JSON: a non-finite float (a kernel's NaN, an inf PSNR) becomes null; odd types become strings."""
    def clean(v):
        if isinstance(v, float):
            return v if np.isfinite(v) else None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v if v is None or isinstance(v, (str, int, bool)) else clean(float(v)) if isinstance(
            v, np.floating) else str(v)

    return json.dumps(clean(report), indent=2, allow_nan=False) + "\n"


def write(report: dict, json_path=None, markdown_path=None, plot_path=None) -> None:
    """Each file whole or not at all (temp + rename: a full disk keeps the previous run's); a failure is one line."""
    from sdrt.export.engine_cache import atomic_write

    for path, make in ((json_path, lambda p: atomic_write(p, to_json(report).encode())),
                       (markdown_path, lambda p: atomic_write(p, (markdown(report) + "\n").encode())),
                       (plot_path, lambda p: _plot_atomic(report, p))):
        if not path:
            continue
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            make(Path(path))
        except OSError as e:
            raise SdrtError(f"cannot write {path}: {e.strerror or e}") from None


def _plot_atomic(report: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # the suffix picks the format
    try:
        plot(report, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
