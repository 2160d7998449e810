"""The torch backend against the eager one on the tiny preset.

On CPU (fp32, no graph): the `denoise` verb gives the latents of the pipeline's own Python loop over the eager
backend, for a multistep (pndm), an ancestral (euler-a, noise pre-drawn) and a second-order (dpmpp-2m) scheduler,
and the decoded images agree to >= 40 dB PSNR. With CUDA: the captured CUDA-graph loop against the same loop
uncaptured. The whole backend with the Triton kernels runs with CUDA, or on CPU under the interpreter with
SDRT_SLOW=1 (a minute per UNet call there; tests/test_passes.py covers the kernels in tiny blocks by default).
"""

import copy
import functools
import os
import warnings

import numpy as np
import pytest
import torch

from sdrt import schedulers
from sdrt.backends import Precision
from sdrt.backends.eager import EagerBackend
from sdrt.backends.torch_opt import TorchBackend, TorchOptions, create
from sdrt.errors import SdrtError
from sdrt.graphs import GraphCache
from sdrt.loop import bucket_key, denoise_loop
from sdrt.models import load_model
from sdrt.pipeline import GenerationRequest, Pipeline
from sdrt.specs import PRESETS

# tests/conftest.py defaults TRITON_INTERPRET to 1; the compiled kernels need TRITON_INTERPRET=0 on the command line.
cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                          reason="needs CUDA and TRITON_INTERPRET=0")
STEPS = 4
# Final latents are ~20 in magnitude; per-step differences of a few fp32 ulps (fused QKV GEMM, SDPA vs the stock
# processor, channels-last convolutions) are carried through STEPS scheduler steps: observed <= 7e-5.
LATENT_ATOL = 3e-4


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def eager(tiny):
    return Pipeline.from_components(tiny, EagerBackend(copy.deepcopy(tiny), device="cpu"))  # fp32, no TF32


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _loop_inputs(pipe: Pipeline, request: GenerationRequest, device="cpu"):
    """What the pipeline feeds its loop for `request` (txt2img): embeds, schedule, initial latents and every step's
    noise, drawn from the seed's generator in diffusers' order (initial latents, then z_0, z_1, ...)."""
    r = pipe.resolve(request)
    sched = schedulers.make_schedule(r.scheduler, pipe.info.scheduler_config, r.steps)
    embeds, _ = pipe.encode(r, r.guidance > 1, [])
    g = torch.Generator("cpu").manual_seed(r.seed)
    shape = (len(r.prompts) * r.batch, 4, r.height // 8, r.width // 8)
    latents = torch.randn(shape, generator=g) * sched.init_noise_sigma
    noise = None
    if any(sched.draws_noise):
        noise = torch.stack([torch.randn(shape, generator=g) if d else torch.zeros(shape) for d in sched.draws_noise])
    return {"latents": latents.to(device), "encoder_hidden_states": embeds.to(device), "sched": sched.to(device),
            "guidance": r.guidance, "noise": None if noise is None else noise.to(device)}


def _pixels(backend, latents, vae_scale):
    image = backend.vae_decoder(latents / vae_scale).float()
    return (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


@pytest.mark.parametrize("scheduler", ["pndm", "euler-a", "dpmpp-2m"])
def test_denoise_matches_eager_pipeline(tiny, eager, scheduler):
    backend = TorchBackend(copy.deepcopy(tiny), device="cpu")  # fp32, no kernels, no graph
    assert not backend.options.kernels and not backend.options.cuda_graph
    request = GenerationRequest("a red cube", steps=STEPS, scheduler=scheduler, seed=7, guidance=6.0)
    ref = eager.generate(request)
    inputs = _loop_inputs(eager, request)
    # Computed once per loop, not once a step: the text's K/V (in the first step), and the time embedding with each
    # resnet's projection of it (for all STEPS steps at once, before the first: sdrt.unet_step)
    once = [m.to_kv for m in backend.unet_module.modules() if hasattr(m, "to_kv")]
    once += [m.time_emb_proj for m in backend.unet_module.modules() if hasattr(m, "time_emb_proj")]
    once.append(backend.unet_module.time_embedding)
    calls = []
    for m in once:
        m.register_forward_hook(lambda *a: calls.append(1))
    assert backend.step_forward
    latents = backend.denoise(**inputs)
    assert len(calls) == len(once) > 10
    torch.testing.assert_close(latents, ref.latents, atol=LATENT_ATOL, rtol=0)
    assert _psnr(_pixels(backend, latents, eager.info.vae_scale), ref.pixels) >= 40.0
    # the device loop itself is the pipeline's loop op for op: over the eager UNet it is bit-exact
    inputs["embeds"] = inputs.pop("encoder_hidden_states")
    same = denoise_loop(lambda i, *a: eager.backend.unet(*a).float(), **inputs)
    torch.testing.assert_close(same, ref.latents, atol=0, rtol=0)


def test_pipeline_with_torch_backend(tiny, eager):
    # Through the pipeline (its Python loop over the unet verb, or the denoise verb once the pipeline hands it the
    # loop), with guidance off: one batch of N rows.
    pipe = Pipeline.from_components(tiny, TorchBackend(copy.deepcopy(tiny), device="cpu"))
    request = GenerationRequest("a house", steps=STEPS, scheduler="euler-a", seed=3, guidance=1.0)
    ref, out = eager.generate(request), pipe.generate(request)
    torch.testing.assert_close(out.latents, ref.latents, atol=LATENT_ATOL, rtol=0)
    assert _psnr(out.pixels, ref.pixels) >= 40.0


@pytest.mark.parametrize("preset", ["tiny-sd2", "tiny-sdxl"])
def test_pipeline_with_torch_backend_other_families(preset):
    # SD 2.x (v-prediction, linear projections) and SDXL (two text encoders; the pooled text and size ids go into
    # the time embeddings the loop computes ahead of its steps), with guidance: against the eager pipeline.
    c = load_model(preset)
    backend = TorchBackend(copy.deepcopy(c), device="cpu")
    assert backend.step_forward
    request = GenerationRequest("a house", steps=STEPS, scheduler="dpmpp-2m", seed=5, guidance=5.0)
    ref = Pipeline.from_components(c, EagerBackend(copy.deepcopy(c), device="cpu")).generate(request)
    out = Pipeline.from_components(c, backend).generate(request)
    torch.testing.assert_close(out.latents, ref.latents, atol=LATENT_ATOL, rtol=0)
    assert _psnr(out.pixels, ref.pixels) >= 40.0


def test_vae_encoder_and_unet_verbs(tiny):
    backend, ref = TorchBackend(copy.deepcopy(tiny), device="cpu"), EagerBackend(copy.deepcopy(tiny), device="cpu")
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    torch.testing.assert_close(backend.vae_encoder(image), ref.vae_encoder(image), atol=2e-5, rtol=0)
    x, t, e = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 64)
    torch.testing.assert_close(backend.unet(x, t, e), ref.unet(x, t, e), atol=2e-5, rtol=0)


def test_options_and_errors(tiny, monkeypatch):
    assert TorchOptions().resolve(torch.device("cpu")) == TorchOptions(kernels=False, cuda_graph=False)
    with pytest.raises(SdrtError, match="CUDA graphs"):
        TorchOptions(cuda_graph=True).resolve(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SdrtError, match="TRITON_INTERPRET"):
        TorchOptions(kernels=True).resolve(torch.device("cpu"))
    with pytest.raises(SdrtError, match="int8"):
        create(Precision.INT8, components=tiny)
    with pytest.raises(SdrtError, match="components"):
        create(Precision.FP32)


def test_kernels_are_wired_in(tiny, monkeypatch):
    from sdrt.blocks import GroupNormAct, SdrtAttnProcessor

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = TorchBackend(copy.deepcopy(tiny), device="cpu", options=TorchOptions(kernels=True))
    for model in (backend.unet_module, backend.vae):
        procs = model.attn_processors.values()
        assert procs and all(isinstance(p, SdrtAttnProcessor) and p.kernel for p in procs)
        norms = [m for m in model.modules() if isinstance(m, GroupNormAct)]
        assert norms and all(m.kernel for m in norms)
        assert next(p for p in model.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)


def test_bucket_key(eager):
    def key(scheduler="pndm", size=64, seed=0, guidance=7.5, prompts="a"):
        inputs = _loop_inputs(eager, GenerationRequest(prompts, steps=4, scheduler=scheduler, height=size,
                                                       width=size, seed=seed, guidance=guidance))
        inputs.pop("guidance")
        inputs["embeds"] = inputs.pop("encoder_hidden_states")
        return bucket_key(**inputs)

    # values (seed, guidance scale) are buffers of one graph; shapes, CFG on/off and the schedule are buckets
    assert key() == key(seed=1, guidance=3.0)
    assert len({key(), key(size=72), key(guidance=1.0), key(prompts=("a", "b")), key("euler-a"),
                key("dpmpp-2m")}) == 6


def test_denoise_with_kernels_matches_eager(tiny, eager):
    # Triton kernels in every attention and GroupNorm; one step of dpmpp-2m, guidance off (batch 1) on CPU, where
    # the interpreter makes it the slowest test (~10-25 s) but the only one running every kernel launch in the UNet.
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    backend = TorchBackend(copy.deepcopy(tiny), device=device, options=TorchOptions(kernels=True, cuda_graph=False))
    request = GenerationRequest("a cat", steps=STEPS if device == "cuda" else 1, scheduler="dpmpp-2m", guidance=1.0)
    ref = eager.generate(request)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # cuDNN's fp32 convs default to TF32 (~1e-3)
        latents = backend.denoise(**_loop_inputs(eager, request, device)).cpu()
    torch.testing.assert_close(latents, ref.latents, atol=LATENT_ATOL, rtol=0)


# ---- the captured loop (CUDA only) -----------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16])
@pytest.mark.parametrize("scheduler", ["pndm", "euler-a", "dpmpp-2m"])
def test_captured_loop_matches_uncaptured(tiny, eager, scheduler, precision):
    graphed = TorchBackend(copy.deepcopy(tiny), precision, "cuda")
    plain = TorchBackend(copy.deepcopy(tiny), precision, "cuda", TorchOptions(cuda_graph=False))
    assert graphed.options.cuda_graph and graphed.options.kernels
    # fp32: the same kernels replayed, up to cuBLAS/autotuning choices; fp16: the rounding of fp16 activations
    atol = 1e-3 if precision is Precision.FP32 else 5e-2
    for seed, guidance in ((1, 7.5), (2, 3.0)):  # the second call replays the same graph with new buffers
        inputs = _loop_inputs(eager, GenerationRequest("a tree", steps=STEPS, scheduler=scheduler, seed=seed,
                                                        guidance=guidance), "cuda")
        out = graphed.denoise(**inputs)
        torch.testing.assert_close(out, plain.denoise(**inputs), atol=atol, rtol=0)
        assert len(graphed.graphs) == 1
    if precision is Precision.FP32:  # and the image is eager's (CPU, fp32)
        ref = eager.generate(GenerationRequest("a tree", steps=STEPS, scheduler=scheduler, seed=2, guidance=3.0))
        assert _psnr(_pixels(graphed, out, eager.info.vae_scale), ref.pixels) >= 40.0


@cuda
def test_sd1_vae_runs_in_fp16_near_fp32(tiny):
    # SD 1.x/2.x decode in fp16, as diffusers' pipelines do (only SDXL's VAE stays fp32): the recorded fp16 VAE
    # against the fp32 one, relative to the image's range, at the exporter's fp16 bar.
    fp16 = TorchBackend(copy.deepcopy(tiny), Precision.FP16, "cuda")
    fp32 = TorchBackend(copy.deepcopy(tiny), Precision.FP32, "cuda", TorchOptions(cuda_graph=False))
    assert next(fp16.vae.parameters()).dtype == torch.float16
    g = torch.Generator().manual_seed(0)
    z, image = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    for got, want in ((fp16.vae_decoder(z), fp32.vae_decoder(z)), (fp16.vae_encoder(image), fp32.vae_encoder(image))):
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        assert float((got.float() - want).abs().max() / want.abs().max()) < 2e-2


@cuda
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16])
def test_captured_stages_match_uncaptured(precision):
    # Both SDXL text encoders (CLIP-L and the projected one), the VAE decoder and encoder, the unet verb (with
    # SDXL's added conditioning): recorded without a warning (a failed recording would fall back silently but for
    # it), replayed with new inputs, equal to plain.
    c = load_model("tiny-sdxl")
    graphed = TorchBackend(copy.deepcopy(c), precision, "cuda")
    plain = TorchBackend(copy.deepcopy(c), precision, "cuda", TorchOptions(cuda_graph=False))
    atol = 1e-3 if precision is Precision.FP32 else 2e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for seed in (0, 1):
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, 1000, (2, 77), generator=g)
            for k in (0, 1):
                for name, t in graphed.text_encoder(k, ids).items():
                    torch.testing.assert_close(t, plain.text_encoder(k, ids)[name], atol=atol, rtol=0)
            z, image = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
            torch.testing.assert_close(graphed.vae_decoder(z), plain.vae_decoder(z), atol=atol, rtol=0)
            torch.testing.assert_close(graphed.vae_encoder(image), plain.vae_encoder(image), atol=atol, rtol=0)
            x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 10.0]) * (seed + 1) / 2
            cond = (torch.randn(2, 77, 96, generator=g), torch.randn(2, 32, generator=g), torch.rand(2, 6) * 64)
            torch.testing.assert_close(graphed.unet(x, t, *cond), plain.unet(x, t, *cond), atol=atol, rtol=0)
    assert len(graphed.stage_graphs) == 4 and all(v is not None for v in graphed.stage_graphs.entries.values())
    assert len(graphed.unet_graphs) == 1 and all(v is not None for v in graphed.unet_graphs.entries.values())


