"""GroupNorm (+ optional fused SiLU) for Stable Diffusion's UNet and VAE.

For x (N, C, H, W) split into G groups of C/G channels, each (n, g) group of M = (C/G) * H * W values is normalised
on its own statistics, then every channel gets its affine weight and bias:

    mean = sum(x) / M                  var = sum((x - mean)^2) / M          (biased, as F.group_norm)
    y    = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]
    y    = y * sigmoid(y)              if silu   (every SD resnet block runs GroupNorm then SiLU)

With `add` (N, C), x[n, c] + add[n, c] stands for x throughout, never materialised: SD's resnets normalise the conv
output plus the time embedding's projection, which eager PyTorch adds in a full pass of its own.

SD's shapes: G = 32, C = 320 .. 2560 (C/G = 10 .. 80 channels per group), H*W = 8^2 .. 128^2, so a group holds from
640 to over a million values, and there are only N * 32 groups (32 or 64): one program per group cannot fill a GPU
with 132 SMs. We therefore use a *split reduction*:

  1. _group_norm_stats_kernel, grid (N * chunks, SPLIT): program (nk, s) reduces a contiguous range of H*W positions
     of one *chunk* of GPP adjacent groups (all their channels) to two fp32 partial sums per group and writes them
     to a tiny (N*G, SPLIT, 2) buffer.
  2. _group_norm_apply_kernel, same grid: each program reads the SPLIT partials of its groups, turns them into mean
     and 1/std, folds weight and 1/std into one scale per channel, and normalises the same range it reduced in
     step 1: y = (x - mean) * (w * rstd) + b, then SiLU. Where GPP * SPLIT is large (channels-last), every program
     re-reading all those partials would cost a good fraction of its own bytes, so a third, tiny kernel between
     the two (_group_norm_finalize_kernel) reduces them once per group to (N*G, 2) statistics.

On Hopper the second and third kernels are launched *programmatically dependent* (PDL): the stats kernel lets them
launch at once, they run their prologue (chunk setup, the group shifts) while the previous kernel finishes, and
wait (griddepcontrol.wait) before they read its outputs. That hides most of a launch boundary, the fixed cost that
dominates SD's small shapes (5-10 us for two launches on an H100).

Small groups take one kernel instead (_group_norm_one_pass_kernel, grid (N * chunks,)): where a chunk's padded
(next_pow2(H*W), BLOCK_C) tile holds at most _ONE_PASS_MAX values, one program loads all of it into registers,
reduces it and normalises it there, so x is read once and there is one launch. That is SD's 8^2 and 16^2 levels
(0.3-2.6 MB, where the two launches' fixed cost was most of the time). Larger tiles would need more registers than
a thread has (16384 fp32 values over 16 warps are already 32 a thread), and fewer programs than SMs stream slowly.

In the split plan, x is read twice and y written once. SPLIT is chosen so the grid has a few programs per SM; each
program then handles a slice small enough that, for SD's activations (<= 21 MB for 2 x 320 x 128^2 fp16), the
second read mostly hits L2.
Past L2 (the VAE decoder's 1 x 128 x 512^2 is 67 MB; an H100's L2 is 50 MB) the apply kernel walks each slice from
its end, so it starts on the tiles the stats kernel read last, the ones L2 still holds, instead of the first ones,
which the rest of the stats pass has evicted by then.

Groups per program (GPP). A program's tile is (BLOCK_HW pixels, BLOCK_C channels) with BLOCK_C = next_pow2(GPP *
C/G), masked past the chunk. In NCHW the H*W axis is contiguous, so GPP = 1 and each channel row of the tile is
a contiguous run. In channels-last (NHWC, what sdrt's torch backend runs) the *channel* axis is contiguous: one
group of 4 (the VAE's 128 channels) to 10 channels (320) is an 8 to 20 byte run per pixel, a fraction of each
32-byte sector fetched, with the rest of the pixel's row C elements away. A chunk of several groups reads one
contiguous run of GPP * C/G channels per pixel instead (>= 128 bytes, 16-byte aligned, little padding: 12 groups
of 10 channels are 120 of 128 lanes). The chunk width is a constexpr so that Triton can prove the runs aligned:
compiled for sm_90 (ptxas, checked without a GPU), one group a program at C/G = 10..40 and the runtime-width
chunk both gave scalar 2-byte loads and stores; constexpr chunks give 16-byte ones. Per-group sums come from
per-channel sums by a one-hot (BLOCK_C, BLOCK_G) reduction once per program, not per element.

Statistics in fp32 with a shift: summing x and x^2 and taking E[x^2] - E[x]^2 cancels catastrophically when
|mean| >> std. We sum (x - K) and (x - K)^2 instead, with K = the group's first value (the "shifted data" algorithm):
the variance is unchanged by the shift and K is of the data's magnitude, so the cancellation is bounded by the
spread of the data instead of its offset. The partials from different programs add up because they share K.
The normalisation stays in the shifted domain too, ((x - K) - (mean - K)) * scale: x - K is exact for values near K,
while rounding mean = (mean - K) + K to fp32 would cost an ulp of |mean| relative to std.

Memory formats: a group is a (H*W, C/G) tile with strides (stride_hw, stride_c): contiguous NCHW has
(1, H*W) and channels-last NHWC has (C, 1). The kernels take both strides, so one kernel serves both formats, and
Triton specialises the stride that equals 1 so the loads are vectorised along whichever axis is contiguous.
The output has x's memory format and dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements of x a program loads per loop iteration (the default of GroupNormTuning.tile): (BLOCK_HW, BLOCK_C) with
# BLOCK_HW * BLOCK_C = tile. The grid holds ~_PROGRAMS_PER_SM programs per SM, so the tile sets the bytes in flight:
# 4096 fp16 values over 4 warps is 32 a thread, four 16-byte loads issued before the first is used, 32 KB per SM,
# 4.2 MB over 132 SMs. Little's law at HBM's ~0.8 us latency wants ~2.7 MB in flight for an H100's 3.35 TB/s and
# ~3.8 MB for an H200's 4.8 TB/s; the 2048 the H100 measured (its HBM-bound 1x128x512^2 moved ~2 TB/s of real
# traffic) had half. Compiled for sm_90: <= 118 registers, no spills (sm90_compile.md).
_TILE = 4096
_NUM_WARPS = 4
# Programs wanted per SM on CUDA; on CPU (Triton's interpreter) a fixed small target so tests still split groups.
_PROGRAMS_PER_SM = 4
_TARGET_PROGRAMS_CPU = 64
# Channels-last chunks: at least this many contiguous bytes per pixel (a 128-byte line, four 32-byte sectors), at
# most _MAX_BLOCK_C lanes wide, so a tile still spans several pixels (16 at the default tile).
_MIN_RUN_BYTES = 128
_MAX_BLOCK_C = 256
# Partials (GPP * SPLIT) an apply program may reduce itself before a finalize kernel does it once per group.
_MAX_PARTIALS_PER_APPLY = 32
# One-pass plans: a chunk of at most this many (padded) elements is one program's tile, held in registers. 16384
# fp32 values over 16 warps are 32 a thread (the split kernels' default tile is 4096 over 4 warps: the same).
# In SD that is the UNet's 8^2 and 16^2 levels (e.g. 2 x 1280 x 16^2: 64 programs of 256 x 64 lanes).
_ONE_PASS_MAX = 16384
# Offsets inside one sample are int32 in the kernels (only each program's (n, c0) base is int64), so a sample that
# spans more elements takes PyTorch's GroupNorm instead: SD's largest, the VAE decoder's 256 x H x W at full resolution,
# gets there past ~2900^2 pixels (2^30 at 2048^2).
_MAX_SAMPLE_NUMEL = 2**31 - 1


@triton.jit
def _chunk_setup(X, ADD, stride_xn, stride_xc, stride_an, pid_nk, C, CPG, N_CHUNKS,
                 CHUNK_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, HAS_ADD: tl.constexpr):
    """Program row pid_nk's chunk of GPP = CHUNK_C / CPG adjacent groups of one sample, seen per channel lane.

    Returns n, the chunk's first channel c0, its first (n * G + g) group index, x's base pointer for the chunk, the
    channel lanes (BLOCK_C,) and their mask, the (BLOCK_C, BLOCK_G) one-hot of lane -> group within the chunk, the
    group mask (BLOCK_G,), and each lane's shift (BLOCK_C,) fp32: K = x[n, first channel of the group, hw=0].
    With HAS_ADD the normalised input is x + add[n, c]: K is taken on it too, and the lane's shift becomes
    K - add[n, c], so that x - shift = (x + add) - K costs the inner loops nothing extra.
    CHUNK_C is a constexpr so that Triton knows c0's alignment and the mask's constancy (16-byte loads)."""
    n = pid_nk // N_CHUNKS
    c0 = (pid_nk % N_CHUNKS) * CHUNK_C
    x_base = X + n.to(tl.int64) * stride_xn + c0.to(tl.int64) * stride_xc
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = (offs_c < CHUNK_C) & (c0 + offs_c < C)  # the last chunk may hold fewer groups
    lane_group = offs_c // CPG  # once per program, not per element
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = (offs_g * CPG < CHUNK_C) & (c0 + offs_g * CPG < C)
    one_hot = (lane_group[:, None] == offs_g[None, :]) & c_mask[:, None]
    shift = tl.load(x_base + lane_group * CPG * stride_xc, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        a_base = ADD + n.to(tl.int64) * stride_an + c0
        shift += tl.load(a_base + lane_group * CPG, mask=c_mask, other=0.0).to(tl.float32)
        shift -= tl.load(a_base + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    return n, c0, n * (C // CPG) + c0 // CPG, x_base, offs_c, c_mask, one_hot, g_mask, shift


@triton.jit
def _group_stats(PARTIAL, rows, row_mask, SPLIT, inv_count, eps, BLOCK_SPLIT: tl.constexpr):
    """(mean - K, 1 / std) of the groups `rows` (BLOCK_R,) from their SPLIT partial sums, all fp32."""
    offs_s = tl.arange(0, BLOCK_SPLIT)
    part = PARTIAL + (rows[:, None] * SPLIT + offs_s[None, :]) * 2  # (BLOCK_R, BLOCK_SPLIT)
    mask = row_mask[:, None] & (offs_s[None, :] < SPLIT)
    s1 = tl.sum(tl.load(part, mask=mask, other=0.0), 1)
    s2 = tl.sum(tl.load(part + 1, mask=mask, other=0.0), 1)
    mean_shifted = s1 * inv_count
    var = tl.maximum(s2 * inv_count - mean_shifted * mean_shifted, 0.0)
    return mean_shifted, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _channel_affine(rstd, W, B, c0, offs_c, c_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Each channel lane's (BLOCK_C,) fp32 scale = weight * rstd and bias (1 * rstd and 0 without them)."""
    scale = rstd
    if HAS_WEIGHT:
        scale *= tl.load(W + c0 + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    bias = tl.zeros_like(rstd)
    if HAS_BIAS:
        bias += tl.load(B + c0 + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    return scale, bias


@triton.jit
def _group_norm_stats_kernel(
    X, ADD, PARTIAL,  # PARTIAL: (N*G, SPLIT, 2) fp32, sum(x - K) and sum((x - K)^2) of each slice
    stride_xn, stride_xc, stride_xhw, stride_an,
    C, HW, CPG, N_CHUNKS, HW_PER_PROGRAM, SPLIT,  # CPG: channels per group; HW_PER_PROGRAM: k * BLOCK_HW
    CHUNK_C: tl.constexpr,  # channels per program: GPP * CPG
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next power of two >= CHUNK_C
    BLOCK_G: tl.constexpr,  # next power of two >= GPP
    HAS_ADD: tl.constexpr,  # normalise x + ADD[n, c], ADD (N, C) with unit channel stride
    PDL: tl.constexpr,  # the next kernel is launched programmatically dependent: let it launch now
):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_nk = tl.program_id(0)
    pid_s = tl.program_id(1)
    _, _, ng0, x_base, offs_c, c_mask, one_hot, g_mask, shift = _chunk_setup(
        X, ADD, stride_xn, stride_xc, stride_an, pid_nk, C, CPG, N_CHUNKS, CHUNK_C, BLOCK_C, BLOCK_G, HAS_ADD)
    offs_hw = tl.arange(0, BLOCK_HW)

    sum1 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    hw_start = pid_s * HW_PER_PROGRAM
    hw_end = tl.minimum(hw_start + HW_PER_PROGRAM, HW)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        hw = hw0 + offs_hw
        mask = (hw[:, None] < HW) & c_mask[None, :]
        ptrs = x_base + hw[:, None] * stride_xhw + offs_c[None, :] * stride_xc  # (BLOCK_HW, BLOCK_C)
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift[None, :], 0.0)
        sum1 += x
        sum2 += x * x

    # (BLOCK_HW, BLOCK_C) -> per channel (BLOCK_C,) -> per group (BLOCK_G,)
    s1 = tl.sum(tl.where(one_hot, tl.sum(sum1, 0)[:, None], 0.0), 0)
    s2 = tl.sum(tl.where(one_hot, tl.sum(sum2, 0)[:, None], 0.0), 0)
    out = PARTIAL + ((ng0 + tl.arange(0, BLOCK_G)) * SPLIT + pid_s) * 2
    tl.store(out, s1, mask=g_mask)
    tl.store(out + 1, s2, mask=g_mask)


@triton.jit
def _group_norm_finalize_kernel(
    PARTIAL, STATS,  # STATS: (N*G, 2) fp32, mean - K and 1 / std
    N_GROUPS, SPLIT, inv_count, eps,
    BLOCK_R: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # launched early: wait until the stats kernel's partials are complete and visible
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < N_GROUPS
    mean_shifted, rstd = _group_stats(PARTIAL, rows, mask, SPLIT, inv_count, eps, BLOCK_SPLIT)
    tl.store(STATS + rows * 2, mean_shifted, mask=mask)
    tl.store(STATS + rows * 2 + 1, rstd, mask=mask)


@triton.jit
def _group_norm_apply_kernel(
    X, ADD, Y, W, B, PARTIAL, STATS,
    stride_xn, stride_xc, stride_xhw, stride_an,
    stride_yn, stride_yc, stride_yhw,
    C, HW, CPG, N_CHUNKS, HW_PER_PROGRAM, SPLIT,
    inv_count, eps,  # inv_count = 1 / (CPG * HW)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ADD: tl.constexpr,
    SILU: tl.constexpr,
    FINALIZED: tl.constexpr,  # STATS holds each group's statistics; else reduce its SPLIT partials here
    CHUNK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,  # next power of two >= SPLIT
    REVERSE: tl.constexpr,  # walk the slice from its end
    PDL: tl.constexpr,
):
    pid_nk = tl.program_id(0)
    pid_s = tl.program_id(1)
    n, c0, ng0, x_base, offs_c, c_mask, one_hot, g_mask, shift = _chunk_setup(
        X, ADD, stride_xn, stride_xc, stride_an, pid_nk, C, CPG, N_CHUNKS, CHUNK_C, BLOCK_C, BLOCK_G, HAS_ADD)
    y_base = Y + n.to(tl.int64) * stride_yn + c0.to(tl.int64) * stride_yc
    offs_hw = tl.arange(0, BLOCK_HW)

    # Everything above reads only x and add (complete before the stats kernel started), and nothing was written:
    # with PDL that ran while the previous kernel finished. Its outputs are read only after this wait.
    if PDL:
        tl.extra.cuda.gdc_wait()
    rows = ng0 + tl.arange(0, BLOCK_G)
    if FINALIZED:
        mean_shifted = tl.load(STATS + rows * 2, mask=g_mask, other=0.0)  # (BLOCK_G,): mean - K
        rstd = tl.load(STATS + rows * 2 + 1, mask=g_mask, other=0.0)
    else:
        mean_shifted, rstd = _group_stats(PARTIAL, rows, g_mask, SPLIT, inv_count, eps, BLOCK_SPLIT)
    # ... per channel lane (BLOCK_C,), through the one-hot: once per program.
    mean_shifted = tl.sum(tl.where(one_hot, mean_shifted[None, :], 0.0), 1)
    rstd = tl.sum(tl.where(one_hot, rstd[None, :], 0.0), 1)

    # We normalise in the shifted domain, ((x - K) - (mean - K)) * scale + bias: folding everything into
    # x * scale + (bias - mean * scale) would cancel two numbers of size |mean| * scale.
    scale, bias = _channel_affine(rstd, W, B, c0, offs_c, c_mask, HAS_WEIGHT, HAS_BIAS)

    hw_start = pid_s * HW_PER_PROGRAM
    n_tiles = tl.cdiv(tl.minimum(hw_start + HW_PER_PROGRAM, HW) - hw_start, BLOCK_HW)
    for i in range(n_tiles):
        # REVERSE: last tile first. The stats kernel read this slice front to back, so its last tiles are the ones
        # most likely still in L2 when x is larger than L2 (the VAE's 17-134 MB activations).
        hw = hw_start + ((n_tiles - 1 - i) if REVERSE else i) * BLOCK_HW + offs_hw
        mask = (hw[:, None] < HW) & c_mask[None, :]
        x = tl.load(x_base + hw[:, None] * stride_xhw + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
        y = ((x.to(tl.float32) - shift[None, :]) - mean_shifted[None, :]) * scale[None, :] + bias[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + hw[:, None] * stride_yhw + offs_c[None, :] * stride_yc, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_one_pass_kernel(
    X, ADD, Y, W, B,
    stride_xn, stride_xc, stride_xhw, stride_an,
    stride_yn, stride_yc, stride_yhw,
    C, HW, CPG, N_CHUNKS,
    inv_count, eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ADD: tl.constexpr,
    SILU: tl.constexpr,
    CHUNK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # next power of two >= HW: the whole chunk is one tile
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Small groups (SD's 8^2..16^2 levels): one program holds its whole chunk in registers and reads x once: one
    launch instead of two dependent ones, which at 0.3-2.6 MB is most of the time. Statistics are two-pass over the
    registers, on x - K as in the split kernels (x - K is exact near K; summing x itself would round the mean of
    values near 100 to ~1e-5, a sizeable fraction of a std of 0.02)."""
    pid_nk = tl.program_id(0)
    n, c0, _, x_base, offs_c, c_mask, one_hot, _, shift = _chunk_setup(
        X, ADD, stride_xn, stride_xc, stride_an, pid_nk, C, CPG, N_CHUNKS, CHUNK_C, BLOCK_C, BLOCK_G, HAS_ADD)
    hw = tl.arange(0, BLOCK_HW)
    mask = (hw[:, None] < HW) & c_mask[None, :]
    x = tl.load(x_base + hw[:, None] * stride_xhw + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    x = tl.where(mask, x.to(tl.float32) - shift[None, :], 0.0)  # (BLOCK_HW, BLOCK_C): (x [+ add]) - K

    # (BLOCK_HW, BLOCK_C) -> per channel -> per group (BLOCK_G,) -> back to each channel lane (BLOCK_C,)
    group_sum = tl.sum(tl.where(one_hot, tl.sum(x, 0)[:, None], 0.0), 0)
    mean_shifted = tl.sum(tl.where(one_hot, group_sum[None, :], 0.0), 1) * inv_count
    d = tl.where(mask, x - mean_shifted[None, :], 0.0)
    group_sq = tl.sum(tl.where(one_hot, tl.sum(d * d, 0)[:, None], 0.0), 0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.where(one_hot, group_sq[None, :], 0.0), 1) * inv_count + eps)

    scale, bias = _channel_affine(rstd, W, B, c0, offs_c, c_mask, HAS_WEIGHT, HAS_BIAS)
    y = d * scale[None, :] + bias[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    y_ptrs = Y + n.to(tl.int64) * stride_yn + c0.to(tl.int64) * stride_yc + hw[:, None] * stride_yhw
    tl.store(y_ptrs + offs_c[None, :] * stride_yc, y.to(Y.dtype.element_ty), mask=mask)


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


@functools.cache
def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper (sm_90) or newer, and a Triton that has it (3.4+)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    from triton.backends.nvidia.compiler import CUDAOptions

    return "launch_pdl" in CUDAOptions.__dataclass_fields__


def _groups_per_program(num_groups: int, cpg: int, element_size: int, channels_contiguous: bool) -> int:
    """How many adjacent groups one program takes: 1 where H*W is the contiguous axis (NCHW); in channels-last, the
    fewest groups whose channels make a 16-byte-aligned run of >= _MIN_RUN_BYTES per pixel with the least padding
    to a power-of-two tile width (e.g. 12 groups of 10 fp16 channels: 240 bytes in 128 lanes)."""
    if not channels_contiguous:
        return 1
    best, best_key = 1, None
    for gpp in range(1, num_groups + 1):
        width = gpp * cpg
        if width * element_size < _MIN_RUN_BYTES and gpp < num_groups:
            continue
        if triton.next_power_of_2(width) > _MAX_BLOCK_C and best_key is not None:
            break
        key = ((width * element_size) % 16 == 0, width / triton.next_power_of_2(width))
        if best_key is None or key > best_key:  # ties keep the narrower chunk: more programs, no wider tile
            best, best_key = gpp, key
    return best


@dataclass(frozen=True)
class GroupNormTuning:
    """How group_norm cuts its work. The defaults are what it runs; benchmarks ablate one field at a time."""

    groups_per_program: int | None = None  # adjacent groups a program takes; None: _groups_per_program (1 in NCHW)
    tile: int = _TILE  # elements of x a program loads per loop iteration, a power of two
    pdl: bool | None = None  # programmatic dependent launch of the 2nd and 3rd kernels; None: where supported
    reverse_apply: bool = True  # the normalising pass walks each slice from its end: L2 hits for x larger than L2
    one_pass: bool | None = None  # one kernel, a chunk a program; None: where a chunk fits _ONE_PASS_MAX elements


@dataclass(frozen=True)
class _Plan:
    """How one call is cut into programs: grid (N * n_chunks, split) for the stats and apply kernels."""

    gpp: int  # groups per program (a chunk)
    n_chunks: int  # chunks per sample
    block_c: int  # next_pow2(gpp * C/G) channel lanes
    block_hw: int  # pixels per tile; block_hw * block_c <= GroupNormTuning.tile
    split: int  # programs per chunk, each over hw_per_program pixels
    hw_per_program: int
    finalize: bool  # reduce the partials in a third, tiny kernel (else every apply program reduces its own)
    one_pass: bool = False  # one kernel: split 1, and a program's tile is its whole chunk (block_hw >= HW)


def _plan(N: int, C: int, HW: int, num_groups: int, element_size: int, channels_contiguous: bool,
          target_programs: int, groups_per_program: int | None = None, tile: int = _TILE,
          one_pass: bool | None = None) -> _Plan:
    cpg = C // num_groups
    if one_pass is not False:
        # One group a program unless asked otherwise, in either layout: these calls are latency-bound, and more
        # programs (N * 32) keep more SMs' loads in flight than channels-last's wider chunks would (2 x 2560 x 8^2
        # in chunks of 3 groups: 22 programs), at the price of shorter runs per pixel (80 bytes at C/G = 40).
        one_gpp = groups_per_program or 1
        block_c = triton.next_power_of_2(one_gpp * cpg)
        if triton.next_power_of_2(HW) * block_c <= _ONE_PASS_MAX:
            return _Plan(one_gpp, triton.cdiv(num_groups, one_gpp), block_c, triton.next_power_of_2(HW), 1, HW,
                         False, one_pass=True)
        if one_pass:
            raise ValueError(f"group_norm: one_pass=True needs a chunk of at most {_ONE_PASS_MAX} elements; "
                             f"{one_gpp} group(s) of {cpg} channels x {HW} pixels are more")
    gpp = groups_per_program or _groups_per_program(num_groups, cpg, element_size, channels_contiguous)
    n_chunks = triton.cdiv(num_groups, gpp)
    block_c = triton.next_power_of_2(gpp * cpg)
    block_hw = min(max(1, tile // block_c), triton.next_power_of_2(HW))
    n_tiles = triton.cdiv(HW, block_hw)
    split = max(1, min(n_tiles, triton.cdiv(target_programs, N * n_chunks)))
    hw_per_program = triton.cdiv(n_tiles, split) * block_hw
    split = triton.cdiv(HW, hw_per_program)  # drop programs that rounding left without work
    # Each apply program needs the SPLIT partials of each of its GPP groups: past a few dozen, that re-read costs
    # more than one tiny extra launch that reduces them once per group (channels-last 2 x 320 x 64^2 cuts each of
    # its 6 chunks into 86 programs: 12 x 86 partials per program against ~11 KB of its own data).
    finalize = gpp * split > _MAX_PARTIALS_PER_APPLY
    return _Plan(gpp, n_chunks, block_c, block_hw, split, hw_per_program, finalize)


def plan_for(x: torch.Tensor, num_groups: int, tuning: GroupNormTuning = GroupNormTuning(),
             sms: int | None = None) -> _Plan:
    """The launch plan group_norm uses for x on its device (benchmarks report it beside the times), or with sms,
    on a GPU of that many SMs (tools that plan for an H100 without one: 132)."""
    N, C, H, W = x.shape
    target = _num_programs_target(x.device) if sms is None else _PROGRAMS_PER_SM * sms
    return _plan(N, C, H * W, num_groups, x.element_size(), x.stride(1) == 1 and C > 1, target,
                 tuning.groups_per_program, tuning.tile, tuning.one_pass)


def _check_inputs(x, num_groups, weight, bias, add, tuning: GroupNormTuning) -> None:
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
    if add is not None:
        if not isinstance(add, torch.Tensor) or add.shape != (x.shape[0], C):
            shape = tuple(add.shape) if isinstance(add, torch.Tensor) else type(add).__name__
            raise ValueError(f"group_norm: add must have shape ({x.shape[0]}, {C}) (N, C), got {shape}")
        if add.device != x.device:
            raise ValueError(f"group_norm: add is on {add.device} but x is on {x.device}")
    gpp, tile = tuning.groups_per_program, tuning.tile
    if gpp is not None and not 1 <= gpp <= num_groups:
        raise ValueError(f"group_norm: groups_per_program={gpp} must be in 1..{num_groups}")
    if not 64 <= tile <= 16384 or tile & (tile - 1):
        raise ValueError(f"group_norm: tile={tile} must be a power of two from 64 to 16384")
    if tuning.pdl and not _pdl_supported(x.device):
        raise ValueError("group_norm: pdl=True needs a CUDA GPU of compute capability >= 9.0 and Triton >= 3.4")


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    silu: bool = False,
    *,
    add: torch.Tensor | None = None,
    tuning: GroupNormTuning = GroupNormTuning(),
) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps), then SiLU if silu; statistics in fp32.

    x: (N, C, H, W), contiguous or channels-last, fp16/bf16/fp32. weight, bias: (C,) or None.
    add: (N, C) or None: normalise x + add[:, :, None, None] instead of x, the sum never materialised (SD's resnet
    blocks add the time embedding right before norm2; eager PyTorch spends a full read and write of x on it).
    tuning: how the work is cut (GroupNormTuning; benchmarks ablate its fields). Returns a tensor of x's dtype and
    memory format.
    """
    _check_inputs(x, num_groups, weight, bias, add, tuning)
    # the largest offset inside a sample, + 1: C * H * W when dense, more for a channel slice of a wider tensor
    span = 1 + sum((n - 1) * st for n, st in zip(x.shape[1:], x.stride()[1:]))
    if span > _MAX_SAMPLE_NUMEL:
        return _group_norm_torch(x, num_groups, weight, bias, eps, silu, add)
    weight = weight.contiguous() if weight is not None else None  # the kernels read (C,) at unit stride
    bias = bias.contiguous() if bias is not None else None
    if add is not None and add.stride(1) != 1:
        add = add.contiguous()
    if _spatial_stride(x) is None:  # neither NCHW nor NHWC (e.g. a strided slice): work on a contiguous copy
        x = x.contiguous()
    y = torch.empty_like(x)  # keeps x's strides, hence its memory format
    if x.numel() == 0:
        return y
    pdl = _pdl_supported(x.device) if tuning.pdl is None else tuning.pdl
    plan = plan_for(x, num_groups, tuning)
    for kernel, grid, args, kwargs in launches(x, y, num_groups, weight, bias, eps, silu, plan, pdl, add,
                                               tuning.reverse_apply):
        kernel[grid](*args, **kwargs)
    return y


def _group_norm_torch(x, num_groups, weight, bias, eps, silu, add):
    """group_norm's contract on PyTorch's own GroupNorm (statistics in fp32 there too), for samples too large for
    the kernels' int32 offsets; the affine in x's dtype, as F.group_norm wants, and x's memory format kept."""
    if add is not None:
        x = x + add[:, :, None, None].to(x.dtype)
    cast = (lambda p: None if p is None else p.to(x.dtype))
    y = F.group_norm(x, num_groups, cast(weight), cast(bias), eps)
    y = F.silu(y) if silu else y
    return y if y.stride() == x.stride() else torch.empty_like(x).copy_(y)


def launches(x, y, num_groups, weight, bias, eps, silu, p: _Plan, pdl: bool = False, add=None,
             reverse: bool = True) -> list[tuple]:
    """The (kernel, grid, args, kwargs) launches of group_norm for x -> y under plan p, in order; tools compile them
    without a GPU (benchmarks/kernels/sm90_report.py). x: (N, C, H, W) with a flattenable H*W axis, y like x;
    add: (N, C) with unit channel stride, or None."""
    N, C, H, W = x.shape
    HW = H * W
    cpg = C // num_groups
    n_groups = N * num_groups
    inv_count = 1.0 / (cpg * HW)
    grid = (N * p.n_chunks, p.split)
    x_strides = (x.stride(0), x.stride(1), _spatial_stride(x), add.stride(0) if add is not None else 0)
    add_ptr = add if add is not None else x  # dummy pointer, never read when HAS_ADD is False
    y_strides = (y.stride(0), y.stride(1), _spatial_stride(y))
    affine = (weight if weight is not None else x, bias if bias is not None else x)  # dummies when HAS_* is False
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None, "SILU": bool(silu)}
    if p.one_pass:
        return [(_group_norm_one_pass_kernel, grid[:1], (
            x, add_ptr, y, *affine, *x_strides, *y_strides, C, HW, cpg, p.n_chunks, inv_count, float(eps),
        ), {**flags, "HAS_ADD": add is not None, "CHUNK_C": p.gpp * cpg, "BLOCK_HW": p.block_hw,
            "BLOCK_C": p.block_c, "BLOCK_G": triton.next_power_of_2(p.gpp),
            "num_warps": min(16, max(_NUM_WARPS, p.block_hw * p.block_c // 1024))})]

    block_split = triton.next_power_of_2(p.split)
    partial = torch.empty((n_groups, p.split, 2), dtype=torch.float32, device=x.device)
    stats = torch.empty((n_groups, 2), dtype=torch.float32, device=x.device) if p.finalize else partial
    sizes = (C, HW, cpg, p.n_chunks, p.hw_per_program, p.split)
    blocks = {"CHUNK_C": p.gpp * cpg, "BLOCK_HW": p.block_hw, "BLOCK_C": p.block_c,
              "BLOCK_G": triton.next_power_of_2(p.gpp), "HAS_ADD": add is not None, "num_warps": _NUM_WARPS}
    dependent = {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
    out = [(_group_norm_stats_kernel, grid, (x, add_ptr, partial, *x_strides, *sizes), {**blocks, "PDL": pdl})]
    if p.finalize:
        block_r = max(1, 2048 // block_split)  # (BLOCK_R, BLOCK_SPLIT) partial pairs a finalize program reduces
        out.append((_group_norm_finalize_kernel, (triton.cdiv(n_groups, block_r),),
                    (partial, stats, n_groups, p.split, inv_count, float(eps)),
                    {"BLOCK_R": block_r, "BLOCK_SPLIT": block_split, "num_warps": _NUM_WARPS, **dependent}))
    out.append((_group_norm_apply_kernel, grid, (
        x, add_ptr, y, *affine, partial, stats, *x_strides, *y_strides, *sizes, inv_count, float(eps),
    ), {**flags, "FINALIZED": p.finalize, "BLOCK_SPLIT": block_split, "REVERSE": bool(reverse), **blocks,
        **dependent}))
    return out


def group_norm_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    silu: bool = False,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.group_norm in fp32 (of x + add[:, :, None, None] when add is given, the sum in fp32) (+ SiLU), cast back to
    x's dtype in x's memory format."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    xf = x.float() if add is None else x.float() + add.float()[:, :, None, None]
    # Contiguous on purpose: torch's CPU channels-last group norm computes E[x^2] - E[x]^2 unshifted and is far off
    # when |mean| >> std (torch 2.13); the NCHW path is accurate.
    y = F.group_norm(xf.contiguous(), num_groups, w, b, eps)
    if silu:
        y = F.silu(y)
    return torch.empty_like(x).copy_(y)
