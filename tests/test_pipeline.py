"""The slim pipeline against diffusers' own pipelines on the same tiny weights and the same seed.

Tier 3 of the correctness ladder: whole images. Eager runs the very same modules, so the only differences are
float reassociation (one text-encoder batch for both CFG halves, the scheduler's coefficient tables): measured
123-138 dB (119 with torch's AVX2 kernels). ONNX Runtime runs exported graphs whose per-graph error is ~1e-6 (the
exporter's check), compounded over the steps: measured 128-132 dB. The bar is 100 dB for both: plausible bugs
land far below it (measured on tiny and tiny-sdxl: the UNet fed timestep + 1, 51-58 dB; guidance x 0.95, 56-61;
the VAE scale 1% off, 65-68; SDXL's time ids with height and width swapped, 46; text embeddings x 0.99, 71-73).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.backends import make_backend
from sdrt.errors import SdrtError
from sdrt.image import psnr
from sdrt.models import load_model
from sdrt.pipeline import GenerationRequest, Pipeline
from sdrt.specs import Family

EAGER_DB, ORT_DB = 100.0, 100.0
# sdrt scheduler name -> (diffusers class, from_config overrides)
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}), "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}), "lcm": ("LCMScheduler", {}),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    return {name: load_model(name) for name in ("tiny", "tiny-sd2", "tiny-sdxl")}


@pytest.fixture(scope="module")
def init_image():
    # Smooth gradients plus noise: something a VAE encodes to non-trivial latents, not a square size.
    y, x = np.mgrid[0:64, 0:96]
    rgb = np.stack([x * 2.6, y * 4.0, (x + y) * 1.5], -1) + np.random.default_rng(0).normal(0, 20, (64, 96, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def reference(c, request: GenerationRequest) -> np.ndarray:
    """The same request through diffusers' StableDiffusion[XL][Img2Img]Pipeline: (N, H, W, 3) float in [0, 1]."""
    import diffusers

    cls, overrides = DIFFUSERS_SCHEDULERS[request.scheduler]
    scheduler = getattr(diffusers, cls).from_config(c.scheduler_config, **overrides)
    img2img = request.init_image is not None
    if c.family is Family.SDXL:
        pipe_cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
        pipe = pipe_cls(vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
                        tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=c.unet, scheduler=scheduler)
    else:
        pipe_cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
        pipe = pipe_cls(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0], unet=c.unet,
                        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    neg = request.negative_prompt
    kw = {"prompt": list(request.prompts), "num_inference_steps": request.steps, "guidance_scale": request.guidance,
          "num_images_per_prompt": request.batch, "output_type": "np",
          "negative_prompt": [neg] * len(request.prompts) if isinstance(neg, str) else neg and list(neg),
          "generator": torch.Generator("cpu").manual_seed(request.seed)}
    if img2img:
        kw.update(image=request.init_image, strength=request.strength)
    else:
        kw.update(height=request.height, width=request.width)
    return pipe(**kw).images


def run_both(c, backend, request, min_db):
    ours = Pipeline.from_components(c, backend).generate(request)
    ref = reference(c, request)
    assert ours.pixels.shape == ref.shape
    db = psnr(ref, ours.pixels)
    assert db >= min_db, f"{c.name} {request.scheduler}: PSNR {db:.1f} dB < {min_db}"
    return ours, ref


