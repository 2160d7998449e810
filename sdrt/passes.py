"""Optimization passes: plain functions `model -> model` over one diffusers UNet or VAE instance.

Each pass edits the module tree of the instance it is given (and returns it), never a diffusers class, so a second
model loaded in the same process stays stock. They compose in any order; the torch backend applies

    to_precision(m, dtype) -> use_sdrt_attention(m) -> use_sdrt_group_norm(m) -> use_sdrt_geglu(m)
        -> use_sdrt_transformer_blocks(m) -> to_channels_last(m)

  use_sdrt_attention   every diffusers `Attention` gets SdrtAttnProcessor (through the public Attention.set_processor):
                       q/k/v from one fused projection (self-attention: to_qkv, cross-attention: to_kv over the text),
                       read as strided views by sdrt.kernels.attention (flash attention, no (N, N) matrix).
  use_sdrt_group_norm  nn.GroupNorm -> GroupNormAct calling sdrt.kernels.group_norm; where SiLU follows the norm
                       (the UNet's and VAE's conv_norm_out/conv_act) the SiLU is fused into the kernel and that
                       instance's activation becomes nn.Identity. Each SD ResnetBlock2D becomes a ResnetBlock: both
                       SiLUs fused, the time-embedding add folded into norm2, no division by a scale of 1.
  use_sdrt_geglu       diffusers' GEGLU feed-forward activation -> GegluAct: the chunk, GELU and product in one
                       sdrt.kernels.geglu call.
  use_sdrt_transformer_blocks   SD's BasicTransformerBlock -> TransformerBlock: each residual add fused into the
                       LayerNorm that follows it (sdrt.kernels.add_layer_norm), the feed-forward's into its output
                       GEMM.
  to_channels_last     NHWC weights: cuDNN's fastest convolutions, and copy-free (B, HW, C) views for attention;
                       Transformer2DModel outputs stay NHWC (no NCHW copy per transformer).
  to_precision         one dtype for every parameter.

The modules and the processor they install are in sdrt.blocks. `kernel=False` keeps the same module structure but
computes with PyTorch ops (SDPA, F.group_norm): the fast path on CPU, where the Triton kernels only run under the
interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from sdrt.blocks import (
    GegluAct,
    GroupNormAct,
    ResnetBlock,
    SdrtAttnProcessor,
    TransformerBlock,
    time_resnets,
    transformer_output_nhwc,
)


def to_precision(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    if any(p.dtype != dtype for p in model.parameters()):  # diffusers warns on every .to(dtype), even a no-op
        model.to(dtype)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC conv weights (inputs must be made channels-last by the caller), and every Transformer2DModel's output
    left in the layout it is computed in.

    diffusers ends each Transformer2DModel with `(B, HW, C) -> (B, H, W, C) -> permute -> .contiguous()`: an NCHW
    copy of the activation (5 MB at SD 1.5's 64^2), which the next convolution or GroupNorm then reads in the other
    layout, and the residual add mixes the two. The permuted view is already channels-last: used as is, the copy
    goes. (sd15 at 512^2: 16 copies a UNet step.)
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for m in model.modules():
        if (isinstance(m, Transformer2DModel) and getattr(m, "is_input_continuous", False)
                and hasattr(type(m), "_get_output_for_continuous_inputs")):  # else: diffusers changed, keep stock
            m._get_output_for_continuous_inputs = types.MethodType(transformer_output_nhwc, m)
    return model.to(memory_format=torch.channels_last)


# ---- attention -------------------------------------------------------------------------------------------------


def use_sdrt_attention(model: nn.Module, kernel: bool = True, fuse_qkv: bool = True) -> nn.Module:
    """Route every Attention in `model` (a UNet, a VAE or one block) through SdrtAttnProcessor, with fused
    projections when fuse_qkv. Attention.set_processor is the per-layer public API behind set_attn_processor."""
    from diffusers.models.attention_processor import Attention

    processor = SdrtAttnProcessor(kernel)  # stateless: one instance for every layer
    for m in model.modules():
        if not isinstance(m, Attention):
            continue
        if getattr(m, "add_q_proj", None) is not None:  # SD3/Flux joint attention: not an SD 1/2/XL UNet
            raise ValueError("use_sdrt_attention supports SD 1.x/2.x/XL attention, not added (joint) projections")
        if getattr(m, "add_k_proj", None) is not None or getattr(m, "norm_cross", None) is not None:
            continue  # added K/V (UNetMidBlock2DSimpleCrossAttn), a normed context: diffusers' processors keep them
        if fuse_qkv:
            fuse_projections(m)
        m.set_processor(processor)
    return model


def fuse_projections(attn: nn.Module) -> nn.Module:
    """Self-attention: to_qkv = [to_q; to_k; to_v] (one GEMM over the image tokens instead of three).
    Cross-attention: to_kv = [to_k; to_v] over the text tokens (q reads the image tokens, so it stays apart).

    to_q/to_k/to_v keep working (other processors, unfusing) as views into the fused weights: no extra memory.
    A later .to(dtype) converts each parameter on its own and so undoes the sharing (not the results): apply
    precision first. Only plain nn.Linear projections are fused: a LoRA wrapper's extra path would be dropped (so
    its layer stays unfused), and a LoRA merged into to_q/to_k/to_v after fusing leaves the fused copy stale:
    merge LoRAs before the passes.
    """
    names = ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")
    fused_name = "to_kv" if attn.is_cross_attention else "to_qkv"
    if getattr(attn, fused_name, None) is not None:
        return attn  # already fused
    layers = [getattr(attn, n) for n in names]
    if any(type(lin) is not nn.Linear for lin in layers):  # LoRACompatibleLinear, peft's lora.Linear
        return attn
    weight = torch.cat([lin.weight.detach() for lin in layers])  # (parts * inner, in_features)
    bias = torch.cat([lin.bias.detach() for lin in layers]) if layers[0].bias is not None else None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    rows = 0
    for lin in layers:
        n = lin.out_features
        lin.weight = nn.Parameter(weight[rows:rows + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[rows:rows + n], requires_grad=False)
        rows += n
    setattr(attn, fused_name, fused)
    return attn


# ---- GEGLU ------------------------------------------------------------------------------------------------------


def use_sdrt_geglu(model: nn.Module, kernel: bool = True) -> nn.Module:
    """Swap every diffusers GEGLU of `model` (exactly that class: its subclasses may compute otherwise) for GegluAct."""
    from diffusers.models.activations import GEGLU

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is GEGLU:
                setattr(parent, name, GegluAct(child, kernel=kernel))
    return model


def use_sdrt_transformer_blocks(model: nn.Module, kernel: bool = True) -> nn.Module:
    """Swap every BasicTransformerBlock of `model` that SD's configuration uses for TransformerBlock."""
    from diffusers.models.attention import BasicTransformerBlock

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is BasicTransformerBlock and _plain_transformer_block(child):
                setattr(parent, name, TransformerBlock(child, kernel=kernel))
    return model


