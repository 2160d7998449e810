"""sdrt.kernels.group_norm vs group_norm_ref (F.group_norm in fp32 [+ SiLU]) in both memory formats."""

import pytest
import torch
import torch.nn.functional as F
from sdrt.kernels import GroupNormTuning, group_norm, group_norm_ref
from sdrt.kernels.group_norm import _plan, plan_for

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="full SD shapes need CUDA (the interpreter is too slow)")
# sigmoid(y) = 1 / (1 + exp(-y)): exp overflows to inf for very negative y and the result is the correct 0; numpy
# (Triton's interpreter) warns about it, the GPU does not.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),  # same math; fp32 summation order differs
    # The output rounds once to the storage dtype: allow ~2 ulp relative (fp16 eps 2^-10, bf16 eps 2^-7) plus an
    # absolute term for values near 0 (after SiLU many are).
    pytest.param(torch.float16, 1e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1.6e-2, id="bf16"),
]
FORMATS = [
    pytest.param(torch.contiguous_format, id="nchw"),
    pytest.param(torch.channels_last, id="nhwc"),
]

# (N, C, H, W), always 32 groups.
CPU_SHAPES = [
    pytest.param(1, 320, 2, 3, id="c320-tiny"),  # 10 channels per group, padded to 16
    pytest.param(2, 96, 7, 9, id="c96-7x9-b2"),  # 3 channels per group, odd spatial
    pytest.param(1, 960, 4, 5, id="c960-4x5"),  # 30 channels per group (SD's up blocks concatenate skips)
    pytest.param(1, 320, 16, 17, id="c320-16x17-split"),  # NCHW: 2 tiles of H*W, the reduction split in 2 programs
]

# SD 1.5 / SDXL UNet: C 320..2560 (960 and 1920 after skip concatenation) at 64^2 and 128^2 (SDXL at 1024px);
# the VAE decoder at 512px output: 4 to 16 channels per group over up to 512^2 pixels (a million values per group).
GPU_SHAPES = [pytest.param(2, c, s, s, id=f"c{c}-{s}x{s}")
              for c in (320, 640, 960, 1280, 1920, 2560) for s in (64, 128)]
GPU_SHAPES += [pytest.param(1, c, s, s, id=f"vae-c{c}-{s}x{s}") for c, s in ((512, 128), (256, 256), (128, 512))]


def _inputs(N, C, H, W, dtype, memory_format):
    # An offset of the mean (SD activations are not centred) checks the shifted statistics.
    x = (torch.randn(N, C, H, W, device=DEVICE, dtype=torch.float32) * 2 + 0.5).to(dtype)
    x = x.contiguous(memory_format=memory_format)
    weight = torch.randn(C, device=DEVICE, dtype=dtype)
    bias = torch.randn(C, device=DEVICE, dtype=dtype)
    return x, weight, bias


def _check(x, weight, bias, silu, atol, rtol, num_groups=32):
    y = group_norm(x, num_groups, weight, bias, eps=1e-5, silu=silu)
    assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride()  # same memory format
    torch.testing.assert_close(y, group_norm_ref(x, num_groups, weight, bias, 1e-5, silu), atol=atol, rtol=rtol)


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C, H, W", CPU_SHAPES)
def test_group_norm_matches_ref(N, C, H, W, dtype, atol, rtol, memory_format, silu):
    _check(*_inputs(N, C, H, W, dtype, memory_format), silu, atol, rtol)


@cuda_only
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C, H, W", GPU_SHAPES)
def test_group_norm_sd_shapes(N, C, H, W, dtype, atol, rtol, memory_format):
    _check(*_inputs(N, C, H, W, dtype, memory_format), True, atol, rtol)


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("tuning", [
    *(pytest.param(GroupNormTuning(groups_per_program=g), id=f"gpp{g}") for g in (1, 3, 5, 32)),  # 3, 5: short last
    pytest.param(GroupNormTuning(tile=64), id="tile64"),  # several tiles a program, and tiles narrower than a chunk
    pytest.param(GroupNormTuning(tile=64, reverse_apply=False), id="tile64-forward"),
])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
def test_group_norm_any_tuning(tuning, dtype, atol, rtol, memory_format):
    x, w, b = _inputs(2, 320, 5, 7, dtype, memory_format)
    y = group_norm(x, 32, w, b, silu=True, tuning=tuning)
    torch.testing.assert_close(y, group_norm_ref(x, 32, w, b, silu=True), atol=atol, rtol=rtol)


