"""The denoising loop as device code, and the whole loop captured in one CUDA graph.

`denoise_loop` is the pipeline's loop (scale input, UNet on [uncond; cond], guidance combine, scheduler step) with
every per-step quantity read from device tensors: the schedule's coefficient tables (sdrt.schedulers, indexed by a
Python int, i.e. a view, no copy), the guidance scale and the pre-drawn per-step noise. Nothing in it reads a value
back to the host, so on a GPU it can be recorded once and replayed. What does not change from step to step is
computed once: sdrt's cross-attention layers project the text conditioning to K/V in the first step and reuse them
(sdrt.blocks.text_kv_once; diffusers' own processors are unaffected); the torch backend computes the time
embeddings of all steps before the loop starts (sdrt.unet_step), and its UNet call reads them by the step index.

    CapturedLoop  static input buffers (latents, text conditioning, schedule tables, guidance, noise) -> one
                  torch.cuda.CUDAGraph holding all S steps unrolled (S UNet calls, S scheduler steps) -> static output.
                  A call copies its inputs into the buffers (device-to-device, asynchronous) and replays.

TensorRT's diffusion demo graphs only the UNet call and leaves the scheduler and the CFG combine to Python between
replays; capturing the loop removes those launches and host round trips too. Memory: the graph's private pool
holds about one step's activations (allocations inside the capture are reused from step to step), plus the output.
A graph is valid for fixed shapes, dtypes and schedule layout; the caller keeps one per bucket (see bucket_key).
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from sdrt import schedulers
from sdrt.blocks import text_kv_once
from sdrt.graphs import capture, signature
from sdrt.schedulers import Schedule


def denoise_loop(unet, latents: Tensor, embeds: Tensor, sched: Schedule, guidance, text_embeds=None, time_ids=None,
                 noise: Tensor | None = None) -> Tensor:
    """Run every step of `sched` from `latents`; returns the final latents (before / vae_scale).

    unet(i, x, timestep, embeds, text_embeds, time_ids) -> prediction (fp32): step i's UNet call, the backend's UNet
    verb after the step index (which lets a UNet read what it precomputed for that step).
    latents (N, 4, h, w) fp32. embeds (2N, 77, C) rows [uncond; cond] for classifier-free guidance, or (N, 77, C)
    without it (the pipeline's rule: guidance > 1). guidance: float or 0-d device tensor. text_embeds (2N or N, P)
    and time_ids (2N or N, 6): SDXL only. noise (S, N, 4, h, w): z_i for every step of a stochastic schedule
    (zeros where Schedule.draws_noise[i] is False), drawn in diffusers' order by the caller; None otherwise.
    """
    cfg = embeds.shape[0] == 2 * latents.shape[0]
    state = schedulers.init_state(sched, latents)
    timesteps = sched.timesteps.to(torch.float32)  # (S,) as the ONNX contract: one cast, not one a step
    with text_kv_once():  # every step passes the same `embeds`: sdrt's cross-attention projects it once
        for i in range(sched.num_steps):  # unrolled: i is a Python int, the tables are indexed on the device
            x_in = schedulers.scale_input(sched, torch.cat([latents] * 2) if cfg else latents, i)
            timestep = timesteps[i].expand(x_in.shape[0])  # (B,), a view
            pred = unet(i, x_in, timestep, embeds, text_embeds, time_ids).float()
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance * (cond - uncond)
            latents, state = schedulers.step(sched, i, pred, latents, state, None if noise is None else noise[i])
    return latents


def bucket_key(latents, embeds, sched: Schedule, text_embeds=None, time_ids=None, noise=None) -> tuple:
    """What a captured graph is specialised on: shapes, dtypes, and the schedule's layout (not its values, which are
    copied into the graph's buffers on every call; the guidance scale is a buffer too)."""

    tables = signature(*(t for _, t in _tables(sched)))
    return (sched.name, sched.num_steps, sched.clip, tables, *signature(latents, embeds, text_embeds, time_ids, noise))


class CapturedLoop:
    """A denoising loop for one bucket, recorded once as a CUDA graph and replayed.

    loop(latents, embeds, sched, guidance, text_embeds, time_ids, noise) -> final latents: denoise_loop over the
    backend's UNet, with whatever the backend computes once per loop ahead of the steps (recorded with them)."""

    def __init__(self, loop, latents, embeds, sched: Schedule, guidance, text_embeds=None, time_ids=None,
                 noise=None):
        def clone(t):
            return None if t is None else t.clone()

        self.loop = loop
        self.latents, self.embeds = clone(latents), clone(embeds)
        self.text_embeds, self.time_ids, self.noise = clone(text_embeds), clone(time_ids), clone(noise)
        self.sched = replace(sched, **{name: t.clone() for name, t in _tables(sched)})
        self.guidance = torch.tensor(float(guidance), dtype=torch.float32, device=latents.device)
        self.graph, self.out = capture(self._run)  # out lives in the graph's pool: overwritten by the next replay

    def _run(self) -> Tensor:
        return self.loop(self.latents, self.embeds, self.sched, self.guidance, self.text_embeds, self.time_ids,
                         self.noise)

    def __call__(self, latents, embeds, sched: Schedule, guidance, text_embeds=None, time_ids=None, noise=None):
        for dst, src in ((self.latents, latents), (self.embeds, embeds), (self.text_embeds, text_embeds),
                         (self.time_ids, time_ids), (self.noise, noise)):
            if dst is not None:
                dst.copy_(src)
        for name, t in _tables(sched):
            getattr(self.sched, name).copy_(t)
        self.guidance.fill_(float(guidance))
        self.graph.replay()
        return self.out.clone()


def _tables(sched: Schedule):
    return [(f.name, getattr(sched, f.name)) for f in fields(sched) if isinstance(getattr(sched, f.name), Tensor)]
