"""TensorRT optimization profiles as data: parse `--profile`, derive per-component shapes, pick a profile per call.

A TensorRT engine with dynamic inputs needs one or more optimization profiles: for every input a min, opt and
max shape. Kernels are tuned for `opt`; any shape inside [min, max] runs. Several resolution buckets on one engine
are several profiles (one per `--profile`), and the runtime picks, for each call, a profile that contains it.

Profile syntax (one `--profile` per resolution bucket):

    HxW[@B]          each of H, W, B is  N  |  MIN-MAX  (opt = MIN)  |  MIN-OPT-MAX;  B defaults to 1
    512x512@1        one static shape (fastest kernels)
    768x1024@1-4     768x1024 images, batch 1 to 4, tuned for 1
    512-768-1024x512-768-1024@1-2-4    any size from 512 to 1024, tuned for 768x768 at batch 2

Image sizes are pixels and must be multiples of 8 (the VAE downsamples by 8). From a bucket, every component's
inputs follow (k = 2 with classifier-free guidance, which runs the UNet on [uncond; cond]):

    component      batch (min, opt, max)       spatial
    text_encoder   (b_min, b_opt, k*b_max)     - (77 tokens, static)
    unet           (b_min, k*b_opt, k*b_max)   latent = image / 8
    vae_decoder    (b_min, b_opt, b_max)       latent = image / 8
    vae_encoder    (b_min, b_opt, b_max)       image

The text encoder and UNet keep `b_min` as their min so one engine also serves guidance-free requests (sd-turbo,
guidance <= 1) and pipelines that encode the prompt and the negative prompt in separate calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdrt.errors import SdrtError

VAE_FACTOR = 8  # pixels per latent cell


@dataclass(frozen=True)
class Span:
    """One dimension's range: TensorRT tunes for `opt`, accepts anything in [min, max]."""
    min: int
    opt: int
    max: int

    def contains(self, n: int) -> bool:
        return self.min <= n <= self.max

    def __str__(self) -> str:
        if self.min == self.opt == self.max:
            return str(self.min)
        return f"{self.min}-{self.max}" if self.opt == self.min else f"{self.min}-{self.opt}-{self.max}"


@dataclass(frozen=True)
class ProfileSpec:
    """One resolution bucket as the user wrote it (`--profile`), in pixels and prompts."""
    height: Span
    width: Span
    batch: Span

    def __str__(self) -> str:
        return f"{self.height}x{self.width}@{self.batch}"

    def contains(self, height: int, width: int, batch: int) -> bool:
        return self.height.contains(height) and self.width.contains(width) and self.batch.contains(batch)