@pytest.mark.parametrize("memory_format, finalize", [
    pytest.param(torch.contiguous_format, False, id="nchw-apply-reduces"),
    pytest.param(torch.channels_last, True, id="nhwc-finalize-kernel"),
])
def test_group_norm_both_statistics_paths(memory_format, finalize):
    # (1, 320, 24, 25) fp32 on the CPU's 64-program target: NCHW splits each group in 2 and every apply program
    # reduces its 2 partials; channels-last takes 6 groups a program, splits each chunk in 10 and reduces the
    # 6 x 10 partials in a third kernel.
    x, w, b = _inputs(1, 320, 24, 25, torch.float32, memory_format)
    assert plan_for(x, 32).finalize is finalize
    y = group_norm(x, 32, w, b, silu=True)
    torch.testing.assert_close(y, group_norm_ref(x, 32, w, b, silu=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N, C, H, W", [s.values for s in GPU_SHAPES])
def test_group_norm_plan_at_sd_shapes(N, C, H, W):
    # What the launcher decides for an H100 (132 SMs x 4 programs), fp16. Channels-last chunks read runs of >= 128
    # contiguous, 16-byte-aligned bytes per pixel with <= 1/4 of the lanes masked; NCHW keeps one group a program.
    # The grid fills the GPU without oversubscribing it.
    target = 4 * 132
    for channels_last in (False, True):
        p = _plan(N, C, H * W, 32, 2, channels_last, target)
        run_bytes = p.gpp * (C // 32) * 2
        if channels_last:
            assert run_bytes >= 128 and run_bytes % 16 == 0 and run_bytes / 2 / p.block_c >= 0.75
        else:
            assert p.gpp == 1
        assert p.block_c * p.block_hw <= 4096 and p.block_c <= 256
        assert target / 2 <= N * p.n_chunks * p.split <= 2 * target
        assert p.split * p.hw_per_program >= H * W > (p.split - 1) * p.hw_per_program  # every pixel, no idle program
        assert p.finalize == (p.gpp * p.split > 32)


@cuda_only
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("N, C, H, W", [(2, 320, 64, 64), (1, 128, 256, 256), (2, 2560, 8, 8)])
def test_group_norm_pdl_is_bitwise_serial(N, C, H, W, memory_format):
    # Programmatically dependent launches (where the GPU has them) only move when kernels start, never what they
    # compute: the same bits as plain launches, in every plan (finalize kernel or not).
    x, w, b = _inputs(N, C, H, W, torch.float16, memory_format)
    pdl, plain = (group_norm(x, 32, w, b, silu=True, tuning=GroupNormTuning(pdl=p)) for p in (True, False))
    assert torch.equal(pdl, plain)


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C, H, W, tuning", [
    pytest.param(2, 320, 5, 7, GroupNormTuning(), id="c320-5x7"),  # nhwc: 12-group chunks, the last one short
    pytest.param(1, 320, 24, 25, GroupNormTuning(), id="c320-24x25-split"),  # several programs a group (+finalize)
    pytest.param(2, 96, 3, 4, GroupNormTuning(groups_per_program=1), id="c96-gpp1"),
])
def test_group_norm_fused_add(N, C, H, W, tuning, dtype, atol, rtol, memory_format):
    # SD's resnet norm2 input: h + temb[:, :, None, None], the time embedding per sample and channel, here with an
    # offset and spread of its own (it moves each channel's mean, so the group statistics must see it).
    x, w, b = _inputs(N, C, H, W, dtype, memory_format)
    add = (torch.randn(N, C, device=DEVICE) * 3 - 1).to(dtype)
    y = group_norm(x, 32, w, b, silu=True, add=add, tuning=tuning)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, group_norm_ref(x, 32, w, b, silu=True, add=add), atol=atol, rtol=rtol)
    # the reference itself is F.group_norm of the materialised sum
    ref = F.silu(F.group_norm(x.float() + add.float()[:, :, None, None], 32, w.float(), b.float()))
    torch.testing.assert_close(group_norm_ref(x, 32, w, b, silu=True, add=add).float(), ref, atol=atol, rtol=rtol)


