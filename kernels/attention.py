"""Fused attention forward (flash attention) for Stable Diffusion's UNet.

For one (batch, head) pair, with queries Q (Nq, d), keys K (Nk, d) and values V (Nk, d):

    S = scale * Q K^T            (Nq, Nk)     scale defaults to 1 / sqrt(d)
    P = softmax(S, dim=-1)       (Nq, Nk)
    O = P V                      (Nq, d)

SD's self-attention has Nq = Nk = 4096 (64x64 latent) up to 16384 (128x128), so S would be 16384^2 fp32 values
= 1 GiB per head. Flash attention never materialises S. Each program owns BLOCK_M query rows, keeps them in
registers, and walks K and V in blocks of BLOCK_N keys, keeping an *online softmax*: for every query row a running
maximum m, a running denominator l and an unnormalised output accumulator acc (BLOCK_M, d), all in fp32. For each
key block with scores s_j:

    m_new = max(m, rowmax(s_j))
    p_j   = exp(s_j - m_new)                     (BLOCK_M, BLOCK_N), only in registers
    l     = l * exp(m - m_new) + rowsum(p_j)
    acc   = acc * exp(m - m_new) + p_j V_j
    m     = m_new

and at the end O = acc / l. Subtracting the running maximum keeps exp() in range; rescaling by exp(m - m_new)
corrects what was accumulated against the old maximum. We use exp2, which is what the hardware computes, with
log2(e) folded into the scale once: exp(scale * x) = exp2(scale * log2(e) * x).

Shapes and masking
  * Layout is SDPA's: (B, heads, N, d), any strides. A view out of a fused QKV projection (non-contiguous) is read
    in place through its strides; nothing is copied.
  * Head sizes: SD uses d = 40, 64, 80, 96, 128, 160. tl.dot wants power-of-two tiles, so d is covered by column
    tiles: one of BLOCK_D = next_power_of_2(d) columns, or, when d is not a power of two, two (head_dim_tiles):
    the largest power of two <= d, then one of >= 16 columns for the rest, e.g. 80 = 64 + 16. Each dot of the
    loop then runs as two: S = q0 k0 + q1 k1 and O = [P v0, P v1]. Columns past d are masked on load and store
    (padding lanes read 0, so they add 0 to q.k and are never stored). Nothing is padded in memory.
  * Cross-attention has Nk = 77 or 154 text tokens: the last key block is masked and its scores set to -inf, so
    masked keys get probability 0. EVEN_N (Nk % BLOCK_N == 0) compiles that masking away for self-attention.
  * fp16/bf16 inputs use fp16/bf16 tensor-core dots with fp32 accumulation; P is cast to V's dtype for the second
    dot (as in every flash attention). fp32 inputs use IEEE fp32 dots (not TF32) so fp32 stays a tight reference.

Work split: grid = (cdiv(Nq, BLOCK_M), B * heads). The output has q's dtype and is contiguous (B, heads, Nq, d).
"""

from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256

