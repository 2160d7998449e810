"""sdrt.kernels.attention vs attention_ref (the math in fp32) on SD's head sizes and odd sequence lengths."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_device import CUDA, DEVICE  # tests/kernels is on sys.path (rootdir-relative import)
from sdrt.kernels import attention, attention_ref
from sdrt.kernels.attention import head_dim_tiles, launch_args

cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA (the interpreter is too slow / lacks bf16 dots)")

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),  # IEEE fp32 dots: only summation order differs
    # P is rounded to fp16 before the P @ V dot, as in every flash attention, and the output rounds once: ~1-2 ulp.
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    # Same rounding in bf16 (eps 2^-7). Triton's interpreter computes bf16 dots on the raw bits (numpy has no
    # bf16), so bf16 is checked on a GPU only.
    pytest.param(torch.bfloat16, 1.6e-2, 1.6e-2, id="bf16", marks=cuda_only),
]

# (B, heads, Nq, Nk, d): every SD head size, odd lengths, self- and cross-attention, batch 1 and 2.
CPU_SHAPES = [
    pytest.param(1, 2, 67, 77, 40, id="cross77-d40"),
    pytest.param(2, 1, 67, 154, 64, id="cross154-d64-b2"),
    pytest.param(1, 1, 130, 130, 80, id="self130-d80"),
    pytest.param(1, 1, 64, 77, 96, id="cross77-d96"),
    pytest.param(2, 1, 33, 130, 128, id="self-ish-d128-b2"),
    pytest.param(1, 1, 67, 154, 160, id="cross154-d160"),
]

# SD 1.5 at 512px (latent 64^2): seq 4096/1024/256/64 with d 40/80/160/160, self and against 77 tokens;
# SD 2.x / SDXL heads (d 64) with 154 tokens (SDXL's two text encoders); 128^2 latents (16384 tokens).
GPU_SHAPES = [
    pytest.param(2, 8, 4096, 4096, 40, id="sd15-64x64-self"),
    pytest.param(2, 8, 4096, 77, 40, id="sd15-64x64-cross"),
    pytest.param(2, 8, 1024, 1024, 80, id="sd15-32x32-self"),
    pytest.param(2, 8, 1024, 77, 80, id="sd15-32x32-cross"),
    pytest.param(2, 8, 256, 256, 160, id="sd15-16x16-self"),
    pytest.param(2, 8, 256, 77, 160, id="sd15-16x16-cross"),
    pytest.param(2, 8, 64, 64, 160, id="sd15-8x8-self"),
    pytest.param(2, 8, 64, 77, 160, id="sd15-8x8-cross"),
    pytest.param(2, 10, 4096, 4096, 64, id="sdxl-64x64-self"),
    pytest.param(2, 20, 1024, 154, 64, id="sdxl-32x32-cross154"),
    pytest.param(1, 5, 16384, 16384, 64, id="128x128-self"),
]


def _qkv(B, H, n_q, n_k, d, dtype):
    q = torch.randn(B, H, n_q, d, device=DEVICE, dtype=dtype)
    k = torch.randn(B, H, n_k, d, device=DEVICE, dtype=dtype)
    v = torch.randn(B, H, n_k, d, device=DEVICE, dtype=dtype)
    return q, k, v


def _check(q, k, v, atol, rtol, scale=None):
    out = attention(q, k, v, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    torch.testing.assert_close(out, attention_ref(q, k, v, scale=scale), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, H, n_q, n_k, d", CPU_SHAPES)
def test_attention_matches_ref(B, H, n_q, n_k, d, dtype, atol, rtol):
    _check(*_qkv(B, H, n_q, n_k, d, dtype), atol, rtol)


@cuda_only
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, H, n_q, n_k, d", GPU_SHAPES)
def test_attention_sd_shapes(B, H, n_q, n_k, d, dtype, atol, rtol):
    _check(*_qkv(B, H, n_q, n_k, d, dtype), atol, rtol)


@pytest.mark.parametrize("split", [True, False], ids=["two-tiles", "one-padded-tile"])
@pytest.mark.parametrize("d", [40, 72, 80, 96, 160])
def test_attention_head_dim_tiles_both_ways(d, split):
    # Both ways of covering a head size that is not a power of two compute the same function (72: the second tile
    # is 16 wide and exact; 40: it is 16 wide and half masked).
    q, k, v = _qkv(1, 2, 33, 77, d, torch.float16)
    out = attention(q, k, v, split_head_dim=split)
    torch.testing.assert_close(out, attention_ref(q, k, v), atol=2e-3, rtol=2e-3)


def test_head_dim_tiles():
    assert [head_dim_tiles(d) for d in (40, 80, 96, 160)] == [(32, 16), (64, 16), (64, 32), (128, 32)]
    assert [head_dim_tiles(d) for d in (8, 24, 64, 128, 200)] == [(16, 0), (32, 0), (64, 0), (128, 0), (256, 0)]
    assert head_dim_tiles(80, split=False) == (128, 0)
    for d in range(1, 257):  # the tiles always cover d, with tl.dot's 16-wide minimum, and never cost more
        first, second = head_dim_tiles(d)
        assert first + second >= d and first >= 16 and second in (0, *(16 << i for i in range(4)))
        assert first + second <= max(16, 1 << (d - 1).bit_length())


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_attention_non_contiguous(dtype, atol, rtol):
    # q, k, v as views of a fused QKV projection (B, N, 3, heads, d), and k additionally with d not innermost.
    B, N, H, d = 2, 67, 2, 40
    qkv = torch.randn(B, N, 3, H, d, device=DEVICE, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, N, d), strides (N*3*H*d, d, 3*H*d, 1)
    assert not q.is_contiguous()
    _check(q, k, v, atol, rtol)
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride 1 on N instead of d
    _check(q, k_t, v, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
def test_attention_into_token_major_out(dtype, atol, rtol):
    # out= a (B, N, heads, d) buffer seen as (B, heads, N, d), as sdrt's attention processor passes it (d = 40,
    # the stride 40 * heads on N): the values land in that layout, so the (B, N, heads * d) view needs no copy.
    q, k, v = _qkv(2, 3, 67, 77, 40, dtype)
    buf = torch.full((2, 67, 3, 40), float("nan"), device=DEVICE, dtype=dtype)
    out = attention(q, k, v, out=buf.transpose(1, 2))
    assert out.data_ptr() == buf.data_ptr() and not buf.isnan().any()
    torch.testing.assert_close(out, attention_ref(q, k, v), atol=atol, rtol=rtol)
    with pytest.raises(ValueError, match="out must be"):
        attention(q, k, v, out=buf)  # (B, N, heads, d) itself: wrong shape


def test_strides_past_int32_are_passed_undivided():
    # The launcher passes strides divided by their common power of two (ALIGN) and the kernel multiplies them back
    # in int32: a batch stride in [2^31, 16 * 2^31) would wrap there. Such strides go undivided (ALIGN = 1), which
    # Triton passes as int64. Meta tensors: the strides of a 4+ GB tensor without its memory.
    shape, big = (2, 1, 32, 64), (2**32 + 65536, 2048, 64, 1)
    q = torch.empty_strided(shape, big, device="meta", dtype=torch.float16)
    k, v, out = (torch.empty(shape, device="meta", dtype=torch.float16) for _ in range(3))
    args, constexprs = launch_args(q, k, v, out)
    assert constexprs["ALIGN"] == 1 and args[5:9] == big
    args, constexprs = launch_args(k, k, v, out)  # small strides keep their alignment (2048 = 16 * 128)
    assert constexprs["ALIGN"] == 16 and args[5:9] == (128, 128, 4, 1)


def test_attention_scale_and_sdpa():
    q, k, v = _qkv(1, 2, 67, 77, 64, torch.float32)
    _check(q, k, v, 1e-5, 1e-5, scale=0.3)
    # attention_ref agrees with torch's SDPA (default scale 1/sqrt(d)).
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, scale=1 / math.sqrt(64)))


@pytest.mark.parametrize(
    "shapes, dtypes, match",
    [
        (((2, 67, 40), (1, 2, 77, 40), (1, 2, 77, 40)), None, "rank 4"),
        (((1, 2, 67, 40), (1, 3, 77, 40), (1, 3, 77, 40)), None, "heads mismatch"),
        (((2, 2, 67, 40), (1, 2, 77, 40), (1, 2, 77, 40)), None, "batch mismatch"),
        (((1, 2, 67, 40), (1, 2, 77, 64), (1, 2, 77, 64)), None, "head size mismatch"),
        (((1, 2, 67, 40), (1, 2, 77, 40), (1, 2, 78, 40)), None, "same shape"),
        (((1, 2, 67, 40), (1, 2, 77, 40), (1, 2, 77, 40)), (torch.float16, torch.float32, torch.float32),
         "share a dtype"),
        (((1, 2, 67, 40), (1, 2, 77, 40), (1, 2, 77, 40)), (torch.float64,) * 3, "supported"),
        (((1, 2, 67, 512), (1, 2, 77, 512), (1, 2, 77, 512)), None, "not supported"),
    ],
    ids=["rank", "heads", "batch", "head-size", "kv-shape", "dtype-mismatch", "fp64", "d-too-large"],
)
def test_attention_errors(shapes, dtypes, match):
    dtypes = dtypes or (torch.float32,) * 3
    q, k, v = (torch.zeros(s, dtype=t) for s, t in zip(shapes, dtypes))
    with pytest.raises(ValueError, match=match):
        attention(q, k, v)
