"""sdrt.kernels.add_layer_norm vs add_layer_norm_ref (eager x + residual, F.layer_norm in fp32) and nn.LayerNorm."""

import os

import pytest
import torch
import torch.nn.functional as F
from kernel_device import CUDA, DEVICE  # tests/kernels is on sys.path (rootdir-relative import)
from sdrt.kernels import add_layer_norm, add_layer_norm_ref
from sdrt.kernels.layer_norm import _MAX_C

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
cuda_only = pytest.mark.skipif(not CUDA, reason="full SD shapes need CUDA (the interpreter is too slow)")

DTYPES = [
    # The same fp32 math summed in another order: the mean and variance of C values differ by a few ulps, and y
    # (|y| <= ~11 with these weights and biases) by up to 1.4e-6 measured at C = 320 and 1280.
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    # Both sides compute in fp32 (the disagreement above) and round once to the storage dtype, which can flip that
    # rounding: 1 ulp of the output, <= 2^-10 (fp16) or 2^-7 (bf16) of its magnitude. Under the interpreter the bf16
    # output is truncated, not rounded (see _eager_sum): still under 1 ulp.
    pytest.param(torch.float16, 1e-5, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-5, 8e-3, id="bf16"),
]

# Leading shape and C; the kernel takes BLOCK_M = 4096 // next_pow2(C) rows a program (8 at C = 320).
CPU_SHAPES = [
    pytest.param((37,), 320, id="37x320"),  # SD 1.5's first level: 320 of 512 lanes, odd rows: 5 row blocks
    pytest.param((2, 9), 640, id="3d-b2x9x640"),  # (B, N, C) as in a transformer block
    pytest.param((3,), 1280, id="3x1280"),  # 2 rows a program: 2 programs, the last half masked
    pytest.param((1031,), 5, id="1031x5"),  # tiny C, 512 rows a program: 3 programs
    pytest.param((7,), 1, id="c1"),  # one column: var = 0, y = bias
    pytest.param((), 24, id="rank1"),  # a single row (C,)
]

# SD 1.5 at 512px (2 x 64^2 .. 2 x 8^2 latent pixels), SDXL at 1024px, SD 2.x's text encoder (2 x 77 tokens).
GPU_SHAPES = [pytest.param(m, c, id=f"{m}x{c}")
              for m, c in ((8192, 320), (2048, 640), (512, 1280), (128, 1280), (8192, 640), (2048, 1280), (154, 1024))]


def _inputs(shape, dtype, affine=True):
    x = torch.randn(shape, device=DEVICE).to(dtype)  # the attention's output
    residual = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)  # h: SD's residual stream is not centred
    C = shape[-1]
    weight = (torch.randn(C, device=DEVICE) + 1).to(dtype) if affine else None
    bias = torch.randn(C, device=DEVICE).to(dtype) if affine else None
    return x, residual, weight, bias


def _eager_sum(x, residual):
    """Eager's x + residual, as the compiled kernel must give it bitwise. Triton's interpreter (3.9) converts fp32 to
    bf16 by truncation, where compiled code and eager round to nearest even, so under it the bf16 sum is truncated."""
    if INTERPRETED and x.dtype == torch.bfloat16:
        bits = (x.float() + residual.float()).view(torch.int32) & -65536  # drop the low 16 bits
        return bits.view(torch.float32).bfloat16()
    return x + residual


