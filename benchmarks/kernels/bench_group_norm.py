"""Benchmark sdrt.kernels.group_norm (+ fused SiLU) against F.group_norm + F.silu on Stable Diffusion's shapes, fp16.

Bandwidth counted: the bytes any implementation must move, x read once and y written once,

    bytes = 2 * N * C * H * W * element_size          GB/s = bytes / seconds / 1e9

applied to both columns, so GB/s compares work done per second. (Our kernel actually reads x twice, statistics then
normalise, the second read mostly from L2; torch's unfused pair moves 4x: group norm reads + writes, SiLU reads +
writes.) H100 SXM HBM3 peak: ~3350 GB/s.

    python benchmarks/kernels/bench_group_norm.py [--json PATH]     # CUDA, full SD shapes
    python benchmarks/kernels/bench_group_norm.py --dry-run         # tiny shapes; on CPU via Triton's interpreter

`run(dry_run) -> list[dict]` is the entry point for the GPU suite. On CUDA, `ms` is the median
of CUDA-graph replays (kernel time alone) and `launch_ms` of plain calls (do_bench, host launch cost
included). A dry run on CPU times one call, which only smoke-tests the script.
"""

from __future__ import annotations

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
DRY_RUN_SHAPES = [(1, 320, 4, 4), (1, 96, 7, 9)]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
GROUPS = 32


def run(dry_run: bool) -> list[dict]:
    on_cuda = torch.cuda.is_available()
    if not on_cuda and not dry_run:
        raise RuntimeError("bench_group_norm needs CUDA (use dry_run=True to smoke-test on CPU)")
    group_norm = harness.import_kernels().group_norm
    device = "cuda" if on_cuda else "cpu"
    dtype = torch.float16

    def torch_gn_silu(x, w, b):
        return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))

    rows = []
    for N, C, H, W in DRY_RUN_SHAPES if dry_run else SHAPES:
        for layout, memory_format in FORMATS.items():
            x = torch.randn(N, C, H, W, device=device, dtype=dtype).contiguous(memory_format=memory_format)
            w = torch.randn(C, device=device, dtype=dtype)
            b = torch.randn(C, device=device, dtype=dtype)
            ours = group_norm(x, GROUPS, w, b, 1e-5, silu=True)
            err = (ours.float() - torch_gn_silu(x, w, b).float()).abs().max().item()
            ms, launch_ms = harness.time_ms(lambda x=x, w=w, b=b: group_norm(x, GROUPS, w, b, 1e-5, silu=True), on_cuda)
            torch_ms, torch_launch_ms = harness.time_ms(lambda x=x, w=w, b=b: torch_gn_silu(x, w, b), on_cuda)
            nbytes = 2 * x.numel() * x.element_size()
            rows.append({
                "kernel": "group_norm_silu", "N": N, "C": C, "H": H, "W": W, "groups": GROUPS, "layout": layout,
                "dtype": "fp16", "ms": ms, "torch_ms": torch_ms, "gbps": nbytes / ms * 1e-6,
                "torch_gbps": nbytes / torch_ms * 1e-6, "speedup": torch_ms / ms,
            "launch_ms": launch_ms, "torch_launch_ms": torch_launch_ms, "max_abs_err": err,
                "device": harness.device_name(on_cuda),
            })
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"group_norm + silu fp16, 32 groups, on {rows[0]['device'] if rows else '?'}; "
          "GB/s = 2 * numel * 2 bytes / time; torch = F.group_norm + F.silu")
    header = f"{'N':>3}{'C':>6}{'HxW':>9}{'layout':>7}{'ms':>10}{'GB/s':>8}{'torch ms':>10}{'GB/s':>8}" \
             f"{'speedup':>9}{'max err':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['N']:>3}{r['C']:>6}{str(r['H']) + 'x' + str(r['W']):>9}{r['layout']:>7}{r['ms']:>10.4f}"
              f"{r['gbps']:>8.0f}{r['torch_ms']:>10.4f}{r['torch_gbps']:>8.0f}{r['speedup']:>8.2f}x"
              f"{r['max_abs_err']:>10.1e}")


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, run, print_table))