# Configs tried by the autotuner on CUDA, keyed on (Nq, Nk, d, the column split) (Triton adds the dtypes to the key):
# Nq too, because cross-attention's Nk is 77 or 154 at every level while Nq runs from 64 to 16384, and the grid (Nq /
# BLOCK_M programs per head) that suits a 64^2 latent leaves an 8^2 one with half-empty 128-row blocks.
# BLOCK_M query rows and the (BLOCK_M, d-tiles) fp32 accumulator live in registers for the whole program; K/V blocks
# of BLOCK_N rows are streamed through shared memory in num_stages-deep pipelines. Compiled for sm_90 (fp16, unit
# d-stride; checked without a GPU through triton.compile and cuobjdump): all use wgmma. One padded tile: no spills
# for d <= 128 but 128 x 64 with 4 warps (352 B of stack at d = 80); at d = 160 (BLOCK_D = 256) 128 x 64 needs
# 256 KB of shared memory (skipped: H100 has 227 KB) and 128 x 32 w8 takes 227 registers. Two tiles (the default)
# need 25-37% less shared memory and fewer registers (d = 160: 128 x 64 w8 fits in 160 KB; 128 x 32 w8 takes 168).
# 64 x 32 with 4 warps is the small fallback (cross-attention's Nk = 77, older GPUs).
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
]
# fp32 inputs are the accuracy path, not the speed path (SD runs in fp16): IEEE fp32 dots run on CUDA cores and
# large tiles compile for minutes and spill, so fp32 gets one small fixed config and no autotuning.
_FP32_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2)
# One fixed config when the tensors are on CPU (TRITON_INTERPRET=1): the interpreter runs every program in Python,
# so autotuning would multiply test time by len(_CONFIGS) for no information.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)
# SD's head sizes 40, 80 and 160 padded to one power-of-two tile spend 37.5% of every dot on zeros; two tiles
# (32 + 16, 64 + 16, 128 + 32) cut the tensor-core work by a quarter (40) to 37.5% (80, 160) for one more dot
# pair per key block. Not yet measured on a GPU: the kernel benchmark times both (nosplit_ms).
_SPLIT_HEAD_DIM = True


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile, masking only the dimensions that can run past the tensor (decided at compile time)."""
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif MASK_COLS:
        return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store_tile(ptrs, values, rows, n_rows, cols, n_cols, MASK_COLS: tl.constexpr):
    mask = rows[:, None] < n_rows
    if MASK_COLS:
        mask = mask & (cols[None, :] < n_cols)
    tl.store(ptrs, values.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _attention_kernel(
    Q, K, V, O,
    qk_scale,  # scale * log2(e), so that exp(scale * s) = exp2(qk_scale * s)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_K,
    HEAD_D: tl.constexpr,  # d, e.g. 40
    BLOCK_D: tl.constexpr,  # the first column tile: next power of two >= d, or (split) the largest one <= d
    BLOCK_D1: tl.constexpr,  # 0, or (split) the second column tile, from BLOCK_D: e.g. 40 = 32 + 16 (masked to 8)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,  # N_K % BLOCK_N == 0: no key masking at all
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, "tf32" (ignored by fp16/bf16 dots) otherwise
    ALIGN: tl.constexpr,  # a power of two dividing every batch, head and row stride; they arrive divided by it
):
    # Triton only knows a runtime int's alignment when it is divisible by 16. A contiguous d = 40 tensor has row
    # stride 40 (80 bytes), so without this every row start would count as 2-byte aligned and each load would be
    # scalar (measured: d = 40 ran at 0.4x of d = 64 per head). stride * constexpr ALIGN carries the alignment.
    stride_qb, stride_qh, stride_qm = stride_qb * ALIGN, stride_qh * ALIGN, stride_qm * ALIGN
    stride_kb, stride_kh, stride_kn = stride_kb * ALIGN, stride_kh * ALIGN, stride_kn * ALIGN
    stride_vb, stride_vh, stride_vn = stride_vb * ALIGN, stride_vh * ALIGN, stride_vn * ALIGN
    stride_ob, stride_oh, stride_om = stride_ob * ALIGN, stride_oh * ALIGN, stride_om * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    SPLIT: tl.constexpr = BLOCK_D1 > 0
    PAD_D: tl.constexpr = BLOCK_D > HEAD_D  # the first tile runs past d (never when split)
    PAD_D1: tl.constexpr = BLOCK_D + BLOCK_D1 > HEAD_D  # the second tile does (split only)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
    offs_n = tl.arange(0, BLOCK_N)  # key rows within a block
    offs_d = tl.arange(0, BLOCK_D)

    # int64 batch/head offsets, so tensors past 2^31 elements (big batches of 128x128 latents) index correctly;
    # offsets inside one head (<= 16384 rows x a fused-QKV row stride) stay int32.
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    # Q tile (BLOCK_M, BLOCK_D): loaded once, stays in registers.
    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, N_Q, offs_d, HEAD_D, True, PAD_D)
    # K is read transposed, (BLOCK_D, BLOCK_N), so that S = q @ k needs no in-register transpose.
    k_ptrs = k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, BLOCK_D)
    if SPLIT:  # the same three tiles for the columns past BLOCK_D: (BLOCK_M, BLOCK_D1), (BLOCK_D1, .), (., BLOCK_D1)
        offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
        q1 = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d1[None, :] * stride_qd,
                        offs_m, N_Q, offs_d1, HEAD_D, True, PAD_D1)
        k1_ptrs = k_base + offs_d1[:, None] * stride_kd + offs_n[None, :] * stride_kn
        v1_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d1[None, :] * stride_vd
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)

    # Online-softmax state, fp32, per query row. m starts at -inf; the first block always holds >= 1 real key,
    # so m is finite after the first iteration and exp2(m - m_new) never sees inf - inf.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, N_K, BLOCK_N):
        n = start_n + offs_n
        k = _load_tile(k_ptrs, offs_d, HEAD_D, n, N_K, PAD_D, not EVEN_N)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), fp32
        if SPLIT:
            k1 = _load_tile(k1_ptrs, offs_d1, HEAD_D, n, N_K, PAD_D1, not EVEN_N)
            s = tl.dot(q1, k1, s, input_precision=DOT_PRECISION)
        s = s * qk_scale  # log2 units
        if not EVEN_N:
            s = tl.where(n[None, :] < N_K, s, float("-inf"))  # keys past Nk get probability 0

        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N), never leaves registers
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated against the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)

        v = _load_tile(v_ptrs, n, N_K, offs_d, HEAD_D, not EVEN_N, PAD_D)  # (BLOCK_N, BLOCK_D)
        p = p.to(v.dtype)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        if SPLIT:
            v1 = _load_tile(v1_ptrs, n, N_K, offs_d1, HEAD_D, not EVEN_N, PAD_D1)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
            k1_ptrs += BLOCK_N * stride_kn
            v1_ptrs += BLOCK_N * stride_vn
        m_i = m_new

        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    _store_tile(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, acc / l_i[:, None],
                offs_m, N_Q, offs_d, HEAD_D, PAD_D)
    if SPLIT:
        _store_tile(o_base + offs_m[:, None] * stride_om + offs_d1[None, :] * stride_od, acc1 / l_i[:, None],
                    offs_m, N_Q, offs_d1, HEAD_D, PAD_D1)


_attention_heuristic = triton.heuristics({"EVEN_N": lambda args: args["N_K"] % args["BLOCK_N"] == 0})(
    _attention_kernel
)


def _bench_graphed(kernel_call, quantiles):
    """The autotuner's timer: CUDA-graph replays, i.e. kernel time alone, which is what sdrt's captured loop pays.
    Triton's default times plain launches, and on a slow host its ~100 us Python launch hides a 10 us
    cross-attention kernel: every config then measures the host, and the choice is noise."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)