@cuda
def test_unet_verb_recorded_inside_a_text_kv_scope(tiny):
    # A caller's own loop in text_kv_once(), over the recorded unet verb: the recording projects the text it is
    # given on every replay. Recorded inside the scope without no_text_kv, its warm-up cached K/V for the first
    # text and the graph reused them for the second.
    from sdrt.blocks import text_kv_once

    graphed = TorchBackend(copy.deepcopy(tiny), Precision.FP32, "cuda")
    plain = TorchBackend(copy.deepcopy(tiny), Precision.FP32, "cuda", TorchOptions(cuda_graph=False))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 999.0])
    with text_kv_once():
        for _ in range(2):
            e = torch.randn(2, 77, 64, generator=g)
            torch.testing.assert_close(graphed.unet(x, t, e), plain.unet(x, t, e), atol=1e-3, rtol=0)
    assert len(graphed.unet_graphs) == 1


def test_stages_and_loop_have_no_host_sync():
    # What a CUDA graph cannot record is a read back to the host (.item(), a tensor in an `if`) or a tensor made on
    # the CPU inside forward. On the meta device both fail, so this is the CPU check that the stage verbs' modules
    # (transformers' CLIP, diffusers' VAE, after sdrt's passes) and the denoising loop can be recorded; the recording
    # itself is a GPU test.
    backend = TorchBackend(load_model("tiny-sdxl"), device="cpu")
    for m in (*backend.text_encoders, backend.vae):
        m.to("meta")
    backend.device = torch.device("meta")
    ids = torch.zeros(2, 77, dtype=torch.long)
    for k in (0, 1):
        out = backend.text_encoder(k, ids)
        assert out["penultimate_hidden_state"].device.type == "meta" and out["pooled_output"].shape[0] == 2
    assert backend.vae_decoder(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 64, 64)
    assert backend.vae_encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 8, 8, 8)
    # and the loop, as CapturedLoop records it: the time embeddings of every step ahead of the first (SDXL's added
    # conditioning too), the step forward, guidance and the scheduler (euler-a: drawn noise)
    backend.unet_module.to("meta")
    assert backend.step_forward
    sched = schedulers.make_schedule("euler-a", PRESETS["tiny-sdxl"].scheduler, 3).to("meta")
    meta = functools.partial(torch.zeros, device="meta")
    latents = backend.denoise(meta(1, 4, 8, 8), meta(2, 77, 96), sched, 7.5, meta(2, 32), meta(2, 6),
                              meta(3, 1, 4, 8, 8))
    assert latents.device.type == "meta" and latents.shape == (1, 4, 8, 8)


