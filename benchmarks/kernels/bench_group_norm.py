"""Benchmark sdrt.kernels.group_norm (+ fused SiLU) against F.group_norm + F.silu on Stable Diffusion's shapes, fp16.

Bandwidth counted: the bytes any implementation must move, x read once and y written once,

    bytes = 2 * N * C * H * W * element_size          GB/s = bytes / seconds / 1e9

applied to both columns, so GB/s compares work done per second. (Our kernel actually reads x twice, statistics then
normalise, the second read mostly from L2; torch's unfused pair moves 4x: group norm reads + writes, SiLU reads +
writes.) The ceiling is measured in the same run: `copy_gbps`, a 1 GiB device-to-device copy counted the same way
(read + written), and `pct_copy` = gbps / copy_gbps is the figure issue 6's "70% of memory bandwidth" asks for.

Columns (CUDA; every time is a median of CUDA-graph replays unless it says launch):
  ms, gbps, pct_copy    cold: the graph cycles through copies of x that overflow L2 twice, so x comes from HBM
  warm_ms, warm_gbps    one x, replayed: x stays in L2 when it fits, as when the conv before just wrote it
  torch_ms, torch_gbps  F.group_norm + F.silu, cold
  speedup               torch_ms / ms, cold
  launch_ms             plain calls (do_bench), host launch cost included: what an uncaptured caller pays
  gpp, split, finalize  the launch plan: groups per program, programs per chunk, third kernel or not
  one_pass              the plan is one kernel with a group a program (SD's 8^2 and 16^2 levels); the ablations
                        below are then None except twopass_ms
  twopass_ms            one-pass rows only, cold, the split statistics + apply kernels instead: its ablation
  tile2k_ms             cold, with 2048-element tiles (half the bytes in flight): the ablation of the tile
  gpp1_ms               channels-last only, cold, with one group a program: the ablation of the chunking
  nopdl_ms              channels-last only, cold, every kernel launched plainly: the ablation of PDL
  fwd_ms                x >= 16 MB only (the VAE rows), cold, the apply pass walking its slices front to back: the
                        ablation of reverse_apply (which starts on the tiles the stats pass left in L2)

    python benchmarks/kernels/bench_group_norm.py [--json PATH]     # CUDA, full SD shapes
    python benchmarks/kernels/bench_group_norm.py --dry-run         # tiny shapes; on CPU via Triton's interpreter

`run(dry_run) -> list[dict]` is the entry point for the GPU suite. A dry run on CPU times one call, which only
smoke-tests the script.
"""

from __future__ import annotations

import importlib
import sys

import harness
import torch
import torch.nn.functional as F

# (N, C, H, W), 32 groups, batch 2 (classifier-free guidance). SD 1.5 UNet at 512px: 64^2 .. 8^2 latents, C up to
# 2560 where the up blocks concatenate skips (960, 1920 too). SDXL at 1024px: 128^2. VAE decoder up to 512^2.
SHAPES = [
    (2, 320, 64, 64),
    (2, 640, 32, 32),
    (2, 960, 32, 32),
    (2, 1280, 16, 16),
    (2, 1920, 16, 16),
    (2, 2560, 8, 8),
    (2, 640, 64, 64),
    (2, 960, 64, 64),
    (2, 320, 128, 128),
    (2, 640, 128, 128),
    (2, 1280, 32, 32),
    (2, 2560, 32, 32),
    (1, 512, 128, 128),  # VAE decoder, 512px output
    (1, 256, 256, 256),
    (1, 128, 512, 512),
]
DRY_RUN_SHAPES = [(1, 320, 4, 4), (1, 96, 7, 9), (1, 320, 33, 33)]  # one-pass, one-pass, split
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
GROUPS = 32


def torch_gn_silu(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))


