"""The kernels one UNet step (or one VAE decode) launches and the bytes they move: stock diffusers against the
torch backend's passes. No weights and no GPU: the models are built on PyTorch's meta device, so a full SD 1.5 UNet
at 512^2 takes a second here.

What it counts: every aten op that writes new memory or writes in place (views, and empty tensors, launch nothing),
by op name, with its bytes read + written, and sdrt's Triton kernels as single ops ("sdrt.group_norm",
"sdrt.attention", "sdrt.geglu", "sdrt.add_layer_norm"; GroupNorm counted as it runs on an H100: its plan's launches,
x read twice by the split kernels and once by the one-pass kernel). Those bytes are
the *minimum* traffic of each kernel: cuDNN and cuBLAS re-read tiles, and a small kernel costs its launch (~2-5 us
on an H100, even inside a CUDA graph) more than its bytes, so the kernel count matters as much as the bytes for the
elementwise rows. It is a model, not a measurement: use it to see what a pass removed, and `make gpu-suite` for
what that is worth. sdrt's UNet step is counted as the torch backend's denoising loop runs it after the first
step: the time embeddings already computed for every step (sdrt.unet_step), the text's K/V already projected
(text_kv_once).

    python benchmarks/op_census.py [--model sd15] [--size 512] [--batch 2] [--vae]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdrt import passes, unet_step  # noqa: E402
from sdrt.blocks import StepEmbedding, text_kv_once  # noqa: E402
from sdrt.specs import PRESETS  # noqa: E402

FREE = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "detach", "detach_", "alias",
        "lift_fresh"}


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class Census(TorchDispatchMode):
    """Records (op, bytes read + written, output shape) for every op that writes memory no input owns, and every
    in-place op (aten's trailing _)."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, int, tuple, int]] = []

    def record(self, name: str, nbytes: int, shape: tuple, kernels: int = 1) -> None:
        self.rows.append((name, nbytes, shape, kernels))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        owned = {t.untyped_storage()._cdata for t in ins}
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)
                and (o.untyped_storage()._cdata not in owned or name.endswith("_"))]  # in place (addmm_): counted
        if outs and name not in FREE:
            self.record(name, _nbytes(ins) + _nbytes(outs), tuple(outs[0].shape))
        return out


