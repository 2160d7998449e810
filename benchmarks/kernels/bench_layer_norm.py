"""Benchmark sdrt.kernels.add_layer_norm against eager `s = x + r; F.layer_norm(s, ...)` at SD's shapes, fp16.

x (M, C) is an attention's output, r (M, C) the residual stream; s = x + r is the new stream and y = LayerNorm(s)
the next sublayer's input. Bandwidth counted: the bytes any implementation must move, x and r read once, s and y
written once,

    bytes = 4 * M * C * element_size          GB/s = bytes / seconds / 1e9

applied to both columns, so GB/s compares work done per second (torch's two kernels move 5 * M * C: the add reads
x and r and writes s, layer_norm reads s and writes y). `pct_copy` = gbps / copy_gbps, the 1 GiB device-to-device
copy measured in the same run and counted the same way (read + written): the memory ceiling.

Columns (CUDA; every time is a median of CUDA-graph replays unless it says launch):
  ms, gbps, pct_copy    cold: the graph cycles through copies of (x, r) that overflow L2 twice, so they come from HBM
  warm_ms               one (x, r), replayed: they stay in L2 when they fit, as when the attention just wrote x
  torch_ms, torch_gbps  s = x + r, then F.layer_norm(s, (C,), weight, bias), cold
  speedup               torch_ms / ms, cold
  launch_ms             plain calls (do_bench), host launch cost included: what an uncaptured caller pays
  max_abs_err, s_exact  y against eager's fp16 layer_norm; whether s equals eager's x + r bitwise

    python benchmarks/kernels/bench_layer_norm.py [--json PATH]     # CUDA, full SD shapes
    python benchmarks/kernels/bench_layer_norm.py --dry-run         # tiny shapes; on CPU via Triton's interpreter

`run(dry_run) -> list[dict]` is the entry point for the GPU suite. A dry run on CPU times one call, which only
smoke-tests the script.
"""

from __future__ import annotations

import sys

import harness
import torch
import torch.nn.functional as F

# (name, M, C). C = the level's channels; M = batch 2 (classifier-free guidance) x the latent pixels at that level.
# SD 1.5 at 512px (64^2 latent): 320/640/1280 channels at 64^2/32^2/16^2, the mid block 1280 at 8^2 (two pairs a
# transformer block, 32 a UNet step). SDXL at 1024px (128^2 latent): transformer blocks at 64^2 (640 channels) and
# 32^2 (1280). SD 2.x's OpenCLIP text encoder: 2 x 77 tokens of 1024.
SHAPES = [
    ("sd15-64x64", 2 * 64 * 64, 320),
    ("sd15-32x32", 2 * 32 * 32, 640),
    ("sd15-16x16", 2 * 16 * 16, 1280),
    ("sd15-8x8-mid", 2 * 8 * 8, 1280),
    ("sdxl-64x64", 2 * 64 * 64, 640),
    ("sdxl-32x32", 2 * 32 * 32, 1280),
    ("sd2-text", 2 * 77, 1024),
]
DRY_RUN_SHAPES = [("tiny-37x320", 37, 320), ("tiny-16x1280", 16, 1280)]


def torch_add_layer_norm(x, r, weight, bias):
    s = x + r
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias)


def measure(add_layer_norm, name: str, m: int, c: int, on_cuda: bool, copy: float | None) -> dict:
    """One row: sdrt.kernels' add_layer_norm and eager torch on one (M, C) pair."""
    device = "cuda" if on_cuda else "cpu"
    xr = torch.randn(2, m, c, device=device, dtype=torch.float16)  # x and r side by side: one tensor to copy cold
    weight = (torch.randn(c, device=device) + 1).half()
    bias = torch.randn(c, device=device).half()
    s, y = add_layer_norm(xr[0], xr[1], weight, bias)
    s_ref, y_ref = torch_add_layer_norm(xr[0], xr[1], weight, bias)
    err = (y.float() - y_ref.float()).abs().max().item()
    times = harness.versus_eager(lambda t: add_layer_norm(t[0], t[1], weight, bias),
                                 lambda t: torch_add_layer_norm(t[0], t[1], weight, bias),
                                 harness.cold_copies(xr, on_cuda), 4 * m * c * xr.element_size(), on_cuda, copy)
    return {"kernel": "add_layer_norm", "name": name, "M": m, "C": c, "dtype": "fp16", **times,
            "max_abs_err": err, "s_exact": torch.equal(s, s_ref), "copy_gbps": copy,
            "device": harness.device_name(on_cuda)}


def run(dry_run: bool) -> list[dict]:
    on_cuda = torch.cuda.is_available()
    if not on_cuda and not dry_run:
        raise RuntimeError("bench_layer_norm needs CUDA (use dry_run=True to smoke-test on CPU)")
    add_layer_norm = harness.import_kernels().add_layer_norm
    copy = harness.copy_gbps(on_cuda)
    shapes = DRY_RUN_SHAPES if dry_run else SHAPES
    return [measure(add_layer_norm, name, m, c, on_cuda, copy) for name, m, c in shapes]


def print_table(rows: list[dict]) -> None:
    copy = rows[0]["copy_gbps"] if rows else None
    print(f"add_layer_norm fp16 on {rows[0]['device'] if rows else '?'}; GB/s = 4 * M * C * 2 bytes / time, cold L2; "
          f"copy ceiling {copy or float('nan'):.0f} GB/s; torch = x + r, then F.layer_norm")
    header = (f"{'shape':>14}{'M':>7}{'C':>6}{'ms':>10}{'GB/s':>7}{'%copy':>7}{'warm ms':>9}{'torch ms':>10}"
              f"{'torch GB/s':>11}{'speedup':>9}{'launch ms':>10}{'max err':>10}{'s exact':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        pct = f"{r['pct_copy']:.0f}" if r["pct_copy"] is not None else "-"
        print(f"{r['name']:>14}{r['M']:>7}{r['C']:>6}{r['ms']:>10.4f}{r['gbps']:>7.0f}{pct:>7}{r['warm_ms']:>9.4f}"
              f"{r['torch_ms']:>10.4f}{r['torch_gbps']:>11.0f}{r['speedup']:>8.2f}x{r['launch_ms']:>10.4f}"
              f"{r['max_abs_err']:>10.1e}{str(r['s_exact']):>8}")


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, run, print_table))
