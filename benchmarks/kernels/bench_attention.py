"""Benchmark sdrt.kernels.attention against torch SDPA (flash backend) on Stable Diffusion's attention shapes, fp16.

Work counted: the two matmuls S = Q K^T and O = P V, each Nq * Nk * d multiply-adds (2 flops) per (batch, head):

    flops = 4 * B * heads * Nq * Nk * d          TFLOP/s = flops / seconds / 1e12

(the softmax's exp/max/sum are not counted, as in FlashAttention's papers). H100 SXM dense fp16 peak: ~989 TFLOP/s.

    python benchmarks/kernels/bench_attention.py [--json PATH]     # CUDA, full SD shapes
    python benchmarks/kernels/bench_attention.py --dry-run         # tiny shapes; on CPU via Triton's interpreter

`run(dry_run) -> list[dict]` is the entry point for the GPU suite. On CUDA, `ms` is the median
of CUDA-graph replays (kernel time alone) and `launch_ms` of plain calls (do_bench, host launch cost
included). `d_tiles` are the column tiles covering d (head_dim_tiles) and `nosplit_ms`, where there are two and
the row is self-attention, the graph time with one padded power-of-two tile instead: the ablation of the split. A
dry run on CPU times one call, which only smoke-tests the script.
"""

from __future__ import annotations

import importlib
import sys

import harness
import torch

# (name, B, heads, Nq, Nk, d). SD 1.5 at 512px: batch 2 (classifier-free guidance), 8 heads, latents 64^2 .. 8^2,
# 77 text tokens. SDXL: head size 64, 10/20 heads. 128^2 latents (1024px with SD 1.5's UNet): 16384 tokens.
SHAPES = [
    ("sd15-64x64-self", 2, 8, 4096, 4096, 40),
    ("sd15-64x64-cross", 2, 8, 4096, 77, 40),
    ("sd15-32x32-self", 2, 8, 1024, 1024, 80),
    ("sd15-32x32-cross", 2, 8, 1024, 77, 80),
    ("sd15-16x16-self", 2, 8, 256, 256, 160),
    ("sd15-16x16-cross", 2, 8, 256, 77, 160),
    ("sd15-8x8-self", 2, 8, 64, 64, 160),
    ("sdxl-64x64-self", 2, 10, 4096, 4096, 64),
    ("sdxl-32x32-self", 2, 20, 1024, 1024, 64),
    ("sdxl-32x32-cross154", 2, 20, 1024, 154, 64),
    ("128x128-self", 1, 8, 16384, 16384, 40),
]
DRY_RUN_SHAPES = [
    ("tiny-self-d40", 1, 2, 64, 64, 40),
    ("tiny-cross77-d80", 1, 1, 48, 77, 80),
    ("tiny-cross154-d160", 1, 1, 32, 154, 160),
]


def _sdpa(on_cuda: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    backends = [SDPBackend.FLASH_ATTENTION] if on_cuda else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]

    def sdpa(q, k, v):
        with sdpa_kernel(backends):
            return scaled_dot_product_attention(q, k, v)

    return sdpa, "flash" if on_cuda else "cpu"


def run(dry_run: bool) -> list[dict]:
    on_cuda = torch.cuda.is_available()
    if not on_cuda and not dry_run:
        raise RuntimeError("bench_attention needs CUDA (use dry_run=True to smoke-test on CPU)")
    attention = harness.import_kernels().attention
    head_dim_tiles = importlib.import_module("sdrt.kernels.attention").head_dim_tiles  # the module's, by name
    sdpa, torch_backend = _sdpa(on_cuda)
    device = "cuda" if on_cuda else "cpu"
    dtype = torch.float16
    rows = []
    for name, B, H, n_q, n_k, d in DRY_RUN_SHAPES if dry_run else SHAPES:
        q = torch.randn(B, H, n_q, d, device=device, dtype=dtype)
        k = torch.randn(B, H, n_k, d, device=device, dtype=dtype)
        v = torch.randn(B, H, n_k, d, device=device, dtype=dtype)
        err = (attention(q, k, v).float() - sdpa(q, k, v).float()).abs().max().item()
        ms, launch_ms = harness.time_ms(lambda q=q, k=k, v=v: attention(q, k, v), on_cuda)
        torch_ms, torch_launch_ms = harness.time_ms(lambda q=q, k=k, v=v: sdpa(q, k, v), on_cuda)
        tiles = head_dim_tiles(d)
        nosplit_ms = None  # the ablation of the two column tiles, where d has them (self-attention: autotunes again)
        if tiles[1] and n_k == n_q:
            nosplit_ms = harness.time_ms(lambda q=q, k=k, v=v: attention(q, k, v, split_head_dim=False), on_cuda)[0]
        flops = 4 * B * H * n_q * n_k * d
        rows.append({
            "kernel": "attention", "shape": name, "B": B, "heads": H, "Nq": n_q, "Nk": n_k, "d": d, "dtype": "fp16",
            "ms": ms, "torch_ms": torch_ms, "tflops": flops / ms * 1e-9, "torch_tflops": flops / torch_ms * 1e-9,
            "speedup": torch_ms / ms, "d_tiles": "+".join(str(t) for t in tiles if t),
            "nosplit_ms": nosplit_ms,
            "launch_ms": launch_ms, "torch_launch_ms": torch_launch_ms, "max_abs_err": err,
            "torch_backend": torch_backend,
            "device": harness.device_name(on_cuda),
        })
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"attention fp16 on {rows[0]['device'] if rows else '?'}; TFLOP/s = 4*B*H*Nq*Nk*d / time; torch = SDPA "
          f"({rows[0]['torch_backend'] if rows else '?'})")
    header = f"{'shape':<22}{'B':>3}{'H':>4}{'Nq':>7}{'Nk':>7}{'d':>5}{'ms':>10}{'TFLOP/s':>9}{'torch ms':>10}" \
             f"{'TFLOP/s':>9}{'speedup':>9}{'tiles':>8}{'1-tile ms':>10}{'max err':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape']:<22}{r['B']:>3}{r['heads']:>4}{r['Nq']:>7}{r['Nk']:>7}{r['d']:>5}{r['ms']:>10.4f}"
              f"{r['tflops']:>9.1f}{r['torch_ms']:>10.4f}{r['torch_tflops']:>9.1f}{r['speedup']:>8.2f}x"
              f"{r['d_tiles']:>8}{'-' if r['nosplit_ms'] is None else format(r['nosplit_ms'], '.4f'):>10}"
              f"{r['max_abs_err']:>10.1e}")


if __name__ == "__main__":
    sys.exit(harness.main(__doc__, run, print_table))
