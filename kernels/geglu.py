"""GEGLU, the gated GELU of every SD transformer block's feed-forward (diffusers' `activations.GEGLU`).

The feed-forward's first projection writes h (..., 2F); its two halves are a value and a gate:

    a, gate = h[..., :F], h[..., F:]
    y       = a * gelu(gate)            gelu(g) = 0.5 * g * (1 + erf(g / sqrt(2)))   (exact, approximate="none")

SD's F = 4 * channels: 1280, 2560, 5120 (SD 1.5's 320, 640, 1280 channels; SDXL's 640 and 1280), so h is up to
10240 wide. Rows M = batch 2 (classifier-free guidance) x the latent pixels at that level: SD 1.5 at 512px runs
8192 x 1280, 2048 x 2560, 512 x 5120 and 128 x 5120 (mid block); SDXL at 1024px 8192 x 2560 and 2048 x 5120.

Why fused: eager PyTorch runs gelu, then mul, as two kernels, and moves 5 * M * F elements (gelu reads gate and
writes g'; mul reads a and g' and writes y). This kernel reads h once and writes y once:

    bytes = (2F + F) * M * element_size

3/5 of eager's traffic; at SD 1.5's 8192 x 1280 fp16 that is 63 MB instead of 105 MB per call, 16 calls per UNet
step. The op is memory-bound (~20 flops per 6 fp16 bytes), so ~5/3 is the speedup to expect over eager.

Work split: rows M = prod(h.shape[:-1]) and a 2-D grid (cdiv(M, BLOCK_M), cdiv(F, BLOCK_N)). A program loads the
(BLOCK_M, BLOCK_N) tiles of a and of gate at the same columns (gate is F elements to the right), computes in fp32
and stores one (BLOCK_M, BLOCK_N) tile of y. Columns start at multiples of BLOCK_N and F and the row stride are
runtime ints that Triton marks divisible by 16 when they are (SD's always are), so it can prove every run of 8 fp16
(4 fp32) columns 16-byte aligned and issue vector loads and stores; any other F is still correct, with narrower
accesses. Row offsets are int64: M * 2F passes 2^31 elements from about 52 images a batch (with guidance) at
SDXL's 64^2 level.

Layout: the last dim must be contiguous (stride 1); the leading dims may have any strides that flatten into one
row axis (a slice h[:, :2F] of a wider tensor, say), else h is copied contiguous first. The output is a contiguous
(..., F) tensor of h's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A (16, 256) tile over 4 warps: 32 elements a thread of a and of gate, i.e. four 16-byte fp16 loads of each in
# flight before the first is used, and four 16-byte stores (compiled for sm_90 at SD's F: 80 registers, no spills,
# only 16-byte accesses). 256 divides every SD F (no masked column block), and the grid still has 160 to 5120
# programs at SD's shapes, several per SM on an H100's 132. No autotune: an elementwise kernel with enough bytes in
# flight runs at the memory's speed, and the benchmark's pct_copy says whether it does.
_BLOCK_M = 16
_BLOCK_N = 256
_NUM_WARPS = 4


@triton.jit
def _geglu_kernel(
    H, Y,  # H: (M, 2F) rows of stride stride_hm, last dim contiguous; Y: (M, F) contiguous
    M, F, stride_hm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    rows = rows.to(tl.int64)

    a_ptrs = H + rows[:, None] * stride_hm + cols[None, :]  # (BLOCK_M, BLOCK_N)
    a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(a_ptrs + F, mask=mask, other=0.0).to(tl.float32)  # the gate half, same columns
    y = a * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))  # 1 / sqrt(2)
    tl.store(Y + rows[:, None] * F + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _row_stride(h: torch.Tensor) -> int | None:
    """Stride between consecutive rows when h's leading dims flatten into one row axis, else None."""
    stride = expected = None
    for size, st in reversed(list(zip(h.shape[:-1], h.stride()[:-1]))):  # innermost leading dim first
        if size == 1:
            continue
        if stride is None:
            stride = st
        elif st != expected:
            return None
        expected = st * size
    return h.shape[-1] if stride is None else stride  # one row (or none): any stride does


def _check_inputs(h) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() < 1:
        shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"geglu: h must be a tensor of rank >= 1 (..., 2F), got {shape}")
    if h.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"geglu: h has dtype {h.dtype}; supported: fp16, bf16, fp32")
    if h.shape[-1] % 2:
        raise ValueError(f"geglu: h's last dim must be even (2F), got {h.shape[-1]}")
    if h.shape[-1] > 1 and h.stride(-1) != 1:
        raise ValueError(f"geglu: h's last dim must be contiguous (stride 1), got stride {h.stride(-1)}")


def geglu(h: torch.Tensor) -> torch.Tensor:
    """a * gelu(gate) for a, gate = h.chunk(2, dim=-1), exact (erf) GELU, math in fp32.

    h: (..., 2F), fp16/bf16/fp32, last dim contiguous. Returns a contiguous (..., F) tensor of h's dtype.
    """
    _check_inputs(h)
    f = h.shape[-1] // 2
    y = torch.empty((*h.shape[:-1], f), dtype=h.dtype, device=h.device)
    if y.numel() == 0:
        return y
    if _row_stride(h) is None:  # e.g. a transposed (N, B, 2F) view: its rows are not one strided axis
        h = h.contiguous()
    for kernel, grid, args, kwargs in launches(h, y):
        kernel[grid](*args, **kwargs)
    return y


def launches(h: torch.Tensor, y: torch.Tensor) -> list[tuple]:
    """The (kernel, grid, args, kwargs) launch of geglu for h -> y; tools compile it without a GPU
    (benchmarks/kernels/sm90_report.py). h: (..., 2F) whose leading dims flatten into rows, y: (..., F) contiguous."""
    f = y.shape[-1]
    m = y.numel() // f
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(f, _BLOCK_N))
    return [(_geglu_kernel, grid, (h, y, m, f, _row_stride(h)),
             {"BLOCK_M": _BLOCK_M, "BLOCK_N": _BLOCK_N, "num_warps": _NUM_WARPS})]


def geglu_ref(h: torch.Tensor) -> torch.Tensor:
    """The math in fp32: a.float() * F.gelu(gate.float()), cast back to h's dtype."""
    a, gate = h.chunk(2, dim=-1)
    return (a.float() * F.gelu(gate.float())).to(h.dtype)