# --- eager: every scheduler, family, size, guidance on/off, several prompts, batch, img2img ----------------------
CASES = [  # model, scheduler, size (h, w), guidance, prompts, negative, batch
    ("tiny", "ddim", (64, 96), 7.5, ("a photo of a cat", "a dog"), ("blurry", "ugly"), 1),
    ("tiny", "pndm", (64, 64), 7.5, ("a photo",), None, 2),
    ("tiny", "euler", (96, 64), 7.5, ("a red car",), "low quality", 1),
    ("tiny", "euler-a", (64, 96), 7.5, ("a photo", "a cat"), None, 2),
    ("tiny", "euler-a", (64, 64), 1.0, ("a photo",), None, 2),  # no CFG, stochastic: the noise order matters
    ("tiny", "dpmpp-2m", (64, 96), 5.0, ("a castle",), None, 1),
    ("tiny", "dpmpp-2m-karras", (64, 64), 1.0, ("a castle", ""), None, 1),
    ("tiny", "lcm", (64, 96), 1.0, ("a photo",), None, 2),
    ("tiny-sd2", "ddim", (64, 96), 7.5, ("a photo", "a cat"), None, 1),  # v-prediction
    ("tiny-sd2", "euler", (64, 64), 1.0, ("a photo",), None, 1),
    ("tiny-sdxl", "euler", (64, 96), 5.0, ("a photo", "a cat"), None, 2),  # zeroed uncond (force_zeros)
    ("tiny-sdxl", "euler", (64, 64), 5.0, ("a photo",), "blurry", 1),  # encoded negative prompt
    ("tiny-sdxl", "dpmpp-2m", (64, 64), 1.0, ("a photo",), None, 1),
]