def _check(x, residual, weight, bias, atol, rtol, eps=1e-5):
    s, y = add_layer_norm(x, residual, weight, bias, eps)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    if residual is None:
        assert s is x
    else:
        assert s.shape == x.shape and s.dtype == x.dtype and s.is_contiguous()
        assert torch.equal(s, _eager_sum(x, residual))
    # y is the LayerNorm of the s returned (eager's sum, checked above), statistics from s as stored.
    torch.testing.assert_close(y, add_layer_norm_ref(s, None, weight, bias, eps)[1], atol=atol, rtol=rtol)
    return s, y


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("lead, c", CPU_SHAPES)
def test_add_layer_norm_matches_ref(lead, c, dtype, atol, rtol):
    _check(*_inputs((*lead, c), dtype), atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("has_residual, has_weight, has_bias", [
    (False, True, True), (True, False, False), (True, True, False), (True, False, True), (False, False, False),
], ids=["ln", "add-no-affine", "add-weight", "add-bias", "ln-no-affine"])
def test_add_layer_norm_optional_inputs(has_residual, has_weight, has_bias, dtype, atol, rtol):
    x, residual, weight, bias = _inputs((37, 320), dtype)
    _check(x, residual if has_residual else None, weight if has_weight else None, bias if has_bias else None,
           atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_add_layer_norm_strided_rows(dtype, atol, rtol):
    # Rows of a wider tensor (row stride 336 > C = 320), a 3-D slice (strides (900, 100, 1)) and broadcast rows
    # (stride 0) are read in place, x and residual with different strides; transposed leading dims do not flatten
    # into one row axis and take the contiguous copy.
    x, residual, weight, bias = _inputs((37, 336), dtype)
    _check(x[:, :320], residual[:, 16:], weight[:320], bias[:320], atol, rtol)
    x, residual, weight, bias = _inputs((2, 9, 100), dtype)
    _check(x[:, :, 10:90], residual[:, :, :80].contiguous(), weight[:80], bias[:80], atol, rtol)
    x, residual, weight, bias = _inputs((1, 320), dtype)
    _check(x.expand(37, 320), residual.expand(37, 320), weight, bias, atol, rtol)
    x, residual, weight, bias = _inputs((9, 2, 64), dtype)
    _check(x.transpose(0, 1), residual.transpose(0, 1), weight, bias, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("lead, c", [pytest.param((37,), 320, id="37x320"), pytest.param((2, 9), 640, id="b2x9x640")])
def test_add_layer_norm_s_bias(lead, c, dtype, atol, rtol):
    # s_bias (the feed-forward output's bias, carried into the residual stream): s gets eager's two rounded adds,
    # y is still the norm of x + residual alone.
    x, residual, weight, bias = _inputs((*lead, c), dtype)
    s_bias = (torch.randn(c, device=DEVICE) * 3).to(dtype)
    s, y = add_layer_norm(x, residual, weight, bias, s_bias=s_bias)
    total = _eager_sum(x, residual)
    assert torch.equal(s, _eager_sum(total, s_bias.expand_as(total)))
    torch.testing.assert_close(y, add_layer_norm_ref(total, None, weight, bias)[1], atol=atol, rtol=rtol)
    ref_s, ref_y = add_layer_norm_ref(x, residual, weight, bias, s_bias=s_bias)
    assert ref_s.dtype == dtype and torch.equal(ref_y, add_layer_norm_ref(x, residual, weight, bias)[1])
    if not (INTERPRETED and dtype == torch.bfloat16):  # the interpreter truncates bf16 (see _eager_sum)
        assert torch.equal(s, ref_s)


def test_add_layer_norm_s_bias_errors():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="needs a residual"):
        add_layer_norm(x, None, None, None, s_bias=torch.zeros(8, device=DEVICE))
    with pytest.raises(ValueError, match="s_bias has dtype"):
        add_layer_norm(x, x, None, None, s_bias=torch.zeros(8, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="s_bias must have shape"):
        add_layer_norm(x, x, None, None, s_bias=torch.zeros(7, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_add_layer_norm_statistics_of_the_rounded_sum(dtype):
    # x = 1 plus residuals below half an ulp of 1 (2^-12 in fp16, 2^-10 in bf16): every s rounds to exactly 1, so
    # the row has no variance and y = bias. Statistics of the unrounded fp32 sum would see a spread of 2^-13 (2^-11)
    # and, with eps = 1e-12, normalise it to +-1.
    tiny = 2.0**-12 if dtype == torch.float16 else 2.0**-10
    x = torch.ones(3, 320, device=DEVICE, dtype=dtype)
    residual = (torch.arange(320, device=DEVICE) % 2 * tiny).expand(3, -1).to(dtype)
    bias = torch.randn(320, device=DEVICE).to(dtype)
    s, y = add_layer_norm(x, residual, None, bias, eps=1e-12)
    assert torch.all(s == 1) and torch.equal(y, bias.expand(3, -1))


@pytest.mark.parametrize("dtype, rtol", [
    # |mean| = 1000 >> std ~2: one pass, E[s^2] - mean^2 in fp32, cancels ~1e6 down to ~4 and keeps few digits of
    # the variance (swapped in: errors of 0.1 here). Two passes leave the mean's own rounding, a few ulps of 1000
    # (6e-5 each) over std ~2: 4e-5 measured, as torch's fp32 layer_norm. Against fp64 on the same s.
    pytest.param(torch.float32, 0, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),  # plus one fp16 rounding of y: <= 2^-11 of |y|
])
def test_add_layer_norm_large_mean(dtype, rtol):
    x, residual, _, _ = _inputs((37, 1280), dtype, affine=False)
    s, y = add_layer_norm(x, residual + 1000.0, None, None)
    ref = F.layer_norm(s.double(), (1280,))
    torch.testing.assert_close(y.double(), ref, atol=2e-4, rtol=rtol)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_add_layer_norm_matches_nn_layer_norm(affine):
    # Tier 2: what a BasicTransformerBlock runs, hidden = attn_output + hidden; norm2(hidden), on a (B, N, C) input.
    norm = torch.nn.LayerNorm(320, elementwise_affine=affine).to(DEVICE)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    attn_output, hidden = torch.randn(2, 2, 7, 320, device=DEVICE).unbind(0)
    with torch.no_grad():
        s, y = add_layer_norm(attn_output, hidden, norm.weight, norm.bias, norm.eps)
        assert torch.equal(s, attn_output + hidden)
        torch.testing.assert_close(y, norm(attn_output + hidden), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 0, 6), (0,)])
@pytest.mark.parametrize("has_residual", [True, False], ids=["add", "ln"])
def test_add_layer_norm_empty(shape, has_residual):
    x = torch.empty(shape, device=DEVICE, dtype=torch.float16)
    residual = torch.empty_like(x) if has_residual else None
    s, y = add_layer_norm(x, residual, torch.ones(shape[-1], device=DEVICE, dtype=torch.float16), None)
    assert s.shape == y.shape == shape and y.dtype == torch.float16 and (s is x) != has_residual


def _errors():
    x = torch.zeros(2, 8)
    w = torch.ones(8)
    return [
        pytest.param(torch.tensor(1.0), None, None, "rank", id="rank0"),
        pytest.param(x.double(), None, None, "dtype", id="fp64"),
        pytest.param(x.int(), None, None, "dtype", id="int32"),
        pytest.param(x, torch.zeros(2, 7), None, "shape", id="residual-shape"),
        pytest.param(x, torch.zeros(1, 8), None, "shape", id="residual-broadcast"),
        pytest.param(x, x.half(), None, "dtype", id="residual-dtype"),
        pytest.param(x, torch.zeros(2, 8, device="meta"), None, "on meta", id="residual-device"),
        pytest.param(x, None, torch.ones(7), "shape", id="weight-shape"),
        pytest.param(x, None, torch.ones(1, 8), "shape", id="weight-rank"),
        pytest.param(x, None, w.int(), "dtype", id="weight-dtype"),
        pytest.param(x, None, w.to("meta"), "on meta", id="weight-device"),
        pytest.param(torch.zeros(8, 2).t(), None, None, "contiguous", id="x-last-dim-strided"),
        pytest.param(x, torch.zeros(8, 2).t(), None, "contiguous", id="residual-last-dim-strided"),
        pytest.param(torch.zeros(1, _MAX_C + 1), None, None, "wider", id="too-wide"),
    ]


@pytest.mark.parametrize("x, residual, weight, match", _errors())
def test_add_layer_norm_errors(x, residual, weight, match):
    on = lambda t: t.to(DEVICE) if t is not None and t.device.type != "meta" else t
    with pytest.raises(ValueError, match=match):
        add_layer_norm(on(x), on(residual), on(weight), None)
    if weight is not None:  # the same checks guard bias
        with pytest.raises(ValueError, match=match.replace("weight", "bias")):
            add_layer_norm(on(x), on(residual), None, on(weight))


def test_add_layer_norm_ref():
    # The reference itself: eager's sum in the dtype, then F.layer_norm in fp32 of that rounded sum.
    x, residual, weight, bias = _inputs((5, 24), torch.float16)
    s, y = add_layer_norm_ref(x, residual, weight, bias, 1e-5)
    assert torch.equal(s, x + residual)
    assert torch.equal(y, F.layer_norm((x + residual).float(), (24,), weight.float(), bias.float(), 1e-5).half())


@cuda_only
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("m, c", GPU_SHAPES)
def test_add_layer_norm_sd_shapes(m, c, dtype, atol, rtol):
    x, residual, weight, bias = _inputs((m, c), dtype)
    _, y = _check(x, residual, weight, bias, atol, rtol)
    # And eager end to end, in the dtype: its layer_norm also takes fp32 statistics (Welford) and rounds y once.
    torch.testing.assert_close(y, F.layer_norm(x + residual, (c,), weight, bias), atol=atol, rtol=rtol)
    # norm3's launch: the feed-forward's bias carried into s, y unchanged
    s_biased, y_biased = add_layer_norm(x, residual, weight, bias, s_bias=bias)
    assert torch.equal(s_biased, (x + residual) + bias)
    torch.testing.assert_close(y_biased, y, atol=atol, rtol=rtol)


@cuda_only
def test_add_layer_norm_past_int32_offsets():
    # x, residual, s, y of 2^31 + 16 * 1280 elements (4.3 GB each in fp16): the last rows lie past int32 offsets.
    if torch.cuda.get_device_properties(0).total_memory < 24 << 30:
        pytest.skip("needs 24 GB of GPU memory")
    m, c = 2**31 // 1280 + 16, 1280
    x = torch.empty(m, c, device="cuda", dtype=torch.float16).normal_()
    residual = torch.empty_like(x).normal_()
    s, y = add_layer_norm(x, residual, None, None)
    for rows in (slice(-16, None), slice(0, 16)):
        assert torch.equal(s[rows], x[rows] + residual[rows])
        torch.testing.assert_close(y[rows], add_layer_norm_ref(s[rows], None, None, None)[1], atol=1e-5, rtol=1e-3)
