"""Optimized PyTorch: the eager modules after sdrt's passes, plus the whole denoising loop as one CUDA graph.

    UNet, VAE   to_precision -> use_sdrt_attention (fused QKV, Triton flash attention) -> use_sdrt_group_norm (Triton
                GroupNorm with SiLU and the time-embedding add fused, lean resnet blocks) -> use_sdrt_geglu (Triton
                GEGLU) -> use_sdrt_transformer_blocks (residual adds fused into LayerNorms, GEMMs) ->
                to_channels_last (and NHWC transformer outputs); inputs are made channels-last at each verb.
    denoise     an extra verb: the pipeline hands it the whole loop (UNet, guidance, scheduler step, every step). On
                CUDA it is captured once per bucket (batch, resolution, steps, scheduler) and replayed
                (sdrt.loop.CapturedLoop), keeping the TorchOptions.max_graphs most recently used buckets; on CPU
                the same code runs uncaptured. The text's K/V projections run in its first step only, the time
                embeddings of all steps before it (sdrt.unet_step).
    text encoders, vae_decoder, vae_encoder, unet: the eager modules (text encoders without passes: once per
                image), on CUDA each recorded per input shape (sdrt.graphs.CapturedCall), so the host's launch cost
                drops out of them too (the unet verb serves callers with their own loop). A verb whose capture fails
                (a module that syncs with the host) warns once and runs uncaptured for that shape.

The passes edit the given components' modules in place (as the eager backend's .to() moves them in place): build
one backend per loaded model. Hardware-dependent defaults are resolved in one place, TorchOptions.resolve: on CUDA
everything is on; on CPU the Triton kernels (which only run there under TRITON_INTERPRET=1, thousands of times
slower) and graphs are off, and the same module structure computes with SDPA and F.group_norm.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from sdrt import passes, unet_step
from sdrt.backends import Precision
from sdrt.backends.eager import EagerBackend
from sdrt.blocks import StepEmbedding
from sdrt.errors import SdrtError
from sdrt.graphs import CapturedCall, GraphCache, signature
from sdrt.loop import CapturedLoop, bucket_key, denoise_loop


@dataclass(frozen=True)
class TorchOptions:
    kernels: bool | None = None     # sdrt's Triton kernels (attention, GroupNorm, GEGLU, add+LayerNorm); None: CUDA
    fuse_qkv: bool = True           # one projection GEMM for q/k/v (self) and k/v (cross)
    channels_last: bool = True
    cuda_graph: bool | None = None  # capture the whole denoising loop per bucket; None: on CUDA only
    # ... and the text encoder, VAE and unet verbs per input shape (only where cuda_graph is on)
    graph_stages: bool = True
    # Captured loops kept, least recently used dropped first: each holds a private memory pool of about one step's
    # activations plus its output, so a service that sees many sizes or step counts must not keep one per bucket.
    # The same number again of captured stages (text encoders, VAE), in a cache of their own, and of unet verb calls
    # (callers with their own loop; each holds about one step's activations) in a third; a recorded VAE decode
    # keeps its peak activations reserved in its pool (eager's caching allocator keeps about as much, but for one
    # size at a time): several GB for SDXL at 1024^2, so a service with many sizes may want graph_stages off.
    max_graphs: int = 4
    # cuDNN timing its conv algorithms per shape (scoped to our calls). Off: on sd15 512^2 (H100) it gained 1% end to
    # end (458 vs 463 ms) but its trial workspaces took the CUDA peak from 11 GB to 77 GB.
    cudnn_benchmark: bool = False

    def resolve(self, device: torch.device) -> TorchOptions:
        cuda = device.type == "cuda"
        opts = replace(self, kernels=cuda if self.kernels is None else self.kernels,
                       cuda_graph=cuda if self.cuda_graph is None else self.cuda_graph)
        if opts.cuda_graph and not cuda:
            raise SdrtError("CUDA graphs need a CUDA device")
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import: set before starting
        if opts.kernels and not cuda and not interpreted:
            raise SdrtError("sdrt's Triton kernels run on CPU only under Triton's interpreter: "
                            "set TRITON_INTERPRET=1 before starting, or turn kernels off")
        if opts.kernels and cuda and interpreted:  # Python-speed kernels, host copies: not capturable either
            raise SdrtError("TRITON_INTERPRET=1 would run sdrt's kernels in Triton's interpreter on the GPU: "
                            "unset it (or set 0) before starting")
        if opts.max_graphs < 1:
            raise SdrtError(f"max_graphs must be >= 1, got {opts.max_graphs}")
        return opts


def create(precision: Precision | None, components=None, onnx_dir=None, device=None,
           options: TorchOptions | None = None):
    if precision is None:  # the optimized path's point is fp16 on a GPU; on CPU it must match eager in fp32
        on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        precision = Precision.FP16 if on_cuda else Precision.FP32
    if components is None:
        raise SdrtError("the torch backend needs the model's PyTorch weights (components)")
    if precision is Precision.INT8:
        raise SdrtError("the torch backend runs fp32, fp16 or bf16; int8 needs onnxruntime or tensorrt")
    return TorchBackend(components, precision, device, options)


class TorchBackend(EagerBackend):
    name = "torch"

    def __init__(self, components, precision: Precision = Precision.FP32, device=None,
                 options: TorchOptions | None = None):
        super().__init__(components, precision, device)  # moves and casts the modules (to_precision)
        self.options = (options or TorchOptions()).resolve(self.device)
        o = self.options
        self.memory_format = torch.channels_last if o.channels_last else torch.contiguous_format
        for m in (self.unet_module, self.vae):
            passes.use_sdrt_attention(m, kernel=o.kernels, fuse_qkv=o.fuse_qkv)
            passes.use_sdrt_group_norm(m, kernel=o.kernels)
            passes.use_sdrt_geglu(m, kernel=o.kernels)
            passes.use_sdrt_transformer_blocks(m, kernel=o.kernels)
            if o.channels_last:
                passes.to_channels_last(m)
        # diffusers' forward recomputes the time embedding every step; sdrt's computes all steps' before the first
        self.step_forward = unet_step.supports(self.unet_module)
        self.graphs = GraphCache(o.max_graphs)  # bucket_key -> CapturedLoop
        self.stage_graphs = GraphCache(o.max_graphs)  # (verb, index, signature) -> CapturedCall, or None: uncapturable
        self.unet_graphs = GraphCache(o.max_graphs)  # the unet verb's, apart: the pipeline's stages keep their room

    def _cudnn(self):
        """cuDNN autotuning for our calls only (a scoped flag, not the process-wide torch.backends setting): its
        first call per conv shape times the algorithms, so it happens in the warm-up, before any graph capture."""
        if self.device.type != "cuda" or not self.options.cudnn_benchmark:
            return nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=True, benchmark=True, deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32)

    def _in(self, x: torch.Tensor, dtype) -> torch.Tensor:
        return x.to(self.device, dtype).contiguous(memory_format=self.memory_format)

    def _staged(self, cache: GraphCache, key: tuple, fn, *inputs: torch.Tensor):
        """fn(*inputs), replayed from a CUDA graph recorded for these inputs' shapes when stage graphs are on."""
        if not (self.options.cuda_graph and self.options.graph_stages):
            return fn(*inputs)
        call = cache.get((*key, signature(*inputs)), lambda: _try_capture(fn, inputs, key[0]))
        return fn(*inputs) if call is None else call(*inputs)

    @torch.inference_mode()
    def text_encoder(self, index: int, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._staged(self.stage_graphs, ("text_encoder", index),
                            lambda ids: EagerBackend.text_encoder(self, index, ids), input_ids.to(self.device))

    @torch.inference_mode()
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None) -> torch.Tensor:
        """One UNet call, for callers that run their own loop (sdrt's pipeline hands this backend the whole loop:
        denoise). On CUDA recorded per input shape like the other verbs: uncaptured, a step costs the host hundreds
        of Python launches of Triton kernels (40.6 ms on the H100 host, against 8.4 ms of GPU time)."""
        dev = self.device
        inputs = [self._in(sample, self.dtype), timestep.to(dev), encoder_hidden_states.to(dev, self.dtype)]
        if text_embeds is not None:
            inputs += [text_embeds.to(dev, self.dtype), time_ids.to(dev, self.dtype)]
        return self._staged(self.unet_graphs, ("unet",), self._unet, *inputs)

    def _unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None) -> torch.Tensor:
        with self._cudnn():
            return EagerBackend.unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids)

    def _loop(self, latents, embeds, sched, guidance, text_embeds=None, time_ids=None, noise=None) -> torch.Tensor:
        """denoise_loop over this backend's UNet (fp32 predictions: the loop combines guidance and steps in fp32).
        Where sdrt.unet_step supports the UNet, every step's time embedding, and each resnet's projection of it,
        is computed before the first step (inside the recorded graph, since the timesteps are its inputs)."""
        if not self.step_forward:  # diffusers' forward; not the unet verb, which would record a graph of its own
            return denoise_loop(lambda i, x, *cond: self._unet(self._in(x, self.dtype), *cond).float(), latents,
                                embeds, sched, guidance, text_embeds, time_ids, noise)
        adds = unet_step.time_adds(self.unet_module, sched.timesteps, embeds.shape[0], text_embeds, time_ids)

        def step(i, x, timestep, text, *_) -> torch.Tensor:
            with self._cudnn():
                pred = unet_step.forward(self.unet_module, self._in(x, self.dtype), StepEmbedding(adds, i), text)
            return pred.float()

        return denoise_loop(step, latents, embeds, sched, guidance, text_embeds, time_ids, noise)

    @torch.inference_mode()
    def vae_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        with self._cudnn():
            return self._staged(self.stage_graphs, ("vae_decoder",), lambda z: EagerBackend.vae_decoder(self, z),
                                self._in(latent, self.vae_dtype))

    @torch.inference_mode()
    def vae_encoder(self, image: torch.Tensor) -> torch.Tensor:
        with self._cudnn():
            return self._staged(self.stage_graphs, ("vae_encoder",), lambda x: EagerBackend.vae_encoder(self, x),
                                self._in(image, self.vae_dtype))

    @torch.inference_mode()
    def denoise(self, latents, encoder_hidden_states, sched, guidance: float, text_embeds=None, time_ids=None,
                noise=None) -> torch.Tensor:
        """The pipeline's whole denoising loop (sdrt.loop.denoise_loop) -> final latents (N, 4, h, w) fp32.

        latents (N, 4, h, w): the initial noisy latents. encoder_hidden_states (2N, 77, C) [uncond; cond] when
        guidance > 1, else (N, 77, C). noise (S, N, 4, h, w): every step's z_i, pre-drawn (stochastic schedules).
        """
        dev = self.device
        args = {"latents": latents.to(dev, torch.float32), "embeds": encoder_hidden_states.to(dev, self.dtype),
                "sched": sched.to(dev), "guidance": float(guidance),
                "text_embeds": None if text_embeds is None else text_embeds.to(dev, self.dtype),
                "time_ids": None if time_ids is None else time_ids.to(dev, self.dtype),
                "noise": None if noise is None else noise.to(dev, torch.float32)}
        if not self.options.cuda_graph:
            return self._loop(**args)
        key = bucket_key(**{k: v for k, v in args.items() if k != "guidance"})
        return self.graphs.get(key, lambda: CapturedLoop(self._loop, **args))(**args)


def _try_capture(fn, inputs, what: str) -> CapturedCall | None:
    """A CapturedCall, or None (with a warning) when recording fails: the verb then runs uncaptured."""
    try:
        return CapturedCall(fn, *inputs)
    except RuntimeError as e:  # e.g. "operation not permitted when stream is capturing": a host sync inside
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.warn(f"sdrt: the {what} could not be recorded as a CUDA graph ({first}); it runs uncaptured",
                      RuntimeWarning, stacklevel=3)
        return None