def _plain_transformer_block(m) -> bool:
    # What TransformerBlock computes: LayerNorms (not ada*/i2vgen), no positional embedding, no GLIGEN fuser, no
    # feed-forward chunking, self-attention in attn1 (only_cross_attention would feed it the text), and a
    # feed-forward of activation (projection in), dropout, nn.Linear out (no final dropout).
    from diffusers.models.attention import FeedForward

    return (m.norm_type == "layer_norm" and m.pos_embed is None and not hasattr(m, "fuser")
            and m._chunk_size is None and not m.only_cross_attention
            and all(type(n) is nn.LayerNorm for n in (m.norm1, m.norm2, m.norm3) if n is not None)
            and m.norm3 is not None
            and type(m.ff) is FeedForward and len(m.ff.net) == 3 and type(m.ff.net[2]) is nn.Linear)


# ---- GroupNorm (+ SiLU) ----------------------------------------------------------------------------------------


def use_sdrt_group_norm(model: nn.Module, kernel: bool = True) -> nn.Module:
    """Swap every nn.GroupNorm of `model` for GroupNormAct, fusing the SiLU that diffusers applies right after, and
    every SD resnet block for ResnetBlock (which also folds the time-embedding add into norm2)."""
    from diffusers.models.resnet import ResnetBlock2D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is ResnetBlock2D and _fusable_resnet(child):  # exactly: a subclass may compute more
                setattr(parent, name, ResnetBlock(child, kernel=kernel))
    _hoist_time_act(model)
    for m in list(model.modules()):
        if _is_group_norm(getattr(m, "conv_norm_out", None)) and isinstance(getattr(m, "conv_act", None), nn.SiLU):
            # UNet2DConditionModel / VAE Encoder / Decoder: conv_norm_out -> conv_act -> conv_out, nothing between
            m.conv_norm_out = GroupNormAct(m.conv_norm_out, silu=True, kernel=kernel)
            m.conv_act = nn.Identity()
    for parent in list(model.modules()):  # the rest: transformer input norms, attention group norms
        for name, child in list(parent.named_children()):
            if _is_group_norm(child) and name != "norm_cross":  # diffusers' processors type-check that one
                setattr(parent, name, GroupNormAct(child, silu=False, kernel=kernel))
    return model


def _hoist_time_act(unet: nn.Module) -> None:
    """Every SD resnet block applies SiLU to the same time embedding before its projection: 22 identical (2, 1280)
    kernels a UNet step in SD 1.5 (~2 us each even inside a CUDA graph). Where the UNet has no activation of its own
    on the embedding (time_embed_act, a diffusers config option) and every module that consumes it is a ResnetBlock,
    the UNet applies it once and the blocks skip theirs."""
    consumers = time_resnets(unet)
    if consumers is None or unet.time_embed_act is not None or any(m.skip_time_act for m in consumers):
        return
    unet.time_embed_act = nn.SiLU()
    for m in consumers:
        m.skip_time_act = True


def _is_group_norm(m) -> bool:
    return type(m) is nn.GroupNorm  # exactly: AdaGroupNorm / SpatialNorm compute something else


def _fusable_resnet(m) -> bool:
    # "default" adds temb before norm2, and anything else but "scale_shift" ignores temb (the VAE decoder's "group");
    # "scale_shift" modulates after norm2, so SiLU would not follow the norm there.
    return (_is_group_norm(m.norm1) and _is_group_norm(m.norm2) and isinstance(m.nonlinearity, nn.SiLU)
            and m.time_embedding_norm != "scale_shift")