# cache_results: the chosen configs persist in Triton's cache directory beside its compiled kernels, so a restarted
# service neither recompiles nor re-times them. Options this Triton lacks (do_bench < 3.1, cache_results < 3.3) are
# left out: it then times plain launches, or tunes again in every process.
_AUTOTUNE_OPTIONS = {name: value for name, value in (("do_bench", _bench_graphed), ("cache_results", True))
                     if name in inspect.signature(triton.autotune).parameters}
_attention_autotuned = triton.autotune(configs=_CONFIGS, key=["N_Q", "N_K", "HEAD_D", "BLOCK_D1"], **_AUTOTUNE_OPTIONS)(
    _attention_heuristic)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have rank 4 (B, heads, N, d), got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"attention: {name} has dtype {t.dtype}; supported: fp16, bf16, fp32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: batch mismatch, q has B={q.shape[0]} and k/v have B={k.shape[0]}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: heads mismatch, q has {q.shape[1]} heads and k/v have {k.shape[1]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: head size mismatch, q has d={q.shape[3]} and k/v have d={k.shape[3]}")
    d = q.shape[3]
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"attention: head size d={d} not supported (1..{_MAX_HEAD_DIM})")
    if k.shape[2] == 0:
        raise ValueError("attention: k/v have no keys (Nk = 0)")


