"""The slim pipeline: prompts -> text encoder(s) -> scheduler loop over the UNet -> VAE decoder -> images.

It follows diffusers' StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and StableDiffusionXLPipeline step for
step, without them, so a seed gives the same image as diffusers on the same weights:
  * classifier-free guidance runs the UNet on one batch of 2N rows [uncond; cond] and is off when guidance <= 1
    (`do_classifier_free_guidance = guidance_scale > 1`); N = len(prompts) * batch, prompt-major.
  * every random draw comes from one CPU generator `torch.Generator("cpu").manual_seed(seed)`, float32, in
    diffusers' order: img2img's VAE sample, then the initial latent noise, then each step's noise (euler-a, lcm).
  * SD 1.x/2.x condition on the text encoder's last hidden state; SDXL on both encoders' penultimate hidden states
    concatenated, plus the second encoder's projected pooled output and the six micro-conditioning time ids
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w). SDXL's unconditional half is zeros when no negative
    prompt is given (`force_zeros_for_empty_prompt`, True for SDXL base; "" is a given, encoded, negative prompt).
The backend (sdrt.backends) runs the four networks; this file owns tokenization, guidance, noise and the scheduler.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from sdrt import schedulers
from sdrt.errors import SdrtError
from sdrt.models import check_seed
from sdrt.specs import Family

MIN_SIZE, MAX_SIZE = 64, 4096  # pixels per side, unless the backend says otherwise (min_size, max_size)
MAX_BATCH = 64  # images per prompt and call: with guidance a UNet batch of 128, already past any GPU's memory at 1024^2


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | tuple[str, ...] = ""              # one prompt or several; "" is unconditional
    negative_prompt: str | tuple[str, ...] | None = None  # one for all prompts, or one per prompt
    steps: int | None = None                         # None: the model's default
    guidance: float | None = None                    # classifier-free guidance scale; <= 1 turns it off
    scheduler: str | None = None                     # a name in sdrt.schedulers.SCHEDULERS
    seed: int = 0
    height: int | None = None                        # None: the init image's size, else the model's default
    width: int | None = None
    batch: int = 1                                   # images per prompt (diffusers' num_images_per_prompt)
    init_image: object = None                        # PIL image: img2img
    strength: float = 0.8                            # img2img: the fraction of the schedule that is run

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


@dataclass
class GenerationResult:
    pixels: np.ndarray        # (N, H, W, 3) float32 in [0, 1], what diffusers returns for output_type="np"
    latents: torch.Tensor     # (N, 4, H/8, W/8) the final latents, before / vae_scale
    timings: dict             # ms: text_encoder_ms, vae_encode_ms, unet_ms (one per step), vae_decode_ms, total_ms
    request: GenerationRequest  # with every default filled in
    warnings: list[str] = field(default_factory=list)

    @property
    def images(self) -> np.ndarray:
        """(N, H, W, 3) uint8, rounded as diffusers' numpy_to_pil does."""
        return (self.pixels * 255).round().astype(np.uint8)

    def pil(self) -> list:
        from PIL import Image

        return [Image.fromarray(im) for im in self.images]


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a model besides its networks."""

    name: str
    family: Family
    source_hash: str
    scheduler_config: dict
    vae_scale: float
    default_size: int
    defaults: dict                     # steps, guidance, scheduler
    latent_channels: int = 4
    force_zeros_for_empty_prompt: bool = True  # SDXL only (diffusers' pipeline config; True for SDXL base)

    @classmethod
    def from_components(cls, c) -> ModelInfo:
        return cls(c.name, c.family, c.source_hash, dict(c.scheduler_config), c.vae_scale, c.default_size,
                   dict(c.defaults), int(c.unet.config.in_channels), _force_zeros(c))


def _force_zeros(c) -> bool:
    """A diffusers folder may turn SDXL's zeroed negative off in model_index.json; presets keep diffusers' True."""
    import json
    from pathlib import Path

    index = Path(c.source) / "model_index.json"
    if index.is_file():
        return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
    return True


class Pipeline:
    def __init__(self, info: ModelInfo, tokenizers: list, backend):
        self.info, self.tokenizers, self.backend = info, tokenizers, backend

    @classmethod
    def from_components(cls, components, backend) -> Pipeline:
        return cls(ModelInfo.from_components(components), list(components.tokenizers), backend)

    def resolve(self, r: GenerationRequest) -> GenerationRequest:
        """Fill in the model's defaults and the size, then check every field against this backend's sizes."""
        d = self.info.defaults
        r = replace(r, steps=d.get("steps", 30) if r.steps is None else r.steps,
                    guidance=d.get("guidance", 7.5) if r.guidance is None else r.guidance,
                    scheduler=d.get("scheduler", "pndm") if r.scheduler is None else r.scheduler)
        m = getattr(self.backend, "size_multiple", 8)
        lo, hi = getattr(self.backend, "min_size", MIN_SIZE), getattr(self.backend, "max_size", MAX_SIZE)
        if r.init_image is not None:  # diffusers' VaeImageProcessor: the image's size, rounded down to a multiple
            w, h = r.init_image.size
            taken = {"height": max(h // m * m, m), "width": max(w // m * m, m)}
            taken = {k: v for k, v in taken.items() if getattr(r, k) is None}  # the sides it decides
            if any(not lo <= v <= hi for v in taken.values()):
                raise SdrtError(f"the init image is {w}x{h} pixels, outside [{lo}, {hi}] per side (at a multiple "
                                f"of {m}): give a height and width to resize it to")
            r = replace(r, **taken)
        r = replace(r, height=r.height or self.info.default_size, width=r.width or self.info.default_size)
        check_request(r, m, lo, hi)
        if hasattr(self.backend, "check_size"):  # engines built for shape ranges (TensorRT's profiles)
            self.backend.check_size(r.height, r.width, len(r.prompts) * r.batch, guided=r.guidance > 1.0)
        return r

    def generate(self, request: GenerationRequest, progress=None) -> GenerationResult:
        """Run one request. progress(i, total) is called after each denoising step."""
        t_start = time.perf_counter()
        r = self.resolve(request)
        img2img = r.init_image is not None
        sched = schedulers.make_schedule(r.scheduler, self.info.scheduler_config, r.steps,
                                         strength=float(r.strength) if img2img else 1.0)
        device = self.backend.device
        sched = sched.to(device)
        cfg = r.guidance > 1.0  # diffusers' do_classifier_free_guidance
        n = len(r.prompts) * r.batch
        warnings: list[str] = []
        timings = {"text_encoder_ms": 0.0, "vae_encode_ms": 0.0, "unet_ms": [], "vae_decode_ms": 0.0}

        t = time.perf_counter()
        embeds, pooled = self.encode(r, cfg, warnings)  # (2N or N, 77, C), (2N or N, P) or None
        time_ids = None
        if self.info.family is Family.SDXL:  # original size, crop top-left, target size: all the requested size
            time_ids = torch.tensor([[r.height, r.width, 0, 0, r.height, r.width]], dtype=torch.float32)
            time_ids = time_ids.repeat(embeds.shape[0], 1).to(device)
        timings["text_encoder_ms"] = _ms(t, device)

        generator = torch.Generator("cpu").manual_seed(r.seed)
        shape = (n, self.info.latent_channels, r.height // 8, r.width // 8)
        if img2img:
            t = time.perf_counter()
            x0 = self.encode_image(r.init_image, r.height, r.width, generator)  # (1, 4, h, w), scaled
            timings["vae_encode_ms"] = _ms(t, device)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
            latents = schedulers.add_noise(sched, torch.cat([x0] * n), noise, 0)
        else:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device) * sched.init_noise_sigma

        t_loop = time.perf_counter()
        if hasattr(self.backend, "denoise"):
            latents = self.denoise(sched, latents, embeds, pooled, time_ids, r.guidance, generator, progress)
            timings["unet_ms"] = [_ms(t_loop, device) / sched.num_steps] * sched.num_steps  # the loop, not the UNet
        else:
            latents = self.loop(sched, latents, embeds, pooled, time_ids, r.guidance, generator, progress,
                                timings["unet_ms"])
        timings["denoise_ms"] = _ms(t_loop, device)

        t = time.perf_counter()
        image = self.backend.vae_decoder(latents / self.info.vae_scale).float()  # (N, 3, H, W) in [-1, 1]
        pixels = (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        timings["vae_decode_ms"] = _ms(t, device)
        timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
        return GenerationResult(pixels, latents.cpu(), timings, r, warnings)

    def loop(self, sched, latents, embeds, pooled, time_ids, guidance, generator, progress, unet_ms: list):
        """The scheduler loop over the backend's UNet verb (what sdrt.loop.denoise_loop does on the device, plus
        per-step noise drawn in diffusers' order, per-step UNet timings and progress)."""
        device, cfg = self.backend.device, embeds.shape[0] == 2 * latents.shape[0]
        state = schedulers.init_state(sched, latents)
        stochastic = any(sched.draws_noise)
        for i in range(sched.num_steps):
            x_in = schedulers.scale_input(sched, torch.cat([latents] * 2) if cfg else latents, i)
            timestep = sched.timesteps[i].to(torch.float32).expand(x_in.shape[0])  # (B,) as the ONNX contract
            t = time.perf_counter()
            pred = self.backend.unet(x_in, timestep, embeds, pooled, time_ids).float()
            unet_ms.append(_ms(t, device))
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance * (cond - uncond)
            z = None
            if sched.draws_noise[i]:  # drawn after the UNet, as diffusers' step does
                z = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device)
            elif stochastic:  # step() wants noise at every step of a stochastic schedule; its weight here is 0
                z = torch.zeros_like(latents)
            latents, state = schedulers.step(sched, i, pred, latents, state, z)
            if progress is not None:
                progress(i, sched.num_steps)
        return latents

    def denoise(self, sched, latents, embeds, pooled, time_ids, guidance, generator, progress):
        """Hand the whole loop to a backend that runs it itself. Nothing else draws from the generator during the
        loop, so drawing every step's noise up front gives the same numbers in the same order."""
        noise = None
        if any(sched.draws_noise):  # (S, N, 4, h, w), zeros where diffusers draws nothing
            noise = torch.stack([torch.randn(latents.shape, generator=generator, dtype=torch.float32) if d
                                 else torch.zeros(latents.shape) for d in sched.draws_noise])
        latents = self.backend.denoise(latents, embeds, sched, guidance, pooled, time_ids, noise)
        if progress is not None:
            for i in range(sched.num_steps):
                progress(i, sched.num_steps)
        return latents.float()

    def encode(self, r: GenerationRequest, cfg: bool, warnings: list) -> tuple:
        """Text conditioning for the UNet: (embeds, pooled); rows [uncond; cond] when cfg, each prompt repeated
        r.batch times in a row (diffusers' repeat(1, n, 1).view(...))."""
        prompts = r.prompts
        neg = r.negative_prompt
        negatives = [neg] * len(prompts) if isinstance(neg, str) else list(neg) if neg is not None else None
        sdxl = self.info.family is Family.SDXL
        zero_uncond = sdxl and neg is None and self.info.force_zeros_for_empty_prompt
        if cfg and not zero_uncond:
            texts = (negatives or [""] * len(prompts)) + prompts  # one text-encoder batch for both halves
        else:
            texts = prompts
        if sdxl:
            outs = [self.backend.text_encoder(k, self.tokenize(k, texts, warnings)) for k in range(2)]
            embeds = torch.cat([o["penultimate_hidden_state"] for o in outs], dim=-1).float()
            pooled = outs[1]["pooled_output"].float()
        else:
            embeds = self.backend.text_encoder(0, self.tokenize(0, texts, warnings))["last_hidden_state"].float()
            pooled = None
        embeds = embeds.repeat_interleave(r.batch, dim=0)
        pooled = pooled.repeat_interleave(r.batch, dim=0) if pooled is not None else None
        if cfg and zero_uncond:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        return embeds, pooled

    def tokenize(self, index: int, texts: list[str], warnings: list) -> torch.Tensor:
        """(len(texts), 77) int64 ids, padded and truncated as CLIP was trained; truncation is reported."""
        tok = self.tokenizers[index]
        limit = tok.model_max_length
        ids = tok(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
        if index == 0:  # both SDXL tokenizers share the vocabulary: report once
            for text in dict.fromkeys(texts):
                full = tok(text).input_ids
                if len(full) > limit:  # what fell off between the last kept token and <|endoftext|>
                    dropped = tok.decode(full[limit - 1:-1])
                    warnings.append(f"prompt longer than {limit} tokens was truncated; dropped: {dropped!r}")
        return ids.to(torch.int64)

    def encode_image(self, image, height: int, width: int, generator) -> torch.Tensor:
        """img2img's starting latent (1, 4, h, w): VAE moments sampled as DiagonalGaussianDistribution.sample,
        times vae_scale."""
        x = preprocess(image, height, width).to(self.backend.device)  # (1, 3, H, W) in [-1, 1]
        moments = self.backend.vae_encoder(x).float()
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        sample = mean + std * torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        return self.info.vae_scale * sample


def check_request(r: GenerationRequest, size_multiple: int = 8, min_size: int = 8, max_size: int = MAX_SIZE):
    """Every field that is set (None means "the model's default" and passes); bad input is a one-line SdrtError.
    The CLI calls this before loading anything, the pipeline again with its backend's size limits."""
    if not r.prompts or not all(isinstance(p, str) for p in r.prompts):
        raise SdrtError("prompt must be a string or a non-empty list of strings")
    neg = r.negative_prompt
    negs = [] if neg is None else [neg] if isinstance(neg, str) else neg
    if not isinstance(negs, (list, tuple)) or not all(isinstance(n, str) for n in negs):
        raise SdrtError("negative prompt must be a string or a list of strings")
    if neg is not None and not isinstance(neg, str) and len(negs) != len(r.prompts):
        raise SdrtError(f"{len(negs)} negative prompts for {len(r.prompts)} prompts: give one, or one per prompt")
    for what, text in [("prompt", t) for t in r.prompts] + [("negative prompt", t) for t in negs]:
        try:  # bytes a terminal could not decode arrive as lone surrogates, which no tokenizer takes
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise SdrtError(f"{what} {text!r} is not valid UTF-8 text") from None
    if r.steps is not None and (not isinstance(r.steps, int) or r.steps < 1):
        raise SdrtError(f"steps must be an integer >= 1, got {r.steps!r}")
    if r.guidance is not None and not math.isfinite(float(r.guidance)):
        raise SdrtError(f"guidance must be a finite number, got {r.guidance}")
    if r.scheduler is not None and r.scheduler not in schedulers.SCHEDULERS:
        raise SdrtError(f"unknown scheduler {r.scheduler!r}; choose one of: {', '.join(schedulers.SCHEDULERS)}")
    if not isinstance(r.batch, int) or not 1 <= r.batch <= MAX_BATCH:
        raise SdrtError(f"batch must be an integer in [1, {MAX_BATCH}], got {r.batch!r}")
    check_seed(r.seed)
    if r.init_image is not None and not 0.0 < float(r.strength) <= 1.0:
        raise SdrtError(f"strength must be in (0, 1], got {r.strength}")
    for side in ("height", "width"):
        v = getattr(r, side)
        if v is not None and (not isinstance(v, int) or v % size_multiple or not min_size <= v <= max_size):
            raise SdrtError(f"{side} must be a multiple of {size_multiple} in [{min_size}, {max_size}], got {v!r}")


def preprocess(image, height: int, width: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1], resized with Lanczos as diffusers' VaeImageProcessor does."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0


def _ms(t0: float, device) -> float:
    if device.type == "cuda":  # kernels are asynchronous: wait for them so the stage gets its own time
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3