@contextlib.contextmanager
def sdrt_kernels_as_ops(census: Census):
    """sdrt.kernels' Triton launchers replaced, for this census only, by meta stand-ins that record one op each."""
    import importlib

    import sdrt.kernels as k

    gn = importlib.import_module("sdrt.kernels.group_norm")  # the module (sdrt.kernels.group_norm is the function)

    def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, *, add=None, tuning=None):
        p = gn.plan_for(x, num_groups, sms=132)  # as an H100 runs it: one kernel, or stats (+ finalize) + apply
        reads = 1 if p.one_pass else 2  # the split plan reads x for its statistics, then again to normalise
        census.record("sdrt.group_norm", (reads + 1) * _nbytes([x]), tuple(x.shape),
                      1 if p.one_pass else 2 + p.finalize)
        return torch.empty_like(x)

    def attention(q, kk, v, scale=None, *, out=None, split_head_dim=True):
        census.record("sdrt.attention", _nbytes([q, kk, v, q]), tuple(q.shape))
        return q.new_empty(q.shape) if out is None else out  # contiguous, as the launcher allocates it

    def geglu(h):
        y = h.new_empty(*h.shape[:-1], h.shape[-1] // 2)
        census.record("sdrt.geglu", _nbytes([h, y]), tuple(y.shape))
        return y

    def add_layer_norm(x, residual, weight, bias, eps=1e-5, *, s_bias=None):
        s, y = torch.empty_like(x), torch.empty_like(x)
        census.record("sdrt.add_layer_norm", _nbytes([x, residual, s, y]), tuple(x.shape))
        return s, y

    names = ("group_norm", "attention", "geglu", "add_layer_norm")
    saved = [getattr(k, n) for n in names]
    for n, f in zip(names, (group_norm, attention, geglu, add_layer_norm)):
        setattr(k, n, f)
    try:
        yield
    finally:
        for n, f in zip(names, saved):
            setattr(k, n, f)


def build(model: str, vae: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = PRESETS[model]
    with torch.device("meta"):
        return (AutoencoderKL(**spec.vae) if vae else UNet2DConditionModel(**spec.unet)).half()


def optimize(m, kernel: bool = True):
    passes.use_sdrt_attention(m, kernel=kernel)
    passes.use_sdrt_group_norm(m, kernel=kernel)
    passes.use_sdrt_geglu(m, kernel=kernel)
    passes.use_sdrt_transformer_blocks(m, kernel=kernel)
    return passes.to_channels_last(m)


def run(m, size: int, batch: int, vae: bool, channels_last: bool, kernels: bool = False) -> Census:
    """One UNet call (batch rows: 2 = one image with guidance) or one VAE decode of batch latents, on meta. With
    kernels (sdrt's model), the UNet call is a step of the torch backend's denoising loop after its first: the
    time embeddings of all steps computed before it (sdrt.unet_step), and the text's K/V in step 1 (text_kv_once),
    neither counted."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(batch, 4, size // 8, size // 8, device="meta", dtype=torch.half).contiguous(memory_format=fmt)
    if vae:
        return _count(lambda: m.decode(x), kernels)
    cfg = m.config
    added = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text (1280) + 6 time ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.empty(batch, pooled, device="meta", dtype=torch.half),
                 "time_ids": torch.empty(batch, 6, device="meta", dtype=torch.half)}
    text = torch.empty(batch, 77, cfg.cross_attention_dim, device="meta", dtype=torch.half)
    if not kernels:
        return _count(lambda: m(x, torch.empty(batch, device="meta"), text, added_cond_kwargs=added or None), False)
    assert unet_step.supports(m)
    with torch.inference_mode():
        adds = unet_step.time_adds(m, torch.empty(2, device="meta"), batch, **added)
    with text_kv_once():
        _count(lambda: unet_step.forward(m, x, StepEmbedding(adds, 0), text), True)
        return _count(lambda: unet_step.forward(m, x, StepEmbedding(adds, 1), text), True)


def _count(fn, kernels: bool) -> Census:
    c = Census()
    with torch.inference_mode(), c, (sdrt_kernels_as_ops(c) if kernels else contextlib.nullcontext()):
        fn()
    return c


def summary(c: Census) -> dict[str, tuple[int, int]]:
    """op -> (kernels, bytes)"""
    agg = collections.defaultdict(lambda: [0, 0])
    for name, nbytes, _, kernels in c.rows:
        agg[name][0] += kernels
        agg[name][1] += nbytes
    return {k: tuple(v) for k, v in agg.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15", choices=[p for p in PRESETS if not p.startswith("tiny")])
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    ap.add_argument("--batch", type=int, default=None,
                    help="UNet rows (default 2: one image with guidance) or VAE latents (default 1)")
    ap.add_argument("--vae", action="store_true", help="count one VAE decode instead of one UNet step")
    a = ap.parse_args(argv)
    size = a.size or PRESETS[a.model].default_size
    a.batch = a.batch or (1 if a.vae else 2)
    stock_model = build(a.model, a.vae)
    fast_model = optimize(copy.deepcopy(stock_model))
    stock = summary(run(stock_model, size, a.batch, a.vae, channels_last=False))
    fast = summary(run(fast_model, size, a.batch, a.vae, channels_last=True, kernels=True))
    what = "VAE decode" if a.vae else "UNet step"
    print(f"{a.model} {size}x{size}, batch {a.batch}, fp16, one {what}: kernels launched and minimum MB moved\n")
    print("| op | stock kernels | stock MB | sdrt kernels | sdrt MB |\n|---|---|---|---|---|")
    for op in sorted(set(stock) | set(fast), key=lambda o: -max(stock.get(o, (0, 0))[1], fast.get(o, (0, 0))[1])):
        s, f = stock.get(op, (0, 0)), fast.get(op, (0, 0))
        print(f"| {op} | {s[0]} | {s[1] / 1e6:.1f} | {f[0]} | {f[1] / 1e6:.1f} |")
    tot = [sum(v[i] for v in d.values()) for d in (stock, fast) for i in (0, 1)]
    print(f"| **total** | {tot[0]} | {tot[1] / 1e6:.1f} | {tot[2]} | {tot[3] / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
