"""GPU suite: sd15 at 512x512, 50 steps, batch 1, fp16 -- diffusers vs every sdrt GPU backend -- plus the Triton
kernel benchmarks, in under 8 minutes, into OUT/gpu_suite.{json,md,png} (and OUT/gpu_suite_kernels.md as soon as the
kernel benchmarks are done, so that a suite stopped later still leaves them).

    make gpu-suite OUT=DIR     on the GPU machine (torch and triton preinstalled; see the Makefile target)
    make gpu-suite-dry         tiny sizes on the CPU: the CI smoke test of this file (tests/test_bench.py)

Rows: `eager` (fp32: the drift reference), `diffusers:fp16` (the baseline users run today), `eager:fp16`,
`torch:fp16` (sdrt's optimized PyTorch backend), `torch.compile:fp16` (inductor over the eager modules, compiled
in the row's warm-up: about two minutes) and `tensorrt:fp16`. A backend that is not there (no TensorRT, the
torch backend not written yet) is a skipped row with its reason. So is a row not started by 75% of the budget,
and a TensorRT export + engine build (minutes on sd15; a subprocess) still running at 90% of it: the suite stays
inside its slot. TensorRT comes last for that reason; its engines are cached ($SDRT_CACHE/onnx/.../tensorrt), so
`sdrt export sd15 -o DIR --precision fp16 && sdrt build DIR` run once beforehand makes its row fit.
Every row also gets a profile (`sdrt bench --profile`): one UNet step and one VAE decode under torch.profiler, GPU
time by kind of kernel (attention, group norm, layer norm, GEGLU, conv, GEMM, other), the map of where the rest of
the time goes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROWS = ("eager", "diffusers:fp16", "eager:fp16", "torch:fp16", "torch.compile:fp16", "tensorrt:fp16")
KERNEL_BENCHMARKS = (  # each: run(dry_run) -> list[dict]; issue 6's targets first
    "bench_group_norm.py", "bench_attention.py", "bench_layer_norm.py", "bench_geglu.py",
)
BUDGET_S = 480.0
# No kernel benchmark starts past this share of the budget: the pipeline rows (the end-to-end figures) need the rest.
KERNEL_SHARE = 0.45


def suite_config(dry_run: bool, budget_s: float):
    from sdrt.bench import BenchConfig

    if dry_run:  # the same code path at sizes a CPU finishes in seconds (inductor's CPU compile alone takes ~45 s)
        rows = tuple(r for r in ROWS if not r.startswith("torch.compile"))
        return BenchConfig("tiny", rows, height=64, width=64, steps=2, runs=1, warmup=1, device="cpu",
                           budget_s=budget_s, profile=True)
    return BenchConfig("sd15", ROWS, height=512, width=512, steps=50, batch=1, runs=3, warmup=1, budget_s=budget_s,
                       profile=True)


def run_kernel_benchmarks(dry_run: bool, deadline: float = float("inf")) -> list[dict]:
    """Each kernel benchmark file under benchmarks/kernels, imported by path (benchmarks/ is not a package); those
    not started by `deadline` (time.perf_counter()) are skipped rows that say so."""
    folder = Path(__file__).parent / "kernels"
    if str(folder) not in sys.path:  # the files import their shared harness.py, as they do when run as scripts
        sys.path.insert(0, str(folder))
    rows = []
    for name in KERNEL_BENCHMARKS:
        path = folder / name
        t = time.perf_counter()
        if t > deadline:
            rows.append({"benchmark": path.stem, "skipped": "not started: the suite's kernel time budget was spent"})
            continue
        try:
            spec = importlib.util.spec_from_file_location(f"sdrt_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            got = [dict(r, benchmark=path.stem) for r in module.run(dry_run=dry_run)]
        except Exception as e:  # noqa: BLE001  (a missing or failing kernel benchmark is reported, not fatal)
            from sdrt.bench_report import one_line

            got = [{"benchmark": path.stem, "skipped": one_line(e) if path.exists() else f"{path} does not exist"}]
        print(f"{path.stem}: {len(got)} rows in {time.perf_counter() - t:.1f} s", flush=True)
        rows += got
    return rows


def kernels_markdown(rows: list[dict]) -> str:
    """One table per kernel benchmark, over the union of its rows' keys in first-seen order."""
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v).replace("|", "/")

    tables = []
    for name in dict.fromkeys(r["benchmark"] for r in rows):
        group = [r for r in rows if r["benchmark"] == name]
        keys = [k for k in dict.fromkeys(k for r in group for k in r) if k != "benchmark"]
        lines = [f"**{name}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        tables.append("\n".join(lines + ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in group]))
    return "\n\n".join(tables)


def vs_baseline(results: list[dict], baseline: str = "diffusers:fp16") -> str:
    """What the suite is for: each sdrt row against diffusers fp16, per UNet step and end to end."""
    base = next((r for r in results if r["backend"] == baseline and not r.get("skipped")), None)
    if base is None:
        return f"({baseline} did not run: no baseline ratios)"
    # "UNet step" is the backend's unet verb called alone (for torch a CUDA graph recorded for its shapes, running
    # diffusers' forward: the time embedding inside each step); the pipeline times its loop, and a step there is
    # loop time / steps (for torch the captured loop, with the text's K/V and time embeddings computed once).
    # "outside the loop" is generate()'s time besides its denoising loop (encode, latents, decode, copy to host).
    # The peers (diffusers) time no loop of ours: "-" there, not their standalone UNet call under another name.
    lines = [f"| backend | UNet step vs {baseline} | step in the loop, ms | outside the loop, ms | e2e ms | "
             f"e2e vs {baseline} |", "|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("skipped"):
            loop_step, outside = r.get("pipeline_unet_step_ms"), r.get("outside_loop_ms")
            lines.append(f"| {r['backend']} | {base['unet_step_ms'] / r['unet_step_ms']:.2f}x | "
                         f"{'-' if loop_step is None else f'{loop_step:.2f}'} | "
                         f"{'-' if outside is None else f'{outside:.1f}'} | "
                         f"{r['e2e_ms']['p50']:.0f} | {base['e2e_ms']['p50'] / r['e2e_ms']['p50']:.2f}x |")
    return "\n".join(lines)


def targets_markdown(results: list[dict], kernels: list[dict]) -> str:
    """Issue 6's targets against this run's figures (it names them for an H100; the row says which GPU ran)."""
    def row(target, figure, met):
        return f"| {target} | {figure} | {'-' if met is None else 'met' if met else '**not met**'} |"

    def ok(rows):
        return [r for r in rows if not r.get("skipped")]

    lines = ["| target | this run | |", "|---|---|---|"]
    gn = ok(r for r in kernels if r.get("benchmark") == "bench_group_norm")
    if gn:
        worst = min(gn, key=lambda r: r["speedup"])
        lines.append(row("GroupNorm+SiLU >= 1.5x `F.group_norm`+`F.silu`, fp16, SD shapes (cold, GPU time)",
                         f"{worst['speedup']:.2f}x at worst ({worst['N']}x{worst['C']}x{worst['H']}x{worst['W']} "
                         f"{worst['layout']}), over {len(gn)} shapes and layouts", worst["speedup"] >= 1.5))
        pct = [r for r in gn if r.get("pct_copy") is not None]
        if pct:
            best = max(pct, key=lambda r: r["pct_copy"])
            n70 = sum(r["pct_copy"] >= 70 for r in pct)
            lines.append(row("GroupNorm+SiLU >= 70% of memory bandwidth (of a device copy in the same run)",
                             f"best {best['pct_copy']:.0f}% ({best['N']}x{best['C']}x{best['H']}x{best['W']} "
                             f"{best['layout']}); {n70} of {len(pct)} rows at >= 70%", best["pct_copy"] >= 70))
    att = ok(r for r in kernels if r.get("benchmark") == "bench_attention")
    for d in (40, 80, 160):
        at_d = [r for r in att if r.get("d") == d]
        if at_d:
            worst = min(at_d, key=lambda r: r["speedup"])
            lines.append(row(f"attention >= torch SDPA ({worst.get('torch_backend', 'flash')}) at head size {d}",
                             f"{worst['speedup']:.2f}x at worst ({worst['shape']}), over {len(at_d)} shapes",
                             worst["speedup"] >= 1.0))
    by_name = {r["backend"]: r for r in results if not r.get("skipped")}
    ours, base = by_name.get("torch:fp16"), by_name.get("diffusers:fp16")
    if ours and base:
        x = base["e2e_ms"]["p50"] / ours["e2e_ms"]["p50"]
        lines.append(row("pipeline (the suite's model, size and steps), fp16, >= 2x eager diffusers (fp16 + SDPA)",
                         f"{base['e2e_ms']['p50']:.0f} -> {ours['e2e_ms']['p50']:.0f} ms, {x:.2f}x", x >= 2.0))
    if ours:
        lines.append(row("aim: <= 0.35 s end to end", f"{ours['e2e_ms']['p50'] / 1e3:.3f} s",
                         ours["e2e_ms"]["p50"] <= 350))
    return "\n".join(lines) if len(lines) > 2 else "(no rows to compare)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_suite.json, gpu_suite.md and gpu_suite.png")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CI smoke test)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"wall-clock budget (default {BUDGET_S:.0f})")
    args = p.parse_args(argv)

    from sdrt import bench_report
    from sdrt.bench import run_bench
    from sdrt.cli import quiet_libraries

    quiet_libraries()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    kernels = run_kernel_benchmarks(args.dry_run, started + KERNEL_SHARE * args.budget_s)
    # on disk at once: a suite stopped later (a slot's time limit) still leaves the kernel tables
    (out / "gpu_suite_kernels.md").write_text("### Kernels\n\n" + (kernels_markdown(kernels) or "(none)") + "\n")
    left = args.budget_s - (time.perf_counter() - started) - 15  # 15 s for the report and the plot
    report = run_bench(suite_config(args.dry_run, left), log=lambda m: print(m, flush=True))
    report["kernels"] = kernels
    report["suite"] = {"dry_run": args.dry_run, "budget_s": args.budget_s,
                       "wall_s": round(time.perf_counter() - started, 1)}
    text = "\n\n".join(["## sdrt GPU suite" + (" (dry run: tiny, CPU)" if args.dry_run else ""),
                        bench_report.markdown(report), vs_baseline(report["results"]),
                        "### Issue 6's targets", targets_markdown(report["results"], kernels),
                        "### Kernels", kernels_markdown(kernels) or "(none)"])
    (out / "gpu_suite.json").write_text(bench_report.to_json(report))
    (out / "gpu_suite.md").write_text(text + "\n")
    bench_report.plot(report, out / "gpu_suite.png")
    print(text)
    print(f"wrote {out}/gpu_suite.{{json,md,png}} in {report['suite']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