@cuda
def test_one_graph_per_bucket(tiny, eager):
    backend = TorchBackend(copy.deepcopy(tiny), Precision.FP16, "cuda")
    for scheduler, size in (("pndm", 64), ("pndm", 64), ("pndm", 72), ("euler-a", 64)):
        backend.denoise(**_loop_inputs(eager, GenerationRequest("x", steps=4, scheduler=scheduler, height=size,
                                                                   width=size), "cuda"))
    assert len(backend.graphs) == 3


def test_captured_loops_are_capped_least_recent_first(tiny, eager, monkeypatch):
    # A service that sees many sizes must not keep a graph (and its memory pool) per bucket forever. The capture is
    # CUDA-only; the bookkeeping around it is tested here with a stand-in that runs the loop uncaptured.
    from dataclasses import replace

    from sdrt.backends import torch_opt

    captured = []

    class Loop:
        def __init__(self, loop, **kw):
            captured.append(kw["latents"].shape[-1])
            self.loop = loop

        def __call__(self, **kw):
            return self.loop(**kw)

    monkeypatch.setattr(torch_opt, "CapturedLoop", Loop)
    backend = TorchBackend(copy.deepcopy(tiny), device="cpu")
    backend.options = replace(backend.options, cuda_graph=True, max_graphs=2)
    backend.graphs = GraphCache(2)

    def run(size):
        inputs = _loop_inputs(eager, GenerationRequest("x", steps=1, scheduler="ddim", height=size, width=size))
        inputs["embeds"] = inputs.pop("encoder_hidden_states")
        backend.denoise(inputs.pop("latents"), inputs.pop("embeds"), **inputs)

    for size in (64, 72, 64, 80, 72):  # 64 is used again before 80 arrives, so 72 is the one dropped
        run(size)
    assert captured == [8, 9, 10, 9] and [k[4][0][-1] for k in backend.graphs] == [10, 9]
    with pytest.raises(SdrtError, match="max_graphs"):
        TorchOptions(max_graphs=0).resolve(torch.device("cpu"))


