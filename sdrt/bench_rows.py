"""`sdrt bench` rows: a row name becomes a live runtime (four backend verbs + a generate function) and the clocks.

A row is `NAME[:PRECISION]`: an sdrt backend (`eager`, `onnxruntime:int8`, `openvino`, `tensorrt:fp16`, ...) or a
peer that is not sdrt's own code path:
  diffusers      diffusers' own StableDiffusion[XL]Pipeline on the same weights: the eager row's twin
  torch.compile  the eager backend with its modules under torch.compile (inductor)
A bare NAME runs the backend's default precision (fp32; torch on CUDA: fp16; OpenVINO's own default, bf16 on an
AVX512-BF16 CPU; tensorrt: the engines').
"""

from __future__ import annotations

import ctypes
import gc
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdrt.errors import SdrtError

PEERS = ("diffusers", "torch.compile")
ONNX_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
# sdrt scheduler name -> the diffusers class and the options sdrt fixes for it (sdrt.schedulers._FORCED).
DIFFUSERS_SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
                        "euler": ("EulerDiscreteScheduler", {}), "euler-a": ("EulerAncestralDiscreteScheduler", {}),
                        "dpmpp-2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
                        "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
                        "lcm": ("LCMScheduler", {})}


@dataclass(frozen=True)
class RowSpec:
    name: str             # as asked on the command line
    kind: str             # a Backend value or a peer name
    precision: str | None  # None: the backend's own default (the row reports what that was)


def parse_row(name: str) -> RowSpec:
    """An unknown name or precision is an SdrtError, which run_bench raises before anything runs: a typo is not a
    skipped row. A known row that cannot run here (no TensorRT, no CUDA, a missing library) fails in setup_row."""
    from sdrt.backends import Backend, Precision, parse_spec

    kind, _, prec = name.strip().lower().partition(":")
    kinds = [b.value for b in Backend] + list(PEERS)
    if kind not in kinds and kind != "auto":  # auto: parse_spec's alias for the fastest backend here
        raise SdrtError(f"unknown backend {kind!r} in --backends (choose from {', '.join(kinds)})")
    precisions = [p.value for p in Precision]
    if prec and prec not in precisions:
        raise SdrtError(f"unknown precision {prec!r} in --backends {name!r} (choose from {', '.join(precisions)})")
    if kind in PEERS:
        if prec == "int8":  # they cast PyTorch modules: int8 would run fp16 under an int8 label
            raise SdrtError(f"{name!r}: the {kind} peer runs fp32, fp16 or bf16")
        return RowSpec(name, kind, prec or "fp32")
    spec = parse_spec(name)
    return RowSpec(name, spec.backend.value, spec.precision.value if spec.precision else None)


def is_reference(spec: RowSpec) -> bool:
    """eager at fp32 (its default): the row every other row is compared to."""
    return spec.kind == "eager" and spec.precision in (None, "fp32")


@dataclass
class LiveRow:
    """A row that is set up: the stage benchmark calls `backend`'s verbs, the end-to-end one calls `generate`."""

    spec: RowSpec
    backend: object
    generate: object          # GenerationRequest -> result with .pixels, .latents, .timings
    device: torch.device
    precision: str
    cold_s: dict = field(default_factory=dict)  # load, export, build, warmup (seconds; None: not this row's cost)
    notes: list = field(default_factory=list)
    inputs: object = None                        # StageInputs on this row's device
    samples: dict = field(default_factory=dict)  # ms lists, one entry per round
    result: dict = field(default_factory=dict)   # the row's line in the report, filled as it runs


# ---- stage inputs: what the pipeline feeds each network, at the CFG batch, identical for every row ----------------

@dataclass
class StageInputs:
    input_ids: list           # per text encoder: (P, 77) int64; P = 2, [negative; prompt], with CFG (SDXL: 1)
    sample: torch.Tensor      # (2B, 4, h, w) float32
    timestep: torch.Tensor    # (2B,) float32
    encoder_hidden_states: torch.Tensor  # (2B, 77, C)
    text_embeds: torch.Tensor | None     # SDXL: (2B, P2) pooled text embeds
    time_ids: torch.Tensor | None        # SDXL: (2B, 6)
    latent: torch.Tensor      # (B, 4, h, w): the VAE decoder's input

    def to(self, device) -> StageInputs:
        move = (lambda t: None if t is None else t.to(device))
        return StageInputs([ids.to(device) for ids in self.input_ids], *(move(getattr(self, k)) for k in
                           ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "latent")))