def test_group_norm_fused_add_strided_and_errors():
    # A (N, C) view with a non-unit channel stride (e.g. one half of a chunked projection) is copied, not misread.
    x, w, b = _inputs(2, 64, 4, 4, torch.float32, torch.channels_last)
    add = torch.randn(2, 128)[:, ::2]
    y = group_norm(x, 32, w, b, add=add)
    torch.testing.assert_close(y, group_norm_ref(x, 32, w, b, add=add), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"add must have shape \(2, 64\)"):
        group_norm(x, 32, w, b, add=torch.zeros(2, 64, 1, 1))


@pytest.mark.parametrize("memory_format", FORMATS)
def test_group_norm_apply_order_changes_no_bits(memory_format):
    # The apply pass walks its slice from the end (for L2) or the front: every output element is computed by the
    # same expression either way. 64-element tiles: several tiles a program, the last one partial (HW = 5 * 7).
    x, w, b = _inputs(2, 320, 5, 7, torch.float16, memory_format)
    rev, fwd = (group_norm(x, 32, w, b, silu=True, tuning=GroupNormTuning(tile=64, reverse_apply=r))
                for r in (True, False))
    assert plan_for(x, 32, GroupNormTuning(tile=64)).hw_per_program > plan_for(x, 32, GroupNormTuning(tile=64)).block_hw
    assert torch.equal(rev, fwd)


def test_group_norm_no_affine_and_other_groups():
    x, _, _ = _inputs(2, 64, 5, 6, torch.float32, torch.channels_last)
    _check(x, None, None, False, 1e-5, 1e-5)
    _check(x, None, None, True, 1e-5, 1e-5, num_groups=4)


def test_group_norm_non_dense_input():
    # A strided slice is neither NCHW nor NHWC: computed on a contiguous copy, the output is contiguous.
    x, w, b = _inputs(1, 64, 6, 14, torch.float32, torch.contiguous_format)
    x = x[..., ::2]
    y = group_norm(x, 32, w, b, silu=True)
    assert y.is_contiguous()
    torch.testing.assert_close(y, group_norm_ref(x, 32, w, b, silu=True), atol=1e-5, rtol=1e-5)


def test_group_norm_large_mean():
    # |mean| = 100 >> std = 0.02: E[x^2] - E[x]^2 in fp32 would lose most digits; the shifted sums do not.
    # Checked against fp64, since fp32 F.group_norm itself is off by ~5e-4 here.
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x, w, b = _inputs(1, 320, 6, 6, torch.float32, memory_format)
        x = x * 0.01 + 100.0
        y = group_norm(x, 32, w, b, silu=True)
        ref = F.silu(F.group_norm(x.double(), 32, w.double(), b.double()))
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, num_groups, weight_shape, match",
    [
        ((320, 4, 4), 32, (320,), "rank-4"),
        ((1, 320, 4, 4), 30, (320,), "divisor"),
        ((1, 320, 4, 4), 32, (640,), "shape"),
    ],
    ids=["rank", "groups", "weight"],
)
def test_group_norm_errors(shape, num_groups, weight_shape, match):
    with pytest.raises(ValueError, match=match):
        group_norm(torch.zeros(shape), num_groups, torch.ones(weight_shape), None)
    with pytest.raises(ValueError, match="dtype"):
        group_norm(torch.zeros(1, 32, 2, 2, dtype=torch.float64), 32, None, None)
    for bad, match in ((GroupNormTuning(groups_per_program=33), "groups_per_program"),
                       (GroupNormTuning(tile=1000), "tile"), (GroupNormTuning(pdl=True), "pdl")):
        if match == "pdl" and CUDA:
            continue  # supported or not depends on the GPU
        with pytest.raises(ValueError, match=match):
            group_norm(torch.zeros(1, 32, 2, 2), 32, None, None, tuning=bad)