@pytest.mark.parametrize("model,scheduler,size,guidance,prompts,negative,batch", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2][0]}x{c[2][1]}-g{c[3]}-p{len(c[4])}b{c[6]}" for c in CASES])
def test_txt2img_matches_diffusers(models, model, scheduler, size, guidance, prompts, negative, batch):
    c = models[model]
    request = GenerationRequest(prompts, negative, steps=4, guidance=guidance, scheduler=scheduler, seed=7,
                                height=size[0], width=size[1], batch=batch)
    ours, _ = run_both(c, make_backend("eager", components=c), request, EAGER_DB)
    assert len(ours.timings["unet_ms"]) == (5 if scheduler == "pndm" else 4)  # PLMS repeats its second step
    assert ours.latents.shape == (len(prompts) * batch, 4, size[0] // 8, size[1] // 8)


@pytest.mark.parametrize("model,scheduler,guidance", [("tiny", "pndm", 7.5), ("tiny", "euler-a", 1.0),
                                                       ("tiny", "ddim", 7.5), ("tiny-sdxl", "euler", 5.0)])
def test_img2img_matches_diffusers(models, init_image, model, scheduler, guidance):
    c = models[model]
    request = GenerationRequest("a photo", steps=5, guidance=guidance, scheduler=scheduler, seed=3, batch=2,
                                init_image=init_image, strength=0.6)
    ours, _ = run_both(c, make_backend("eager", components=c), request, EAGER_DB)
    assert ours.pixels.shape == (2, 64, 96, 3)  # the init image's size
    # int(5 * 0.6) = 3 steps kept; PLMS repeats its first kept step
    assert len(ours.timings["unet_ms"]) == (4 if scheduler == "pndm" else 3) and ours.timings["vae_encode_ms"] > 0


class CountingBackend:
    """Wraps a backend and records the UNet's batch sizes."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []
        self.device, self.dtype, self.name = inner.device, inner.dtype, inner.name

    def unet(self, sample, *args, **kw):
        self.batches.append(sample.shape[0])
        return self.inner.unet(sample, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("guidance,rows", [(1.0, 3), (0.0, 3), (1.01, 6), (7.5, 6)])
def test_guidance_at_most_one_skips_the_unconditional_half(models, guidance, rows):
    c = models["tiny"]
    backend = CountingBackend(make_backend("eager", components=c))
    Pipeline.from_components(c, backend).generate(
        GenerationRequest("a photo", steps=2, guidance=guidance, scheduler="ddim", batch=3))
    assert backend.batches == [rows, rows]


class LoopBackend(CountingBackend):
    """A backend with the optional `denoise` verb: it runs the whole loop itself (as the torch backend does)."""

    def denoise(self, latents, embeds, sched, guidance, text_embeds=None, time_ids=None, noise=None):
        from sdrt.loop import denoise_loop

        self.noise = noise
        return denoise_loop(lambda i, *a: self.unet(*a), latents, embeds, sched, guidance, text_embeds, time_ids,
                            noise)


@pytest.mark.parametrize("scheduler,guidance", [("euler-a", 7.5), ("lcm", 1.0), ("dpmpp-2m", 7.5)])
def test_a_backend_that_runs_the_loop_itself_gets_the_same_noise(models, scheduler, guidance):
    c = models["tiny"]
    eager = make_backend("eager", components=c)
    request = GenerationRequest(("a photo", "a cat"), steps=3, guidance=guidance, scheduler=scheduler, seed=4)
    looped = LoopBackend(eager)
    a = Pipeline.from_components(c, eager).generate(request)
    b = Pipeline.from_components(c, looped).generate(request)
    assert torch.equal(a.latents, b.latents) and len(b.timings["unet_ms"]) == 3
    assert (looped.noise is None) == (scheduler == "dpmpp-2m")


def test_same_seed_same_image_other_seed_other_image(models):
    c = models["tiny"]
    pipe = Pipeline.from_components(c, make_backend("eager", components=c))
    a, b, d = (pipe.generate(GenerationRequest("a photo", steps=2, seed=s)).images for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, d)


def test_long_prompt_is_truncated_like_diffusers_with_a_warning_naming_the_dropped_text(models):
    c = models["tiny"]
    pipe = Pipeline.from_components(c, make_backend("eager", components=c))
    prompt = " ".join(["cat"] * 80) + " zebra stripes"
    warnings = []
    ids = pipe.tokenize(0, [prompt], warnings)
    assert ids.shape == (1, 77) and ids[0, -1] == c.tokenizers[0].eos_token_id
    assert len(warnings) == 1 and "zebra stripes" in warnings[0]
    ours = pipe.generate(GenerationRequest(prompt, steps=2, scheduler="ddim"))
    assert ours.warnings == warnings
    assert psnr(reference(c, ours.request), ours.pixels) >= EAGER_DB


def test_defaults_come_from_the_model(models):
    c = models["tiny-sdxl"]
    r = Pipeline.from_components(c, make_backend("eager", components=c)).resolve(GenerationRequest("x"))
    assert (r.steps, r.guidance, r.scheduler, r.height, r.width) == (10, 5.0, "euler", 64, 64)


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps"), ("guidance", float("nan"), "guidance"), ("guidance", float("inf"), "guidance"),
    ("scheduler", "heun", "unknown scheduler"), ("height", 60, "multiple of 8"), ("width", 8192, "width"),
    ("height", 32, "height"), ("batch", 0, "batch"), ("seed", -1, "seed"), ("prompt", (), "prompt"),
    ("negative_prompt", ("a", "b"), "negative prompts"),
])
def test_bad_requests_are_one_line_errors(models, field, value, match):
    c = models["tiny"]
    pipe = Pipeline.from_components(c, make_backend("eager", components=c))
    with pytest.raises(SdrtError, match=match):
        pipe.generate(GenerationRequest(**{"prompt": "a photo", field: value}))


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.1])
def test_img2img_strength_outside_0_1_is_an_error(models, init_image, strength):
    c = models["tiny"]
    pipe = Pipeline.from_components(c, make_backend("eager", components=c))
    with pytest.raises(SdrtError, match="strength"):
        pipe.generate(GenerationRequest("a photo", init_image=init_image, strength=strength))


# --- ONNX Runtime: the exporter's graphs, same comparisons, same bar -------------------------------------------
@pytest.fixture(scope="module")
def onnx_dirs(models, tmp_path_factory):
    from sdrt.export.onnx_export import export_model

    root = tmp_path_factory.mktemp("onnx")
    for name in ("tiny", "tiny-sdxl"):
        export_model(models[name], root / name, progress=False)
    return root


@pytest.mark.parametrize("model,scheduler,guidance,img2img", [
    ("tiny", "pndm", 7.5, False), ("tiny", "euler-a", 1.0, True), ("tiny-sdxl", "euler", 5.0, False),
    ("tiny-sdxl", "euler", 5.0, True)])
def test_onnxruntime_matches_diffusers(models, onnx_dirs, init_image, model, scheduler, guidance, img2img):
    c = models[model]
    backend = make_backend("onnxruntime", onnx_dir=onnx_dirs / model)
    request = GenerationRequest(("a photo", "a cat"), steps=4, guidance=guidance, scheduler=scheduler, seed=11,
                                height=64, width=96, batch=1, init_image=init_image if img2img else None, strength=0.75)
    run_both(c, backend, request, ORT_DB)