def measure(kernels, shape, layout: str, on_cuda: bool, copy: float | None) -> dict:
    """One row: sdrt.kernels' group_norm (`kernels`, imported by harness) and torch on one shape and layout."""
    device = "cuda" if on_cuda else "cpu"
    N, C, H, W = shape
    x = torch.randn(N, C, H, W, device=device, dtype=torch.float16).contiguous(memory_format=FORMATS[layout])
    w = torch.randn(C, device=device, dtype=torch.float16)
    b = torch.randn(C, device=device, dtype=torch.float16)

    def ours(x, **ablate):  # one GroupNormTuning field changed, or none
        return kernels.group_norm(x, GROUPS, w, b, 1e-5, silu=True, tuning=kernels.GroupNormTuning(**ablate))

    err = (ours(x).float() - torch_gn_silu(x, w, b).float()).abs().max().item()
    xs = harness.cold_copies(x, on_cuda)
    ms = harness.time_cold_ms(ours, xs, on_cuda)
    warm_ms, launch_ms = harness.time_ms(lambda: ours(x), on_cuda)
    torch_ms = harness.time_cold_ms(lambda x: torch_gn_silu(x, w, b), xs, on_cuda)
    torch_warm_ms = harness.time_ms(lambda: torch_gn_silu(x, w, b), on_cuda)[0]
    plan = importlib.import_module("sdrt.kernels.group_norm").plan_for(x, GROUPS)  # the module, not the function
    twopass_ms = tile2k_ms = gpp1_ms = nopdl_ms = fwd_ms = None
    if plan.one_pass:  # none of the split kernels' knobs apply
        twopass_ms = harness.time_cold_ms(lambda x: ours(x, one_pass=False), xs, on_cuda)
    else:
        tile2k_ms = harness.time_cold_ms(lambda x: ours(x, tile=2048), xs, on_cuda)
    # These two on channels-last only, the layout sdrt's torch backend runs (each is another set of compiles).
    if layout == "nhwc" and not plan.one_pass:
        gpp1_ms = harness.time_cold_ms(lambda x: ours(x, groups_per_program=1), xs, on_cuda)
        nopdl_ms = harness.time_cold_ms(lambda x: ours(x, pdl=False), xs, on_cuda)
    if x.numel() * x.element_size() >= 16 << 20:  # L2 reuse only matters where x does not fit
        fwd_ms = harness.time_cold_ms(lambda x: ours(x, reverse_apply=False), xs, on_cuda)
    nbytes = 2 * x.numel() * x.element_size()
    gbps = nbytes / ms * 1e-6
    return {
        "kernel": "group_norm_silu", "N": N, "C": C, "H": H, "W": W, "groups": GROUPS, "layout": layout,
        "dtype": "fp16", "ms": ms, "gbps": gbps, "pct_copy": 100 * gbps / copy if copy else None,
        "warm_ms": warm_ms, "warm_gbps": nbytes / warm_ms * 1e-6,
        "torch_ms": torch_ms, "torch_gbps": nbytes / torch_ms * 1e-6, "torch_warm_ms": torch_warm_ms,
        "speedup": torch_ms / ms, "launch_ms": launch_ms,
        "gpp": plan.gpp, "split": plan.split, "finalize": plan.finalize, "one_pass": plan.one_pass,
        "twopass_ms": twopass_ms, "tile2k_ms": tile2k_ms, "gpp1_ms": gpp1_ms,
        "nopdl_ms": nopdl_ms, "fwd_ms": fwd_ms,
        "max_abs_err": err, "copy_gbps": copy, "device": harness.device_name(on_cuda),
    }


def run(dry_run: bool) -> list[dict]:
    on_cuda = torch.cuda.is_available()
    if not on_cuda and not dry_run:
        raise RuntimeError("bench_group_norm needs CUDA (use dry_run=True to smoke-test on CPU)")
    kernels = harness.import_kernels()
    copy = harness.copy_gbps(on_cuda)
    return [measure(kernels, shape, layout, on_cuda, copy)
            for shape in (DRY_RUN_SHAPES if dry_run else SHAPES) for layout in FORMATS]


def print_table(rows: list[dict]) -> None:
    copy = rows[0]["copy_gbps"] if rows else None
    print(f"group_norm + silu fp16, 32 groups, on {rows[0]['device'] if rows else '?'}; "
          f"GB/s = 2 * numel * 2 bytes / time, cold L2; copy ceiling {copy or float('nan'):.0f} GB/s; "
          "torch = F.group_norm + F.silu")
    header = (f"{'N':>3}{'C':>6}{'HxW':>9}{'layout':>7}{'ms':>10}{'GB/s':>7}{'%copy':>7}{'warm ms':>9}"
              f"{'torch ms':>10}{'speedup':>9}{'2-pass ms':>10}{'tile2k ms':>10}{'gpp1 ms':>9}{'no-PDL ms':>10}"
              f"{'fwd ms':>9}"
              f"{'plan':>12}"
              f"{'max err':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        pct = f"{r['pct_copy']:.0f}" if r["pct_copy"] is not None else "-"
        two, tile2k, gpp1, nopdl, fwd = (f"{r[k]:.4f}" if r[k] is not None else "-"
                                         for k in ("twopass_ms", "tile2k_ms", "gpp1_ms", "nopdl_ms", "fwd_ms"))
        plan = "one-pass" if r["one_pass"] else f"{r['gpp']}x{r['split']}{'+f' if r['finalize'] else ''}"
        print(f"{r['N']:>3}{r['C']:>6}{str(r['H']) + 'x' + str(r['W']):>9}{r['layout']:>7}{r['ms']:>10.4f}"
              f"{r['gbps']:>7.0f}{pct:>7}{r['warm_ms']:>9.4f}{r['torch_ms']:>10.4f}{r['speedup']:>8.2f}x"
              f"{two:>10}{tile2k:>10}{gpp1:>9}"
              f"{nopdl:>10}{fwd:>9}{plan:>12}{r['max_abs_err']:>10.1e}")


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, run, print_table))
