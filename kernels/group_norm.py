"""GroupNorm (+ optional fused SiLU) for Stable Diffusion's UNet and VAE.

For x (N, C, H, W) split into G groups of C/G channels, each (n, g) group of M = (C/G) * H * W values is normalised
on its own statistics, then every channel gets its affine weight and bias:

    mean = sum(x) / M                  var = sum((x - mean)^2) / M          (biased, as F.group_norm)
    y    = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]
    y    = y * sigmoid(y)              if silu   (every SD resnet block runs GroupNorm then SiLU)

SD's shapes: G = 32, C = 320 .. 2560 (C/G = 10 .. 80 channels per group), H*W = 8^2 .. 128^2, so a group holds from
640 to over a million values, and there are only N * 32 groups (32 or 64): one program per group cannot fill a GPU
with 132 SMs. We therefore use a *split reduction* in two kernels:

  1. _group_norm_stats_kernel, grid (N*G, SPLIT): program (ng, s) reduces a contiguous range of H*W positions of its
     group (all C/G channels) to two fp32 partial sums and writes them to a tiny (N*G, SPLIT, 2) buffer.
  2. _group_norm_apply_kernel, same grid: each program re-reads the SPLIT partials of its group (a few hundred bytes),
     turns them into mean and 1/std, folds weight and 1/std into one scale per channel, and normalises the same
     range it reduced in step 1: y = (x - mean) * (w * rstd) + b, then SiLU.

x is read twice and y written once. SPLIT is chosen so the grid has a few programs per SM; each program then handles
a slice small enough that, for SD's activations (<= 21 MB for 2 x 320 x 128^2 fp16), the second read mostly hits L2.

Statistics in fp32 with a shift: summing x and x^2 and taking E[x^2] - E[x]^2 cancels catastrophically when
|mean| >> std. We sum (x - K) and (x - K)^2 instead, with K = the group's first value (the "shifted data" algorithm):
the variance is unchanged by the shift and K is of the data's magnitude, so the cancellation is bounded by the
spread of the data instead of its offset. The partials from different programs add up because they share K.
The normalisation stays in the shifted domain too, ((x - K) - (mean - K)) * scale: x - K is exact for values near K,
while rounding mean = (mean - K) + K to fp32 would cost an ulp of |mean| relative to std.

Memory formats: a group is a (H*W, C/G) tile with strides (stride_hw, stride_c): contiguous NCHW has
(1, H*W) and channels-last NHWC has (C, 1). The kernels take both strides, so one kernel serves both formats, and
Triton specialises the stride that equals 1 so the loads are vectorised along whichever axis is contiguous.
The channel axis is padded to a power of two (BLOCK_C) and masked. The output has x's memory format and dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements of x per loop iteration of a program: (BLOCK_HW, BLOCK_C) with BLOCK_HW * BLOCK_C = _TILE.
# 2048 values over 4 warps is 16 per thread: enough loads in flight, two fp32 accumulators fit in registers.
_TILE = 2048
_NUM_WARPS = 4
# Programs wanted per SM on CUDA; on CPU (Triton's interpreter) a fixed small target so tests still split groups.
_PROGRAMS_PER_SM = 4
_TARGET_PROGRAMS_CPU = 64


@triton.jit
def _group_norm_stats_kernel(
    X, PARTIAL,  # PARTIAL: (N*G, SPLIT, 2) fp32, sum(x - K) and sum((x - K)^2) of each slice
    stride_xn, stride_xc, stride_xhw,
    G, HW, CPG, HW_PER_PROGRAM, SPLIT,  # CPG: channels per group; HW_PER_PROGRAM: a multiple of BLOCK_HW
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    x_base = X + n.to(tl.int64) * stride_xn + (g * CPG).to(tl.int64) * stride_xc
    offs_c = tl.arange(0, BLOCK_C)
    offs_hw = tl.arange(0, BLOCK_HW)
    c_mask = offs_c < CPG

    shift = tl.load(x_base).to(tl.float32)  # K = x[n, g * CPG, 0, 0], identical in every program of the group
    sum1 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    hw_start = pid_s * HW_PER_PROGRAM
    hw_end = tl.minimum(hw_start + HW_PER_PROGRAM, HW)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        hw = hw0 + offs_hw
        mask = (hw[:, None] < HW) & c_mask[None, :]
        ptrs = x_base + hw[:, None] * stride_xhw + offs_c[None, :] * stride_xc  # (BLOCK_HW, BLOCK_C)
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift, 0.0)
        sum1 += x
        sum2 += x * x

    out = PARTIAL + (pid_ng * SPLIT + pid_s) * 2
    tl.store(out, tl.sum(tl.sum(sum1, 1), 0))
    tl.store(out + 1, tl.sum(tl.sum(sum2, 1), 0))


@triton.jit
def _group_norm_apply_kernel(
    X, Y, W, B, PARTIAL,
    stride_xn, stride_xc, stride_xhw,
    stride_yn, stride_yc, stride_yhw,
    G, HW, CPG, HW_PER_PROGRAM, SPLIT,
    inv_count, eps,  # inv_count = 1 / (CPG * HW)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,  # next power of two >= SPLIT
):
    pid_ng = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    x_base = X + n.to(tl.int64) * stride_xn + (g * CPG).to(tl.int64) * stride_xc
    y_base = Y + n.to(tl.int64) * stride_yn + (g * CPG).to(tl.int64) * stride_yc
    offs_c = tl.arange(0, BLOCK_C)
    offs_hw = tl.arange(0, BLOCK_HW)
    c_mask = offs_c < CPG

    # Group statistics from the SPLIT partials written by _group_norm_stats_kernel (all fp32).
    offs_s = tl.arange(0, BLOCK_SPLIT)
    part = PARTIAL + pid_ng * SPLIT * 2 + offs_s * 2
    s1 = tl.sum(tl.load(part, mask=offs_s < SPLIT, other=0.0), 0)
    s2 = tl.sum(tl.load(part + 1, mask=offs_s < SPLIT, other=0.0), 0)
    mean_shifted = s1 * inv_count  # mean - K
    var = tl.maximum(s2 * inv_count - mean_shifted * mean_shifted, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = tl.load(x_base).to(tl.float32)  # K, as in the stats kernel

    # Per-channel scale = weight * rstd. We normalise in the shifted domain, ((x - K) - (mean - K)) * scale + bias:
    # folding everything into x * scale + (bias - mean * scale) would cancel two numbers of size |mean| * scale.
    scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    if HAS_WEIGHT:
        scale *= tl.load(W + g * CPG + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(B + g * CPG + offs_c, mask=c_mask, other=0.0).to(tl.float32)

    hw_start = pid_s * HW_PER_PROGRAM
    hw_end = tl.minimum(hw_start + HW_PER_PROGRAM, HW)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        hw = hw0 + offs_hw
        mask = (hw[:, None] < HW) & c_mask[None, :]
        x = tl.load(x_base + hw[:, None] * stride_xhw + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
        y = ((x.to(tl.float32) - shift) - mean_shifted) * scale[None, :] + bias[None, :]  # (BLOCK_HW, BLOCK_C)
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + hw[:, None] * stride_yhw + offs_c[None, :] * stride_yc, y.to(Y.dtype.element_ty), mask=mask)


def _spatial_stride(t: torch.Tensor) -> int | None:
    """Stride of the flattened H*W axis, or None when H and W cannot be flattened into one strided axis."""
    _, _, h, w = t.shape
    if w == 1:
        return t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t.stride(3)
    return None


def _num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _TARGET_PROGRAMS_CPU


def _check_inputs(x, num_groups, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"group_norm: x must be a rank-4 tensor (N, C, H, W), got {shape}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"group_norm: x has dtype {x.dtype}; supported: fp16, bf16, fp32")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"group_norm: num_groups={num_groups} must be a positive divisor of C={C}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (C,):
            raise ValueError(f"group_norm: {name} must have shape ({C},), got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"group_norm: {name} is on {p.device} but x is on {x.device}")


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps), then SiLU if silu; statistics in fp32.

    x: (N, C, H, W), contiguous or channels-last, fp16/bf16/fp32. weight, bias: (C,) or None.
    Returns a tensor of x's dtype and memory format.
    """
    _check_inputs(x, num_groups, weight, bias)
    if _spatial_stride(x) is None:  # neither NCHW nor NHWC (e.g. a strided slice): work on a contiguous copy
        x = x.contiguous()
    y = torch.empty_like(x)  # keeps x's strides, hence its memory format
    N, C, H, W = x.shape
    HW = H * W
    if x.numel() == 0:
        return y
    cpg = C // num_groups
    n_groups = N * num_groups

    block_c = triton.next_power_of_2(cpg)
    block_hw = min(max(1, _TILE // block_c), triton.next_power_of_2(HW))
    n_tiles = triton.cdiv(HW, block_hw)
    split = max(1, min(n_tiles, triton.cdiv(_num_programs_target(x.device), n_groups)))
    hw_per_program = triton.cdiv(n_tiles, split) * block_hw
    split = triton.cdiv(HW, hw_per_program)  # drop programs that rounding left without work

    partial = torch.empty((n_groups, split, 2), dtype=torch.float32, device=x.device)
    grid = (n_groups, split)
    x_strides = (x.stride(0), x.stride(1), _spatial_stride(x))
    y_strides = (y.stride(0), y.stride(1), _spatial_stride(y))
    sizes = (num_groups, HW, cpg, hw_per_program, split)
    blocks = {"BLOCK_HW": block_hw, "BLOCK_C": block_c, "num_warps": _NUM_WARPS}
    _group_norm_stats_kernel[grid](x, partial, *x_strides, *sizes, **blocks)
    _group_norm_apply_kernel[grid](
        x, y,
        weight if weight is not None else x,  # dummy pointer, never read when HAS_WEIGHT is False
        bias if bias is not None else x,
        partial, *x_strides, *y_strides, *sizes, 1.0 / (cpg * HW), float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=bool(silu),
        BLOCK_SPLIT=triton.next_power_of_2(split), **blocks,
    )
    return y


def group_norm_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """F.group_norm in fp32 (+ SiLU), cast back to x's dtype in x's memory format."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    # Contiguous on purpose: torch's CPU channels-last group norm computes E[x^2] - E[x]^2 unshifted and is far off
    # when |mean| >> std (torch 2.13); the NCHW path is accurate.
    y = F.group_norm(x.float().contiguous(), num_groups, w, b, eps)
    if silu:
        y = F.silu(y)
    return torch.empty_like(x).copy_(y)
