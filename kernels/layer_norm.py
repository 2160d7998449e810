"""Residual add + LayerNorm, fused: the pre-norms of every SD transformer block (diffusers' BasicTransformerBlock).

A BasicTransformerBlock (norm_type "layer_norm") adds each sublayer's output to the residual stream h and normalises
the sum for the next sublayer: after self-attention (then norm2) and after cross-attention (then norm3):

    s    = x + residual                                     x: the attention's output, residual: h
    mean = sum(s) / C        var = sum((s - mean)^2) / C    over the last dim C (biased, as nn.LayerNorm)
    y    = (s - mean) / sqrt(var + eps) * weight + bias

s is the new residual stream and y the next sublayer's input, so both are outputs. Before norm3 the stream then
meets the feed-forward, whose output GEMM sdrt accumulates into it in place; that GEMM's bias rides in s instead
(`s_bias`: s + s_bias is stored, the statistics are still of s). SD's C is the level's channels:
320, 640, 1280 (SD 1.5 and 2.x UNets), 640 and 1280 (SDXL), and 1024 in SD 2.x's OpenCLIP text encoder, whose layers
add and normalise the same way (CLIP: 2 x 77 rows). Rows M = batch 2 (classifier-free guidance) x the latent pixels
at that level: SD 1.5 at 512px runs 8192 x 320, 2048 x 640, 512 x 1280 and 128 x 1280 (mid block), 32 such pairs a
UNet step; SDXL at 1024px 8192 x 640 and 2048 x 1280, in 2 to 10 blocks a transformer.

Why fused: eager PyTorch runs the add (reads x and residual, writes s) and then layer_norm (reads s, writes y): two
launches and 5 * M * C elements. This kernel reads x and residual once and writes s and y once:

    bytes = 4 * M * C * element_size

4/5 of eager's traffic (8192 x 320 fp16: 21 MB instead of 26 MB) and one launch instead of two; ~10 flops per 8
bytes is memory-bound, so ~5/4 is the speedup to expect at large M, more at small M, where a launch's fixed cost
(ramp-up, tail, the gap between two kernels) is a good part of the time.

Work split: a 1-D grid of cdiv(M, BLOCK_M) programs. A program holds BLOCK_M whole rows in registers, a (BLOCK_M,
BLOCK_C) tile with BLOCK_C = next_pow2(C), the columns past C masked (320, 640 and 1280 are not powers of two: 320
fills 5/8 of its 512 lanes). Each element is read once and the statistics are two-pass over the registers: the
mean, then the variance of (s - mean). One pass of sum(s) and sum(s^2) would cancel catastrophically when |mean| >>
std (E[s^2] - mean^2 in fp32 at a mean of 1e3 and a std of 2: errors of 0.1 in y, against 4e-5 in two passes); the
second pass costs no memory traffic here. Statistics and the normalisation in fp32.

Rounding: s is rounded once to the inputs' dtype from the fp32 sum, which is what eager `x + residual` does (fp16
and bf16 adds compute in fp32), so s equals it bitwise. That is also the correctly rounded fp16 (bf16) sum, since
fp32 holds more than 2p + 2 bits of the p-bit format and rounding twice changes nothing: compiled for sm_90 it
becomes add.f16x2 (add.bf16x2). The statistics are taken from s as stored, so y equals eager
F.layer_norm(x + residual) up to the order of the fp32 sums.

Alignment: C and the row strides are runtime ints that Triton marks divisible by 16 when they are (SD's always are),
so it can prove runs of 8 fp16 (4 fp32) columns 16-byte aligned and unmasked or masked together, and issue vector
loads and stores; any other C is still correct, with narrower accesses. Row offsets are int64: M * C passes 2^31
elements from about 800 images a batch at SDXL's 64^2 level (4096 pixels x 640 channels an image).

Layout: x and residual (..., C) with a contiguous last dim; their leading dims may have any strides that flatten
into one row axis, else they are copied contiguous first. s and y are contiguous tensors of the inputs' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .geglu import _row_stride

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements of each input a program loads: (BLOCK_M, BLOCK_C) with BLOCK_M * BLOCK_C = _TILE while a row fits. Over 4
# warps that is 32 values a thread of x and of residual, four 16-byte fp16 loads of each issued before the first is
# used (16 KB a program, 10 KB of it real at SD's C), and the grid still has 256 to 2048 programs at SD's large
# shapes, 2 to 15 per SM on an H100's 132: 20 KB (512 x 1280) to ~100 KB real bytes in flight per SM, against the
# ~20 KB (H100) to ~30 KB (H200) an SM that Little's law asks of HBM (group_norm.py). Compiled for sm_90 at SD's C,
# fp16: 48 to 70 registers, no spills, only 16-byte loads and stores of x, residual, s and y. Whole rows must fit: a
# row wider than the tile gets more warps instead, up to 16 (32 values a thread up to C = 16384, 64 at the cap
# _MAX_C; past it, spills).
_TILE = 4096
_MAX_C = 32768


def _launch_config(C: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for rows of C columns: C = 320 -> (8, 512, 4), 640 and 1024 -> (4, 1024, 4),
    1280 -> (2, 2048, 4), 8192 -> (1, 8192, 8)."""
    block_c = triton.next_power_of_2(C)
    block_m = max(1, _TILE // block_c)
    num_warps = min(16, max(4, block_c // 1024))  # <= 64 fp32 values a thread of each tensor (32 below 32768)
    return block_m, block_c, num_warps


@triton.jit
def _add_layer_norm_kernel(
    X, R, S, Y, W, B, SB,  # X, R: (M, C) rows of strides stride_xm, stride_rm, last dim contiguous; S, Y: (M, C)
    M, C, stride_xm, stride_rm, eps,  # contiguous; W, B, SB: (C,)
    HAS_RESIDUAL: tl.constexpr,  # else s is x itself and S is not written
    HAS_S_BIAS: tl.constexpr,  # S gets s + s_bias (with a residual only)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next_pow2(C): whole rows
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows[:, None] < M) & col_mask[None, :]
    rows = rows.to(tl.int64)

    s = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)  # (BLOCK_M, BLOCK_C)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # rounded once, as eager's add
        s_out = s
        if HAS_S_BIAS:  # a second rounded add, as eager's (x + residual) + s_bias
            s_out = (s.to(tl.float32) + tl.load(SB + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :])
            s_out = s_out.to(X.dtype.element_ty)
        tl.store(S + rows[:, None] * C + cols[None, :], s_out, mask=mask)
    s = s.to(tl.float32)  # the statistics of s as stored; masked lanes are 0

    mean = tl.sum(s, axis=1) / C  # (BLOCK_M,)
    d = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / C
    y = d * (1.0 / tl.sqrt(var + eps))[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _check_inputs(x, residual, weight, bias, s_bias=None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"add_layer_norm: x must be a tensor of rank >= 1 (..., C), got {shape}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"add_layer_norm: x has dtype {x.dtype}; supported: fp16, bf16, fp32")
    C = x.shape[-1]
    if C > _MAX_C:
        raise ValueError(f"add_layer_norm: C={C} is wider than {_MAX_C}: a row must fit in one program's registers")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
            shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"add_layer_norm: residual must have x's shape {tuple(x.shape)}, got {shape}")
        if residual.dtype != x.dtype:
            raise ValueError(f"add_layer_norm: residual has dtype {residual.dtype} but x has {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"add_layer_norm: residual is on {residual.device} but x is on {x.device}")
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and C > 1 and t.stride(-1) != 1:
            raise ValueError(f"add_layer_norm: {name}'s last dim must be contiguous (stride 1), got {t.stride(-1)}")
    if s_bias is not None and residual is None:
        raise ValueError("add_layer_norm: s_bias needs a residual (without one, s is x itself and is not written)")
    if isinstance(s_bias, torch.Tensor) and s_bias.dtype != x.dtype:  # s's second add is in s's dtype, as eager's
        raise ValueError(f"add_layer_norm: s_bias has dtype {s_bias.dtype} but x has {x.dtype}")
    for name, p in (("weight", weight), ("bias", bias), ("s_bias", s_bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or p.shape != (C,):
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"add_layer_norm: {name} must have shape ({C},), got {shape}")
        if p.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"add_layer_norm: {name} has dtype {p.dtype}; supported: fp16, bf16, fp32")
        if p.device != x.device:
            raise ValueError(f"add_layer_norm: {name} is on {p.device} but x is on {x.device}")


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    s_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): s = x + residual in the inputs' dtype, y = F.layer_norm(s, (C,), weight, bias, eps), statistics in
    fp32 from s as stored.

    x, residual: (..., C), same shape and dtype (fp16/bf16/fp32), last dim contiguous. residual None: plain
    LayerNorm, s is x itself (returned as given, nothing written). weight, bias: (C,) or None. s (when computed) and
    y are contiguous tensors of x's dtype.

    s_bias (C,) or None, with a residual only: the s returned is (x + residual) + s_bias, each add rounded as eager's,
    while y stays the norm of x + residual. It carries the bias of a later GEMM that accumulates into s in place
    (`s.addmm_(h, w.t())`, beta = 1): TransformerBlock's feed-forward output and its residual add, one GEMM instead
    of a GEMM with a bias epilogue and an add kernel.
    """
    _check_inputs(x, residual, weight, bias, s_bias)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return s, y
    # inputs whose rows are not one strided axis (e.g. a transposed (N, B, C) view) are copied
    x_in = x if _row_stride(x) is not None else x.contiguous()
    r_in = residual if residual is None or _row_stride(residual) is not None else residual.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    s_bias = s_bias.contiguous() if s_bias is not None else None
    for kernel, grid, args, kwargs in launches(x_in, r_in, s, y, weight, bias, eps, s_bias):
        kernel[grid](*args, **kwargs)
    return s, y


def launches(x, residual, s, y, weight, bias, eps: float, s_bias=None) -> list[tuple]:
    """The (kernel, grid, args, kwargs) launch of add_layer_norm; tools compile it without a GPU
    (benchmarks/kernels/sm90_report.py). x, residual (or None): (..., C) whose leading dims flatten into rows; s, y
    contiguous like x; weight, bias, s_bias contiguous (C,) or None."""
    C = x.shape[-1]
    m = y.numel() // C
    block_m, block_c, num_warps = _launch_config(C)
    args = (x, residual if residual is not None else x, s, y,  # dummy pointers are never read: HAS_* is False
            weight if weight is not None else y, bias if bias is not None else y, s_bias if s_bias is not None else y,
            m, C, _row_stride(x), _row_stride(residual) if residual is not None else 0, float(eps))
    return [(_add_layer_norm_kernel, (triton.cdiv(m, block_m),), args,
             {"HAS_RESIDUAL": residual is not None, "HAS_S_BIAS": s_bias is not None,
              "HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None,
              "BLOCK_M": block_m, "BLOCK_C": block_c, "num_warps": num_warps})]


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    s_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) in plain PyTorch: s = x + residual in x's dtype (x when residual is None), y = F.layer_norm of s.float()
    with fp32 weight and bias, cast back to x's dtype; then s + s_bias returned as s when s_bias is given."""
    s = x + residual if residual is not None else x
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = F.layer_norm(s.float(), (x.shape[-1],), w, b, eps).to(x.dtype)
    return (s if s_bias is None else s + s_bias), y