def test_stage_verbs_are_recorded_per_shape_and_fall_back(tiny, eager, monkeypatch):
    # Text encoder, VAE and unet verbs: one recorded call per (verb, encoder, input shape), replayed after; a shape
    # whose recording fails warns once and runs uncaptured from then on. CUDA-only recording, so the bookkeeping is
    # tested here with a stand-in that calls fn directly, and one that fails like a host sync does.
    from dataclasses import replace

    from sdrt.backends import torch_opt

    made = []

    class Call:
        def __init__(self, fn, *inputs):
            if inputs[0].shape[-1] == 9:  # the stand-in "host sync": 72 px images
                raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
            made.append(inputs[0].shape)
            self.fn = fn

        def __call__(self, *inputs):
            return self.fn(*inputs)

    monkeypatch.setattr(torch_opt, "CapturedCall", Call)
    backend = TorchBackend(copy.deepcopy(tiny), device="cpu")
    backend.options = replace(backend.options, cuda_graph=True)
    ref = EagerBackend(copy.deepcopy(tiny), device="cpu")
    ids = torch.randint(0, 1000, (2, 77))
    for _ in range(2):
        out = backend.text_encoder(0, ids)
        assert out.keys() == ref.text_encoder(0, ids).keys()
        torch.testing.assert_close(out["last_hidden_state"], ref.text_encoder(0, ids)["last_hidden_state"])
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(backend.vae_decoder(z), ref.vae_decoder(z), atol=2e-5, rtol=0)
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 999.0]), torch.randn(2, 77, 64)
    for _ in range(2):  # the unet verb, for callers with their own loop
        torch.testing.assert_close(backend.unet(x, t, e), ref.unet(x, t, e), atol=2e-5, rtol=0)
    assert made == [(2, 77), (1, 4, 8, 8), (2, 4, 8, 8)]  # the second text and unet calls replayed
    with pytest.warns(RuntimeWarning, match=r"vae_decoder could not be recorded .*capturing\)"):
        backend.vae_decoder(torch.randn(1, 4, 9, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        z9 = torch.randn(1, 4, 9, 9)
        torch.testing.assert_close(backend.vae_decoder(z9), ref.vae_decoder(z9), atol=2e-5, rtol=0)
    assert len(backend.stage_graphs) == 3 and len(backend.unet_graphs) == 1 and len(backend.graphs) == 0
    backend.options = replace(backend.options, graph_stages=False)
    backend.vae_decoder(torch.randn(1, 4, 10, 10))
    assert len(made) == 3