def stage_inputs(components, batch: int, height: int, width: int, prompt: str, cfg: bool = True,
                 seed: int = 0) -> StageInputs:
    """Seeded inputs with the shapes the pipeline uses (values do not change the timings of dense networks)."""
    from sdrt.specs import Family

    g = torch.Generator("cpu").manual_seed(seed)
    # SDXL's unconditional half is zeros when no negative prompt is given: only the prompt is encoded (pipeline.py).
    texts = ["", prompt] if cfg and components.family is not Family.SDXL else [prompt]
    ids = [tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(torch.int64) for tok in components.tokenizers]
    cfgu = components.unet.config
    n, lh, lw = (2 if cfg else 1) * batch, height // 8, width // 8
    sdxl = getattr(cfgu, "addition_embed_type", None) == "text_time"
    pooled = cfgu.projection_class_embeddings_input_dim - 6 * cfgu.addition_time_embed_dim if sdxl else 0
    return StageInputs(
        ids, torch.randn(n, cfgu.in_channels, lh, lw, generator=g), torch.tensor(500.0).expand(n),  # as generate()
        torch.randn(n, ids[0].shape[1], cfgu.cross_attention_dim, generator=g),
        torch.randn(n, pooled, generator=g) if sdxl else None,
        torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(n, 1) if sdxl else None,
        torch.randn(batch, cfgu.in_channels, lh, lw, generator=g))


def sync(device) -> None:
    if device.type == "cuda":  # kernels are asynchronous: wait so each stage gets its own time
        torch.cuda.synchronize(device)


def time_stages(backend, x: StageInputs, device) -> dict[str, float]:
    """One sample of each stage, in ms. SDXL's text encoder time is both encoders together."""
    def clock(fn) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return (time.perf_counter() - t) * 1e3

    te = sum(clock(lambda i=i, ids=ids: backend.text_encoder(i, ids)) for i, ids in enumerate(x.input_ids))
    unet = clock(lambda: backend.unet(x.sample, x.timestep, x.encoder_hidden_states, x.text_embeds, x.time_ids))
    vae = clock(lambda: backend.vae_decoder(x.latent))
    return {"text_encoder_ms": te, "unet_step_ms": unet, "vae_decode_ms": vae}


def unet_flops(backend, x: StageInputs) -> int:
    """FLOPs of one UNet step at the CFG batch (2 per multiply-add: convolutions, matmuls, attention), counted by
    torch's FlopCounterMode over an eager backend's call; the physics behind every row's achieved TFLOP/s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The counter has no formula for the fused CPU attention kernels; the math path is plain matmuls it counts.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        backend.unet(x.sample, x.timestep, x.encoder_hidden_states, x.text_embeds, x.time_ids)
    return int(counter.get_total_flops())


# ---- memory: the peak a row adds to this process (RSS on CPU, allocated bytes on CUDA) ----------------------------

def _status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def release_memory() -> None:
    """Return freed memory to the OS so the next row's RSS baseline is what is really still held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is a bit high, the peak still right
        pass


class PeakMemory:
    """`with PeakMemory(device) as m:` -> m.rss_mb: peak RSS above the RSS at entry (the high-water mark is reset
    through /proc/self/clear_refs, or sampled every 10 ms where that is refused); m.cuda_mb: peak CUDA allocation
    above the allocation at entry (interleaved rows keep the earlier rows' weights on the GPU); m.device_mb: GPU
    memory in use device-wide at exit above that at entry (cudaMemGetInfo), which sees what torch's allocator does
    not: ONNX Runtime's CUDA arena, TensorRT's engine weights, torch's cached blocks. MiB, 2^20 bytes."""

    def __init__(self, device):
        self.device, self.rss_mb, self.held_mb, self.cuda_mb, self._peak, self._stop = device, None, None, None, 0, None
        self.device_mb = None

    def __enter__(self):
        release_memory()
        self.start = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        except OSError:
            self._stop = threading.Event()
            threading.Thread(target=self._sample, daemon=True).start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_start = torch.cuda.memory_allocated(self.device)
            self.device_start = _device_used(self.device)
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, _status_kb("VmRSS"))

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
            peak = max(self._peak, _status_kb("VmRSS"))
        else:
            peak = _status_kb("VmHWM")
        self.peak = peak
        self.rss_mb = round((peak - self.start) / 1024, 1)
        self.held_mb = round((_status_kb("VmRSS") - self.start) / 1024, 1)  # what the row keeps after setting up
        if self.device.type == "cuda":
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)
            self.cuda_mb = round((self.cuda_peak - self.cuda_start) / 2**20, 1)
            self.device_end = _device_used(self.device)
            self.device_mb = round((self.device_end - self.device_start) / 2**20, 1)

    def include(self, earlier: PeakMemory) -> None:
        """Extend this measurement back to the start of `earlier` (the reference's weights load before its row)."""
        self.held_mb = round(self.held_mb + self.start / 1024 - earlier.start / 1024, 1)
        self.start, self.peak = earlier.start, max(self.peak, earlier.peak)
        self.rss_mb = round((self.peak - self.start) / 1024, 1)
        if self.device.type == "cuda" and earlier.cuda_mb is not None:
            self.cuda_start, self.cuda_peak = earlier.cuda_start, max(self.cuda_peak, earlier.cuda_peak)
            self.cuda_mb = round((self.cuda_peak - self.cuda_start) / 2**20, 1)
            self.device_start = earlier.device_start
            self.device_mb = round((self.device_end - self.device_start) / 2**20, 1)

    @property
    def gpu_mb(self) -> float | None:
        """A GPU row's figure: its peak torch allocation, or what the device lost to it if that is more (a runtime
        with its own allocator shows only its I/O tensors to torch)."""
        return None if self.cuda_mb is None else max(self.cuda_mb, self.device_mb)