@dataclass(frozen=True)
class InputRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max))

    def to_json(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, d: dict) -> InputRange:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class ComponentProfile:
    """One TensorRT optimization profile of one component: min/opt/max per input name."""
    name: str                          # the bucket(s) it serves, e.g. "512x512@1-4"
    inputs: dict[str, InputRange]

    def contains(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        return all(n in self.inputs and self.inputs[n].contains(tuple(s)) for n, s in shapes.items())

    def distance(self, shapes: dict[str, tuple[int, ...]]) -> float:
        """Sum of relative distances to `opt`: batch 1 vs 2 weighs like latent 64 vs 128."""
        return sum(abs(s - o) / o for n, shape in shapes.items() for s, o in zip(shape, self.inputs[n].opt))

    def to_json(self) -> dict:
        return {"name": self.name, "inputs": {n: r.to_json() for n, r in self.inputs.items()}}

    @classmethod
    def from_json(cls, d: dict) -> ComponentProfile:
        return cls(d["name"], {n: InputRange.from_json(r) for n, r in d["inputs"].items()})


_SPAN = r"(\d+(?:-\d+){0,2})"
_PROFILE = re.compile(rf"^{_SPAN}x{_SPAN}(?:@{_SPAN})?$")
PROFILE_SYNTAX = "HxW[@B], each N, MIN-MAX or MIN-OPT-MAX (e.g. 512x512@1, 768x1024@1-4)"


def _span(text: str, what: str, profile: str) -> Span:
    v = [int(x) for x in text.split("-")]
    lo, opt, hi = (v[0], v[0], v[0]) if len(v) == 1 else (v[0], v[0], v[1]) if len(v) == 2 else tuple(v)
    if not 1 <= lo <= opt <= hi:
        raise SdrtError(f"--profile {profile}: {what} {text} must satisfy 1 <= MIN <= OPT <= MAX")
    return Span(lo, opt, hi)


def parse_profile(text: str) -> ProfileSpec:
    m = _PROFILE.match(text.strip().lower())
    if not m:
        raise SdrtError(f"--profile {text!r}: expected {PROFILE_SYNTAX}")
    h, w = _span(m[1], "height", text), _span(m[2], "width", text)
    b = _span(m[3] or "1", "batch", text)
    bad = [v for s in (h, w) for v in (s.min, s.opt, s.max) if v % VAE_FACTOR]
    if bad:
        raise SdrtError(f"--profile {text}: image sizes must be multiples of {VAE_FACTOR} (the VAE downsamples by "
                        f"{VAE_FACTOR}); {bad[0]} is not")
    return ProfileSpec(h, w, b)


def parse_profiles(texts: list[str] | None, default_size: int) -> tuple[ProfileSpec, ...]:
    """No `--profile`: the model's default size, batch 1 to 4."""
    specs = [parse_profile(t) for t in texts] if texts else [parse_profile(f"{default_size}x{default_size}@1-4")]
    return tuple(dict.fromkeys(specs))  # a repeated bucket would only be a duplicate profile


def component_batch(component: str, batch: Span, cfg: bool) -> Span:
    k = 2 if cfg else 1
    if component.startswith("text_encoder"):
        return Span(batch.min, batch.opt, k * batch.max)
    if component == "unet":
        return Span(batch.min, k * batch.opt, k * batch.max)
    return batch


def _dim_span(dim: int | str, component: str, tensor: str, spec: ProfileSpec, cfg: bool) -> Span:
    if isinstance(dim, int):
        return Span(dim, dim, dim)
    if dim == "batch" or dim.startswith("batch"):
        return component_batch(component, spec.batch, cfg)
    if "height" in dim or "width" in dim:
        s = spec.height if "height" in dim else spec.width
        # By the contract's fixed I/O names, `image` (the VAE encoder's input) is the only pixel-space input;
        # every other spatial input (sample, latent) is latent, whatever its axes are called.
        return s if tensor == "image" else Span(s.min // VAE_FACTOR, s.opt // VAE_FACTOR, s.max // VAE_FACTOR)
    raise SdrtError(f"{component}.{tensor}: dynamic axis {dim!r} is not one sdrt build knows (batch, height, width, "
                    "latent_height, latent_width); re-export with `sdrt export`")


def derive_profile(component: str, inputs: list[dict], spec: ProfileSpec, cfg: bool) -> ComponentProfile:
    """One bucket -> min/opt/max of every input of one component; `inputs` as in the ONNX manifest."""
    ranges = {}
    for inp in inputs:
        spans = [_dim_span(d, component, inp["name"], spec, cfg) for d in inp["shape"]]
        ranges[inp["name"]] = InputRange(tuple(s.min for s in spans), tuple(s.opt for s in spans),
                                         tuple(s.max for s in spans))
    return ComponentProfile(str(spec), ranges)


def component_profiles(component: str, inputs: list[dict], specs: tuple[ProfileSpec, ...],
                       cfg: bool) -> list[ComponentProfile]:
    """One profile per bucket; buckets that give a component the same shapes (text encoders ignore the image
    size) share one profile, named after all of them."""
    merged: dict[tuple, ComponentProfile] = {}
    for spec in specs:
        p = derive_profile(component, inputs, spec, cfg)
        sig = tuple((n, r.min, r.opt, r.max) for n, r in sorted(p.inputs.items()))
        if sig in merged:
            if p.name not in merged[sig].name.split("|"):
                merged[sig] = ComponentProfile(f"{merged[sig].name}|{p.name}", p.inputs)
        else:
            merged[sig] = p
    return list(merged.values())


def describe_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items())


def select_profile(component: str, profiles: list[ComponentProfile], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the profile that contains every input shape; of several, the one whose opt is closest (tuned
    kernels), the first on a tie. None: an error naming the profiles, so the user knows what to rebuild."""
    fits = [i for i, p in enumerate(profiles) if p.contains(shapes)]
    if not fits:
        names = ", ".join(p.name for p in profiles) or "none"
        raise SdrtError(f"{component}: {describe_shapes(shapes)} fits none of the engine's profiles ({names}); "
                        "rebuild with a matching `sdrt build --profile HxW@B`")
    return min(fits, key=lambda i: (profiles[i].distance(shapes), i))


def bucket_for(specs: list[ProfileSpec], height: int, width: int, batch: int) -> ProfileSpec:
    """The resolution bucket that serves a request (same rule as select_profile, in pixels and prompts)."""
    fits = [s for s in specs if s.contains(height, width, batch)]
    if not fits:
        names = ", ".join(str(s) for s in specs) or "none"
        raise SdrtError(f"{height}x{width} at batch {batch} is outside every engine profile ({names}); "
                        f"rebuild with `sdrt build --profile {height}x{width}@{batch}`")
    return min(fits, key=lambda s: abs(height - s.height.opt) / s.height.opt + abs(width - s.width.opt) / s.width.opt
               + abs(batch - s.batch.opt) / s.batch.opt)