def head_dim_tiles(d: int, split: bool = True) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D1): the column tiles that cover head size d. One power-of-two tile, padded (split=False or
    when two tiles would not be smaller), else the largest power of two <= d plus a second tile of >= 16 (tl.dot's
    minimum): 40 = 32 + 16 (8 masked), 80 = 64 + 16, 96 = 64 + 32, 160 = 128 + 32."""
    full = max(16, triton.next_power_of_2(d))
    first = 1 << (d.bit_length() - 1)
    second = max(16, triton.next_power_of_2(d - first)) if first < d else 0
    if split and second and first + second < full:
        return first, second
    return full, 0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
              out: torch.Tensor | None = None, split_head_dim: bool = _SPLIT_HEAD_DIM) -> torch.Tensor:
    """softmax(q k^T * scale) v without materialising the (Nq, Nk) matrix.

    q: (B, heads, Nq, d); k, v: (B, heads, Nk, d); any strides; fp16, bf16 or fp32.
    scale defaults to 1 / sqrt(d). Returns a contiguous (B, heads, Nq, d) tensor of q's dtype, or writes `out`, a
    (B, heads, Nq, d) tensor of q's dtype with any strides that does not overlap q, k or v, and returns it. (SD's
    attention layers want (B, Nq, heads * d) next: a permuted (B, Nq, heads, d) buffer saves a transposing copy.)
    split_head_dim (a tuning knob for benchmarks): cover a head size that is not a power of two with two column
    tiles instead of one padded one (head_dim_tiles).
    """
    _check_inputs(q, k, v)
    B, H, n_q, d = q.shape
    if out is None:
        out = torch.empty((B, H, n_q, d), dtype=q.dtype, device=q.device)
    elif not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        got = (tuple(out.shape), out.dtype, str(out.device)) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"attention: out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, got {got}")
    if n_q == 0 or B * H == 0:
        return out
    args, constexprs = launch_args(q, k, v, out, scale, split_head_dim)
    if q.is_cuda and q.dtype != torch.float32:
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), B * H)
        _attention_autotuned[grid](*args, **constexprs)
    else:
        cfg = _INTERPRETER_CONFIG if not q.is_cuda else _FP32_CONFIG
        grid = (triton.cdiv(n_q, cfg.kwargs["BLOCK_M"]), B * H)
        _attention_heuristic[grid](*args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages)
    return out


def launch_args(q, k, v, out, scale: float | None = None, split_head_dim: bool = _SPLIT_HEAD_DIM):
    """(args, constexprs) of the kernel for q, k, v -> out, before the config's BLOCK_M / BLOCK_N; tools compile it
    without a GPU (benchmarks/kernels/sm90_report.py)."""
    d = q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # (B, heads, N) strides of all four tensors, passed divided by their largest common power of two (<= 16)
    outer = [t.stride()[i] for t in (q, k, v, out) for i in range(3)]
    align = 16
    while align > 1 and any(st % align for st in outer):
        align //= 2
    if max(outer) > 2**31 - 1:  # the kernel's stride * ALIGN is an int32 product: undivided, Triton passes int64
        align = 1
    constexprs = {
        "HEAD_D": d,
        "ALIGN": align,
        **dict(zip(("BLOCK_D", "BLOCK_D1"), head_dim_tiles(d, split_head_dim))),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    args = (
        q, k, v, out, scale * math.log2(math.e),
        *(st // align if i < 3 else st for t in (q, k, v, out) for i, st in enumerate(t.stride())),
        q.shape[1], q.shape[2], k.shape[2],
    )
    return args, constexprs


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The math in fp32, materialising S: softmax(q k^T * scale) v, cast back to q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, heads, Nq, Nk)
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)