def _device_used(device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


# ---- setting a row up: load weights, export ONNX (cached), build the runtime --------------------------------------

@dataclass
class Context:
    model: str
    device: torch.device
    info: object = None         # sdrt.pipeline.ModelInfo of the model    } set once the reference is loaded
    tokenizers: list = None     #                                         } (the exports come before it)
    request: object = None      # the resolved GenerationRequest every row runs
    seed: int = 0
    deadline: float | None = None  # time.perf_counter() by which an export or engine build must be done
    arch: str | None = None        # single-file checkpoints: the preset their weights follow
    source_hash: str = ""          # the weights' identity, the export cache's key ("": info's)
    exports: dict = field(default_factory=dict)  # precision -> export_onnx's result, or the SdrtError it raised

    def time_left(self) -> float | None:
        return None if self.deadline is None else max(1.0, self.deadline - time.perf_counter())


def setup_row(spec: RowSpec, ctx: Context, components=None) -> LiveRow:
    """Build one row. `components`: weights already loaded for it (the reference row), else it loads its own."""
    from sdrt.backends import make_backend
    from sdrt.models import load_model
    from sdrt.pipeline import Pipeline

    cold: dict = {"load": None, "export": None, "build": None}
    device = torch.device("cpu") if spec.kind == "openvino" else ctx.device
    if spec.kind == "tensorrt":
        from sdrt.backends.tensorrt import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            raise SdrtError(why)
    if spec.kind == "diffusers":
        t = time.perf_counter()
        components = load_model(ctx.model, seed=ctx.seed, arch=ctx.arch)
        cold["load"] = time.perf_counter() - t
        t = time.perf_counter()
        peer = DiffusersPeer(components, spec.precision, device)
        cold["build"] = time.perf_counter() - t
        return LiveRow(spec, peer.backend, peer.generate, device, spec.precision, cold)
    if spec.kind in ONNX_BACKENDS:
        onnx_dir, cold["export"], cached = export_onnx(ctx, onnx_precision(spec))
        t = time.perf_counter()
        if spec.kind == "tensorrt":
            build_engines(onnx_dir, onnx_precision(spec).partition("-")[0], ctx)
        backend = make_backend(spec.name, onnx_dir=onnx_dir, device=device)
        cold["build"] = time.perf_counter() - t
        notes = [f"ONNX export cached in {onnx_dir}"] if cached else []
    else:  # eager, torch, torch.compile: the PyTorch weights
        if components is None:
            t = time.perf_counter()
            components = load_model(ctx.model, seed=ctx.seed, arch=ctx.arch)
            cold["load"] = time.perf_counter() - t
        t = time.perf_counter()
        backend = make_backend(f"eager:{spec.precision}" if spec.kind == "torch.compile" else spec.name,
                               components=components, device=device)
        if spec.kind == "torch.compile":
            compile_eager(backend)  # compiles lazily: the cost lands in the warm-up
        cold["build"] = time.perf_counter() - t
        notes = []
    precision = getattr(backend, "precision", spec.precision)
    pipe = Pipeline(ctx.info, ctx.tokenizers, backend)
    return LiveRow(spec, backend, pipe.generate, device, getattr(precision, "value", precision), cold, notes)


def onnx_precision(spec: RowSpec) -> str:
    """Which export a row reads: OpenVINO picks its precision at compile time from the fp32 graphs; onnxruntime and
    TensorRT read the export of their own precision (TensorRT builds fp16 engines from the fp16 graphs). TensorRT's
    int8 is "int8-tensorrt": `sdrt export --int8-recipe tensorrt` (symmetric s8 activations; TensorRT refuses the
    default recipe's u8), in a cache directory of its own beside onnxruntime's int8 export."""
    if spec.kind == "openvino":  # precision is a compile-time hint on the fp32 graphs, except the int8 export
        return "int8" if spec.precision == "int8" else "fp32"
    if spec.kind == "tensorrt":
        return "int8-tensorrt" if spec.precision == "int8" else spec.precision or "fp16"  # `sdrt build`'s default
    return spec.precision or "fp32"


def build_engines(onnx_dir: Path, precision: str, ctx: Context) -> None:
    """`sdrt build ONNX_DIR` for this benchmark's one shape (a static profile: TensorRT's fastest engine), in a
    child process that the time budget can stop. ONNX_DIR/tensorrt's cache skips engines already up to date."""
    r = ctx.request
    names = ["text_encoder", "text_encoder_2"][: len(ctx.tokenizers)] + ["unet", "vae_decoder"]
    sdrt_cli(["build", str(onnx_dir), "--precision", precision, "--profile", f"{r.height}x{r.width}@{r.batch}",
              "--components", ",".join(names)] + ([] if r.guidance > 1.0 else ["--no-cfg"]), ctx.time_left())


def export_onnx(ctx: Context, export: str, log=None) -> tuple[Path, float, bool]:
    """(dir, export seconds, cached?) in the onnxruntime backend's export cache ($SDRT_CACHE or ~/.cache/sdrt), so
    every ONNX row and `sdrt generate` share one export. The export's recorded time (its graphs' own times, from
    the manifest) is reported whether it ran now or was cached, so a second benchmark run neither pays nor hides
    it. The export runs in a child process: the time budget can stop it, and its memory (an int8 calibration holds
    a second fp32 model) is gone when it ends. run_bench exports before it loads anything (prepare_exports); a row
    then finds its result in ctx.exports. export: a precision, or PRECISION-RECIPE for an int8 recipe other than
    the default (onnx_precision)."""
    from sdrt.backends.onnxruntime import cache_dir
    from sdrt.export.onnx_manifest import read_manifest

    done = ctx.exports.get(export)
    if isinstance(done, Exception):
        raise done
    if done is not None:
        return done
    precision, _, recipe = export.partition("-")
    key = ctx.source_hash or ctx.info.source_hash
    out = cache_dir(key, export)
    m = read_manifest(out)
    if (m and m.get("precision") == precision and m.get("model", {}).get("source_hash") == key
            and (not recipe or m.get("int8", {}).get("settings", {}).get("recipe", {}).get("name") == recipe)):
        return out, _recorded_export_s(m), True
    if log is not None:
        log(f"ONNX {export}: exporting into {out} (a child process; minutes for a full-size model)")
    t = time.perf_counter()
    arch = ["--arch", ctx.arch] if ctx.arch else []
    recipe_args = ["--int8-recipe", recipe] if recipe else []
    sdrt_cli(["export", ctx.model, "-o", str(out), "--precision", precision, *recipe_args, "--seed", str(ctx.seed),
              "-q", *arch], ctx.time_left())
    m = read_manifest(out)  # the graphs' own times, as a cached run reports them (not the child's start-up)
    return out, _recorded_export_s(m) if m else time.perf_counter() - t, False


def _recorded_export_s(manifest: dict) -> float:
    return sum(c.get("export_s") or 0.0 for c in manifest["components"].values())


def prepare_exports(ctx: Context, names: list[str], log) -> None:
    """Every ONNX export the rows will read, before any row (or the eager reference) is in memory: next to live
    rows an sd15 int8 calibration does not fit in 24 GB. Results (or the error) go to ctx.exports for setup_row."""
    for name in names:
        spec = parse_row(name)  # run_bench has checked every name
        if spec.kind not in ONNX_BACKENDS:
            continue
        if spec.kind == "tensorrt":
            from sdrt.backends.tensorrt import tensorrt_available

            if not tensorrt_available()[0]:
                continue  # setup_row says why, without an export nobody would use
        precision = onnx_precision(spec)
        if precision in ctx.exports:
            continue
        try:
            ctx.exports[precision] = got = export_onnx(ctx, precision, log)
            log(f"ONNX {precision}: {'cached' if got[2] else f'exported in {got[1]:.0f} s'} ({got[0]})")
        except SdrtError as e:
            ctx.exports[precision] = e


def sdrt_cli(argv: list[str], timeout: float | None) -> None:
    """`sdrt ARGV` in a child process; a timeout or a failure is an SdrtError with the child's last line."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-m", "sdrt", *argv], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SdrtError(f"`sdrt {argv[0]}` did not finish within the time budget ({timeout:.0f} s left); run it "
                        "once beforehand: its output is cached") from None
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SdrtError(f"`sdrt {' '.join(argv)}` failed: {last}")


def compile_eager(backend) -> None:
    """The eager backend's modules under torch.compile (the modules the verbs call; the instance, not the class)."""
    backend.text_encoders = [torch.compile(te) for te in backend.text_encoders]
    backend.unet_module = torch.compile(backend.unet_module)
    backend.vae.decoder = torch.compile(backend.vae.decoder)


# ---- the diffusers peer ------------------------------------------------------------------------------------------

@dataclass
class PeerResult:
    pixels: object
    latents: torch.Tensor
    timings: dict


class DiffusersPeer:
    """diffusers' StableDiffusion[XL]Pipeline over the same weights, run with the same request and seed: the same
    CPU generator draws the same initial noise, so its image should match the eager row's to within float noise.
    Like `from_pretrained(torch_dtype=...)`, every module is cast to the row's precision (the SDXL pipeline upcasts
    its VAE itself); its stage verbs time diffusers' modules as the pipeline holds them."""

    def __init__(self, components, precision: str, device):
        import diffusers

        from sdrt.backends import Precision
        from sdrt.specs import Family

        self.components, self.device, self.dtype = components, device, Precision(precision).torch_dtype
        sdxl = components.family is Family.SDXL
        cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
        kw = {"vae": components.vae, "unet": components.unet,
              "scheduler": self.scheduler(components.defaults["scheduler"]),
              "tokenizer": components.tokenizers[0], "text_encoder": components.text_encoders[0]}
        if sdxl:
            kw.update(tokenizer_2=components.tokenizers[1], text_encoder_2=components.text_encoders[1])
        else:
            kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.pipe = cls(**kw).to(device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.backend = self  # the stage verbs below

    @torch.inference_mode()
    def text_encoder(self, index: int, input_ids):
        te = self.pipe.text_encoder_2 if index else self.pipe.text_encoder
        return te(input_ids.to(self.device), output_hidden_states=True)

    @torch.inference_mode()
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        dev, dt = self.device, self.dtype
        added = None if text_embeds is None else {"text_embeds": text_embeds.to(dev, dt),
                                                  "time_ids": time_ids.to(dev, dt)}
        return self.pipe.unet(sample.to(dev, dt), timestep.to(dev), encoder_hidden_states=encoder_hidden_states.to(
            dev, dt), added_cond_kwargs=added, return_dict=False)[0]

    @torch.inference_mode()
    def vae_decoder(self, latent):
        return self.pipe.vae.decode(latent.to(self.device, self.pipe.vae.dtype), return_dict=False)[0]

    def scheduler(self, name: str):
        import diffusers

        cls, forced = DIFFUSERS_SCHEDULERS[name]
        return getattr(diffusers, cls).from_config(self.components.scheduler_config, **forced)

    def generate(self, r) -> PeerResult:
        self.pipe.scheduler = self.scheduler(r.scheduler)
        final = {}

        def keep_latents(pipe, i, t, kw):
            final["latents"] = kw["latents"]
            return kw

        t = time.perf_counter()
        # The initial latents are drawn in fp32, as sdrt draws them, and handed over: diffusers would draw them in
        # the pipeline's dtype, and CPU randn in fp16 is another sequence than fp32 (a different image, ~12 dB).
        # The generator then goes on to the per-step noise of ancestral schedulers, in sdrt's order.
        g = torch.Generator("cpu").manual_seed(r.seed)
        shape = (len(r.prompts) * r.batch, self.pipe.unet.config.in_channels, r.height // 8, r.width // 8)
        latents = torch.randn(shape, generator=g, dtype=torch.float32).to(self.device, self.dtype)
        out = self.pipe(prompt=r.prompts, negative_prompt=r.negative_prompt, num_inference_steps=r.steps,
                        guidance_scale=r.guidance, height=r.height, width=r.width, num_images_per_prompt=r.batch,
                        generator=g, latents=latents, output_type="np", callback_on_step_end=keep_latents)
        sync(self.device)
        return PeerResult(out.images, final["latents"].float().cpu(), {"total_ms": (time.perf_counter() - t) * 1e3})
