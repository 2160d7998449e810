"""sdrt.kernels.group_norm vs group_norm_ref (F.group_norm in fp32 [+ SiLU]) in both memory formats."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_device import CUDA, DEVICE  # tests/kernels is on sys.path (rootdir-relative import)
from sdrt.kernels import GroupNormTuning, group_norm, group_norm_ref
from sdrt.kernels.group_norm import _plan, plan_for

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
# Both plans: one kernel holding a whole group (the default where it fits: every CPU shape below), and the split
# statistics + apply kernels (what larger shapes run).
DEFAULT, TWO_PASS = GroupNormTuning(), GroupNormTuning(one_pass=False)
PATHS = [
    pytest.param(GroupNormTuning(one_pass=True), id="one-pass"),
    pytest.param(TWO_PASS, id="two-pass"),
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
# The levels the one-pass plan takes: SD 1.5's 8^2 and 16^2 (1920, 2560: skip concatenations), SD 2's 12^2.
SMALL_SD_SHAPES = [pytest.param(2, c, s, s, id=f"c{c}-{s}x{s}")
                   for c, s in ((1280, 8), (2560, 8), (640, 16), (1280, 16), (1920, 16), (1280, 12))]


def _inputs(N, C, H, W, dtype, memory_format):
    # An offset of the mean (SD activations are not centred) checks the shifted statistics.
    x = (torch.randn(N, C, H, W, device=DEVICE, dtype=torch.float32) * 2 + 0.5).to(dtype)
    x = x.contiguous(memory_format=memory_format)
    weight = torch.randn(C, device=DEVICE, dtype=dtype)
    bias = torch.randn(C, device=DEVICE, dtype=dtype)
    return x, weight, bias


def _check(x, weight, bias, silu, atol, rtol, num_groups=32, tuning=DEFAULT):
    y = group_norm(x, num_groups, weight, bias, eps=1e-5, silu=silu, tuning=tuning)
    assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride()  # same memory format
    torch.testing.assert_close(y, group_norm_ref(x, num_groups, weight, bias, 1e-5, silu), atol=atol, rtol=rtol)


@pytest.mark.parametrize("tuning", PATHS)
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C, H, W", CPU_SHAPES)
def test_group_norm_matches_ref(N, C, H, W, dtype, atol, rtol, memory_format, silu, tuning):
    _check(*_inputs(N, C, H, W, dtype, memory_format), silu, atol, rtol, tuning=tuning)


@pytest.mark.parametrize("memory_format", FORMATS)
# On CPU (3-5 s each in the interpreter) the widest group, the 8-byte-aligned one and the odd H*W.
@pytest.mark.parametrize("N, C, H, W", SMALL_SD_SHAPES if CUDA else [SMALL_SD_SHAPES[i] for i in (1, 4, 5)])
def test_group_norm_one_pass_at_sd_small_levels(N, C, H, W, memory_format):
    # Full size: one kernel, one group a program, which matches the reference and the split kernels' result.
    x, w, b = _inputs(N, C, H, W, torch.float16, memory_format)
    add = torch.randn(N, C, device=DEVICE).to(torch.float16)
    p = plan_for(x, 32)
    assert p.one_pass and p.gpp == 1 and p.split == 1 and p.block_hw >= H * W and p.n_chunks == 32
    y = group_norm(x, 32, w, b, silu=True, add=add)
    torch.testing.assert_close(y, group_norm_ref(x, 32, w, b, silu=True, add=add), atol=1e-3, rtol=2e-3)
    two = group_norm(x, 32, w, b, silu=True, add=add, tuning=TWO_PASS)
    torch.testing.assert_close(y, two, atol=2e-3, rtol=4e-3)  # each within the reference's tolerance


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_one_pass_only_where_a_group_fits(channels_last):
    # 16384 padded elements a program: SD's 8^2 and 16^2 levels (up to 64 channels a group at 16^2), not 32^2 and up.
    def plan(C, s):
        return _plan(2, C, s * s, 32, 2, channels_last, 4 * 132)

    assert all(plan(C, 8).one_pass for C in (320, 640, 1280, 2560))
    assert plan(1920, 16).one_pass and plan(1280, 16).one_pass and not plan(2560, 16).one_pass
    sd_larger = [(640, 32), (960, 32), (1280, 32), (320, 64), (640, 64), (960, 64), (320, 128), (640, 128)]
    assert not any(plan(C, s).one_pass for C, s in sd_larger)
    assert plan(2560, 16).split > 1  # the split kernels instead
    with pytest.raises(ValueError, match="one_pass=True needs a chunk of at most 16384 elements"):
        _plan(2, 2560, 16 * 16, 32, 2, channels_last, 4 * 132, one_pass=True)


@cuda_only
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C, H, W", GPU_SHAPES + SMALL_SD_SHAPES)
def test_group_norm_sd_shapes(N, C, H, W, dtype, atol, rtol, memory_format):
    _check(*_inputs(N, C, H, W, dtype, memory_format), True, atol, rtol)


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("tuning", [
    # 3, 5: the last chunk short
    *(pytest.param(GroupNormTuning(groups_per_program=g, one_pass=False), id=f"gpp{g}") for g in (1, 3, 5, 32)),
    *(pytest.param(GroupNormTuning(groups_per_program=g, one_pass=True), id=f"one-pass-gpp{g}") for g in (3, 5)),
    # several tiles a program, and tiles narrower than a chunk
    pytest.param(GroupNormTuning(tile=64, one_pass=False), id="tile64"),
    pytest.param(GroupNormTuning(tile=64, reverse_apply=False, one_pass=False), id="tile64-forward"),
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
    assert plan_for(x, 32, TWO_PASS).finalize is finalize
    y = group_norm(x, 32, w, b, silu=True, tuning=TWO_PASS)
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
    pdl, plain = (group_norm(x, 32, w, b, silu=True, tuning=GroupNormTuning(pdl=p, one_pass=False))
                  for p in (True, False))
    assert torch.equal(pdl, plain)


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C, H, W, tuning", [
    pytest.param(2, 320, 5, 7, GroupNormTuning(), id="c320-5x7-one-pass"),
    # split plans: nhwc's 12-group chunks with the last one short; several programs a group (+ finalize); gpp 1
    pytest.param(2, 320, 5, 7, TWO_PASS, id="c320-5x7"),
    pytest.param(1, 320, 24, 25, TWO_PASS, id="c320-24x25-split"),
    pytest.param(2, 96, 3, 4, GroupNormTuning(groups_per_program=1, one_pass=False), id="c96-gpp1"),
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


@cuda_only
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("N, C, H, W", [(2, 320, 64, 64), (2, 1280, 16, 16)], ids=["split", "one-pass"])
def test_group_norm_in_a_cuda_graph(N, C, H, W, memory_format):
    # As the torch backend's captured loop runs it: recorded in a CUDA graph (the split plan's kernels launched
    # programmatically dependent on Hopper, a finalize kernel in channels-last; or the one-pass kernel), replayed
    # with new inputs copied into the recorded ones: the same bits as plain calls.
    x, w, b = _inputs(N, C, H, W, torch.float16, memory_format)
    add = torch.randn(N, C, device=DEVICE).to(torch.float16)
    static, static_add = x.clone(), add.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and autotune outside the recording
        group_norm(static, 32, w, b, silu=True, add=static_add)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = group_norm(static, 32, w, b, silu=True, add=static_add)
    for seed in (0, 1):
        x2, _, _ = _inputs(N, C, H, W, torch.float16, memory_format)
        add2 = torch.randn(N, C, device=DEVICE).to(torch.float16) * (seed + 1)
        static.copy_(x2)
        static_add.copy_(add2)
        graph.replay()
        assert torch.equal(y, group_norm(x2, 32, w, b, silu=True, add=add2))


def test_group_norm_fused_add_strided_and_errors():
    # A (N, C) view with a non-unit channel stride (e.g. one half of a chunked projection) is copied, not misread.
    x, w, b = _inputs(2, 64, 4, 4, torch.float32, torch.channels_last)
    add = torch.randn(2, 128, device=DEVICE)[:, ::2]
    y = group_norm(x, 32, w, b, add=add)
    torch.testing.assert_close(y, group_norm_ref(x, 32, w, b, add=add), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"add must have shape \(2, 64\)"):
        group_norm(x, 32, w, b, add=torch.zeros(2, 64, 1, 1))


def test_group_norm_strided_affine_is_read_as_values():
    # A (C,) weight or bias that is a view with stride 2 (e.g. one half of an interleaved parameter) is copied, not
    # read at unit stride.
    x, _, _ = _inputs(2, 64, 4, 4, torch.float32, torch.channels_last)
    w, b = torch.randn(128, device=DEVICE)[::2], torch.randn(128, device=DEVICE)[1::2]
    y = group_norm(x, 32, w, b, silu=True)
    torch.testing.assert_close(y, group_norm_ref(x, 32, w, b, silu=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_format", FORMATS)
def test_group_norm_samples_past_int32_offsets_take_torch(monkeypatch, memory_format):
    # The kernels' offsets inside a sample are int32; a sample of more than _MAX_SAMPLE_NUMEL elements (2^31 - 1;
    # lowered here, a real one is 4+ GB) runs PyTorch's GroupNorm: no kernel launch, the same contract.
    gn = importlib.import_module("sdrt.kernels.group_norm")  # the module, not the function sdrt.kernels exports
    monkeypatch.setattr(gn, "_MAX_SAMPLE_NUMEL", 64 * 4 * 5 - 1)

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(gn, "launches", no_launch)
    x, w, b = _inputs(2, 64, 4, 5, torch.float32, memory_format)
    add = torch.randn(2, 64, device=DEVICE)
    y = group_norm(x, 32, w, b, silu=True, add=add)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, group_norm_ref(x, 32, w, b, silu=True, add=add), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(gn, "_MAX_SAMPLE_NUMEL", 64 * 4 * 5)  # at the limit: the kernels
    with pytest.raises(AssertionError, match="a kernel was launched"):
        group_norm(x, 32, w, b)
    # what counts is the span of a sample's offsets: a channels-last channel slice of a 128-channel tensor spans
    # about twice its own elements
    wide = torch.randn(2, 128, 4, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)[:, :64]
    y = group_norm(wide, 32, w, b)
    torch.testing.assert_close(y, group_norm_ref(wide, 32, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_format", FORMATS)
def test_group_norm_apply_order_changes_no_bits(memory_format):
    # The apply pass walks its slice from the end (for L2) or the front: every output element is computed by the
    # same expression either way. 64-element tiles: several tiles a program, the last one partial (HW = 5 * 7).
    x, w, b = _inputs(2, 320, 5, 7, torch.float16, memory_format)
    rev, fwd = (group_norm(x, 32, w, b, silu=True, tuning=GroupNormTuning(tile=64, reverse_apply=r, one_pass=False))
                for r in (True, False))
    plan = plan_for(x, 32, GroupNormTuning(tile=64, one_pass=False))
    assert plan.hw_per_program > plan.block_hw
    assert torch.equal(rev, fwd)


@pytest.mark.parametrize("tuning", PATHS)
def test_group_norm_no_affine_and_other_groups(tuning):
    x, _, _ = _inputs(2, 64, 5, 6, torch.float32, torch.channels_last)
    _check(x, None, None, False, 1e-5, 1e-5, tuning=tuning)
    _check(x, None, None, True, 1e-5, 1e-5, num_groups=4, tuning=tuning)


def test_group_norm_non_dense_input():
    # A strided slice is neither NCHW nor NHWC: computed on a contiguous copy, the output is contiguous.
    x, w, b = _inputs(1, 64, 6, 14, torch.float32, torch.contiguous_format)
    x = x[..., ::2]
    y = group_norm(x, 32, w, b, silu=True)
    assert y.is_contiguous()
    torch.testing.assert_close(y, group_norm_ref(x, 32, w, b, silu=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tuning", PATHS)
def test_group_norm_large_mean(tuning):
    # |mean| = 100 >> std = 0.02: E[x^2] - E[x]^2 in fp32 would lose most digits; the shifted sums (two-pass) and
    # the exact two-pass statistics (one-pass) do not. Checked against fp64: fp32 F.group_norm is off by ~5e-4 here.
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x, w, b = _inputs(1, 320, 6, 6, torch.float32, memory_format)
        x = x * 0.01 + 100.0
        y = group_norm(x, 32, w, b, silu=True, tuning=tuning)
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
