"""sdrt.kernels.geglu vs geglu_ref (a * exact GELU(gate) in fp32) and diffusers' GEGLU module."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from kernel_device import CUDA, DEVICE  # tests/kernels is on sys.path (rootdir-relative import)
from sdrt.kernels import geglu, geglu_ref

cuda_only = pytest.mark.skipif(not CUDA, reason="full SD shapes need CUDA (the interpreter is too slow)")

DTYPES = [
    # The same fp32 formula with another erf. For negative g, 1 + erf(g / sqrt(2)) cancels: an erf ulp near -1
    # (6e-8) is an absolute error of |a * g| / 2 * 6e-8 in y, i.e. up to ~2e-6 for these inputs (|a|, |g| < 10),
    # hence the atol. A tanh-approximate GELU, off by up to 4.7e-4, would fail.
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    # Both sides compute in fp32 (the disagreement above is in atol) and round once to the storage dtype, which can
    # flip that rounding: 1 ulp of the output, <= 2^-10 (fp16) or 2^-7 (bf16) of its magnitude.
    pytest.param(torch.float16, 1e-5, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-5, 8e-3, id="bf16"),
]

# Leading shape and F; the kernel's tile is 16 rows x 256 columns.
CPU_SHAPES = [
    pytest.param((37,), 300, id="37x300"),  # odd rows: 3 row blocks, the last masked; F past one column block
    pytest.param((5,), 1, id="f1"),  # h is (5, 2): a and gate are one column each
    pytest.param((2, 9), 40, id="3d-b2"),  # (B, N, 2F) as in a transformer block
    pytest.param((3,), 1280, id="sd-f1280"),  # an SD width: whole column blocks, no column masking
    pytest.param((), 24, id="rank1"),  # a single row (2F,)
]

# SD 1.5 / SDXL feed-forwards: rows = 2 (CFG) x 64^2, 32^2, 16^2 latent pixels; F = 4 x 320, 640, 1280 channels.
GPU_SHAPES = [pytest.param(m, f, id=f"{m}x{f}") for m in (2 * 4096, 2 * 1024, 2 * 256) for f in (1280, 2560, 5120)]


def _h(shape, dtype, scale=2.0):
    return (torch.randn(shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)


def _check(h, atol, rtol):
    y = geglu(h)
    assert y.shape == (*h.shape[:-1], h.shape[-1] // 2) and y.dtype == h.dtype and y.is_contiguous()
    torch.testing.assert_close(y, geglu_ref(h), atol=atol, rtol=rtol)
    return y


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("lead, f", CPU_SHAPES)
def test_geglu_matches_ref(lead, f, dtype, atol, rtol):
    _check(_h((*lead, 2 * f), dtype), atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_geglu_strided_rows(dtype, atol, rtol):
    # Rows of a wider tensor (row stride 624 > 2F = 600; 3-D, strides (900, 100, 1)) and broadcast rows (stride 0)
    # are read in place; transposed leading dims do not flatten into one row axis and take the contiguous copy.
    _check(_h((37, 624), dtype)[:, :600], atol, rtol)
    _check(_h((1, 600), dtype).expand(37, 600), atol, rtol)
    _check(_h((2, 9, 100), dtype)[:, :, 10:90], atol, rtol)
    _check(_h((9, 2, 80), dtype).transpose(0, 1), atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_geglu_saturates(dtype, atol, rtol):
    # gelu(g) -> g for large positive g and -> 0 for large negative g (erf -> +-1), up to |g| = 1e4 (fp16 holds
    # a * g = 1e4); also the gate exactly 0.
    gate = torch.tensor([-1e4, -60.0, -10.0, -6.0, 0.0, 6.0, 10.0, 60.0, 1e4])
    a = torch.linspace(-1.0, 1.0, 17).repeat(2)[:, None]  # (34, 1): 3 row blocks
    h = torch.cat([a.expand(-1, gate.numel()), gate.expand(a.shape[0], -1)], dim=-1).to(DEVICE, dtype)
    y = _check(h, atol, rtol)
    assert torch.all(y[:, gate <= -10] == 0)
    torch.testing.assert_close(y[:, gate >= 10], (h[:, :9] * h[:, 9:])[:, gate >= 10], atol=0, rtol=0)


def test_geglu_matches_diffusers_module():
    # Tier 2: the kernel on the projection's output is diffusers' GEGLU (chunk, F.gelu, mul) on a (B, N, C) input.
    module = GEGLU(32, 48).to(DEVICE)
    x = torch.randn(2, 7, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(geglu(module.proj(x)), module(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 0, 6), (0,)])
def test_geglu_empty(shape):
    y = geglu(torch.empty(shape, device=DEVICE, dtype=torch.float16))
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == torch.float16


@pytest.mark.parametrize("h, match", [
    (torch.tensor(1.0), "rank"),
    (torch.zeros(2, 8, dtype=torch.float64), "dtype"),
    (torch.zeros(2, 8, dtype=torch.int32), "dtype"),
    (torch.zeros(2, 7), "even"),
    (torch.zeros(8, 2).t(), "contiguous"),  # (2, 8) with strides (1, 2)
], ids=["rank0", "fp64", "int32", "odd", "last-dim-strided"])
def test_geglu_errors(h, match):
    with pytest.raises(ValueError, match=match):
        geglu(h.to(DEVICE))


@cuda_only
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("m, f", GPU_SHAPES)
def test_geglu_sd_shapes(m, f, dtype, atol, rtol):
    _check(_h((m, 2 * f), dtype), atol, rtol)


@cuda_only
def test_geglu_past_int32_offsets():
    # h of 2^31 + 8 * 8192 elements (4 GB fp16): the last rows lie past int32 offsets. Checked on those rows only.
    if torch.cuda.get_device_properties(0).total_memory < 16 << 30:
        pytest.skip("needs 16 GB of GPU memory")
    m, f = 2**18 + 8, 4096
    h = torch.empty(m, 2 * f, device="cuda", dtype=torch.float16).normal_()
    y = geglu(h)
    torch.testing.assert_close(y[-16:], geglu_ref(h[-16:]), atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(y[:16], geglu_ref(h[:16]), atol=1e-5, rtol=1e-3)


def test_geglu_ref_is_exact_gelu():
    # The reference itself: exact GELU (approximate="none"), not the tanh form, which is off by up to 4.7e-4 (g ~ -2.7).
    h = torch.tensor([[1.0, 3.0]])  # a = 1, g = 3: gelu(3) = 1.5 * (1 + erf(3 / sqrt(2))) = 2.9959503
    assert geglu_ref(h).item() == pytest.approx(2.9959503, abs=1e-6)
    assert abs(geglu_ref(h).item() - F.gelu(torch.tensor(3.0), approximate="tanh").item()) > 4e-4
