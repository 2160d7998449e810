"""Benchmark sdrt.kernels.geglu against eager `a * F.gelu(gate)` on Stable Diffusion's feed-forward shapes, fp16.

h (M, 2F) is the feed-forward's first projection; y = a * gelu(gate) (M, F). Bandwidth counted: the bytes any
implementation must move, h read once and y written once,

    bytes = 3 * M * F * element_size          GB/s = bytes / seconds / 1e9

applied to both columns, so GB/s compares work done per second (torch's two kernels move 5 * M * F: gelu reads the
gate and writes it, mul reads both halves and writes y). `pct_copy` = gbps / copy_gbps, the 1 GiB device-to-device
copy measured in the same run and counted the same way (read + written): the memory ceiling.

Columns (CUDA; every time is a median of CUDA-graph replays unless it says launch):
  ms, gbps, pct_copy    cold: the graph cycles through copies of h that overflow L2 twice, so h comes from HBM
  warm_ms               one h, replayed: h stays in L2 when it fits, as when the projection just wrote it
  torch_ms, torch_gbps  h.chunk(2, -1) then a * F.gelu(gate), cold
  speedup               torch_ms / ms, cold
  launch_ms             plain calls (do_bench), host launch cost included: what an uncaptured caller pays

    python benchmarks/kernels/bench_geglu.py [--json PATH]     # CUDA, full SD shapes
    python benchmarks/kernels/bench_geglu.py --dry-run         # tiny shapes; on CPU via Triton's interpreter

`run(dry_run) -> list[dict]` is the entry point for the GPU suite. A dry run on CPU times one call, which only
smoke-tests the script.
"""

from __future__ import annotations

import sys

import harness
import torch
import torch.nn.functional as F

# (name, M, F). F = 4 x the level's channels; M = batch 2 (classifier-free guidance) x the latent pixels at that
# level. SD 1.5 at 512px (64^2 latent): 320/640/1280 channels at 64^2/32^2/16^2, the mid block 1280 at 8^2.
# SDXL at 1024px (128^2 latent): transformer blocks only at 64^2 (640 channels) and 32^2 (1280).
SHAPES = [
    ("sd15-64x64", 2 * 64 * 64, 1280),
    ("sd15-32x32", 2 * 32 * 32, 2560),
    ("sd15-16x16", 2 * 16 * 16, 5120),
    ("sd15-8x8-mid", 2 * 8 * 8, 5120),
    ("sdxl-64x64", 2 * 64 * 64, 2560),
    ("sdxl-32x32", 2 * 32 * 32, 5120),
]
DRY_RUN_SHAPES = [("tiny-37x300", 37, 300), ("tiny-16x256", 16, 256)]


def torch_geglu(h):
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def measure(geglu, name: str, m: int, f: int, on_cuda: bool, copy: float | None) -> dict:
    """One row: sdrt.kernels' geglu and eager torch on one (M, 2F) input."""
    h = torch.randn(m, 2 * f, device="cuda" if on_cuda else "cpu", dtype=torch.float16)
    err = (geglu(h).float() - torch_geglu(h).float()).abs().max().item()
    times = harness.versus_eager(geglu, torch_geglu, harness.cold_copies(h, on_cuda), 3 * m * f * h.element_size(),
                                 on_cuda, copy)
    return {"kernel": "geglu", "name": name, "M": m, "F": f, "dtype": "fp16", **times,
            "max_abs_err": err, "copy_gbps": copy, "device": harness.device_name(on_cuda)}


def run(dry_run: bool) -> list[dict]:
    on_cuda = torch.cuda.is_available()
    if not on_cuda and not dry_run:
        raise RuntimeError("bench_geglu needs CUDA (use dry_run=True to smoke-test on CPU)")
    geglu = harness.import_kernels().geglu
    copy = harness.copy_gbps(on_cuda)
    return [measure(geglu, name, m, f, on_cuda, copy) for name, m, f in (DRY_RUN_SHAPES if dry_run else SHAPES)]


def print_table(rows: list[dict]) -> None:
    copy = rows[0]["copy_gbps"] if rows else None
    print(f"geglu fp16 on {rows[0]['device'] if rows else '?'}; GB/s = 3 * M * F * 2 bytes / time, cold L2; "
          f"copy ceiling {copy or float('nan'):.0f} GB/s; torch = a * F.gelu(gate)")
    header = (f"{'shape':>14}{'M':>7}{'F':>6}{'ms':>10}{'GB/s':>7}{'%copy':>7}{'warm ms':>9}{'torch ms':>10}"
              f"{'torch GB/s':>11}{'speedup':>9}{'launch ms':>10}{'max err':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        pct = f"{r['pct_copy']:.0f}" if r["pct_copy"] is not None else "-"
        print(f"{r['name']:>14}{r['M']:>7}{r['F']:>6}{r['ms']:>10.4f}{r['gbps']:>7.0f}{pct:>7}{r['warm_ms']:>9.4f}"
              f"{r['torch_ms']:>10.4f}{r['torch_gbps']:>11.0f}{r['speedup']:>8.2f}x{r['launch_ms']:>10.4f}"
              f"{r['max_abs_err']:>10.1e}")


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, run, print_table))
