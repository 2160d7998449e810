"""Optimization passes: plain functions `model -> model` over one diffusers UNet or VAE instance.

Each pass edits the module tree of the instance it is given (and returns it), never a diffusers class, so a second
model loaded in the same process stays stock. They compose in any order; the torch backend applies

    to_precision(m, dtype) -> use_sdrt_attention(m) -> use_sdrt_group_norm(m) -> to_channels_last(m)

  use_sdrt_attention   every diffusers `Attention` gets SdrtAttnProcessor (through the public Attention.set_processor):
                       q/k/v from one fused projection (self-attention: to_qkv, cross-attention: to_kv over the text),
                       read as strided views by sdrt.kernels.attention (flash attention, no (N, N) matrix).
  use_sdrt_group_norm  nn.GroupNorm -> GroupNormAct calling sdrt.kernels.group_norm; where SiLU follows the norm
                       (ResnetBlock2D's norm1/norm2, the UNet's and VAE's conv_norm_out/conv_act) the SiLU is fused
                       into the kernel and that instance's activation becomes nn.Identity.
  to_channels_last     NHWC weights: cuDNN's fastest convolutions, and copy-free (B, HW, C) views for attention.
  to_precision         one dtype for every parameter.

`kernel=False` keeps the same module structure but computes with PyTorch ops (SDPA, F.group_norm): the fast path on
CPU, where the Triton kernels only run under the interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def to_precision(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    if any(p.dtype != dtype for p in model.parameters()):  # diffusers warns on every .to(dtype), even a no-op
        model.to(dtype)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    # Only 4-D parameters (conv weights) change; inputs must be made channels-last by the caller.
    return model.to(memory_format=torch.channels_last)


# ---- attention -------------------------------------------------------------------------------------------------


# The flash kernel keeps a (BLOCK_M, d) tile in registers; the SD VAE's single-head attention (d = 512) goes through
# SDPA instead (it runs once per image at the lowest resolution, so it is not where the time goes).
MAX_KERNEL_HEAD_DIM = 256


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
        if fuse_qkv:
            fuse_projections(m)
        m.set_processor(processor)
    return model


def fuse_projections(attn: nn.Module) -> nn.Module:
    """Self-attention: to_qkv = [to_q; to_k; to_v] (one GEMM over the image tokens instead of three).
    Cross-attention: to_kv = [to_k; to_v] over the text tokens (q reads the image tokens, so it stays apart).

    to_q/to_k/to_v keep working (other processors, unfusing) as views into the fused weights: no extra memory.
    A later .to(dtype) converts each parameter on its own and so undoes the sharing (not the results): apply
    precision first.
    """
    names = ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")
    fused_name = "to_kv" if attn.is_cross_attention else "to_qkv"
    if getattr(attn, fused_name, None) is not None:
        return attn  # already fused
    layers = [getattr(attn, n) for n in names]
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


def _heads(t: torch.Tensor, parts: int, heads: int) -> list[torch.Tensor]:
    # (B, N, parts * heads * d) -> parts tensors (B, heads, N, d): strided views, nothing copied
    b, n, _ = t.shape
    return list(t.view(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0))


class SdrtAttnProcessor:
    """diffusers AttnProcessor2_0's computation with fused projections and sdrt's flash-attention kernel.

    One stateless instance serves every Attention layer; the fused weights live on each layer (to_qkv / to_kv).
    """

    def __init__(self, kernel: bool = True):
        self.kernel = kernel

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:  # the VAE's mid-block attention: (B, C, H, W) -> (B, HW, C), a free view when channels-last
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:  # normalises channels: (B, C, HW)
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        heads = attn.heads

        if encoder_hidden_states is None:  # self-attention
            if getattr(attn, "to_qkv", None) is not None:
                q, k, v = _heads(attn.to_qkv(hidden_states), 3, heads)
            else:
                q, k, v = (_heads(p(hidden_states), 1, heads)[0] for p in (attn.to_q, attn.to_k, attn.to_v))
        else:  # cross-attention over the text tokens (B, 77, C_text)
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            q = _heads(attn.to_q(hidden_states), 1, heads)[0]
            if getattr(attn, "to_kv", None) is not None:
                k, v = _heads(attn.to_kv(context), 2, heads)
            else:
                k, v = (_heads(p(context), 1, heads)[0] for p in (attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        # q (B, heads, N, d), k/v (B, heads, Nk, d) -> (B, heads, N, d)
        if attention_mask is not None:  # SD never masks; keep diffusers' semantics through SDPA
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        elif self.kernel and q.shape[-1] <= MAX_KERNEL_HEAD_DIM:
            from sdrt.kernels import attention

            out = attention(q, k, v, scale=attn.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)  # (B, N, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image:  # (B, HW, C) -> (B, C, H, W) as a channels-last view: no copy
            out = out.view(b, h, w, c).permute(0, 3, 1, 2)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---- GroupNorm (+ SiLU) ----------------------------------------------------------------------------------------


class GroupNormAct(nn.Module):
    """nn.GroupNorm, optionally followed by SiLU, in one sdrt.kernels.group_norm call (stats in fp32).

    Takes over the GroupNorm's own weight/bias parameters, so the state dict keeps its keys.
    """

    def __init__(self, norm: nn.GroupNorm, silu: bool = False, kernel: bool = True):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.weight, self.bias = norm.weight, norm.bias  # (C,) or None when affine=False
        self.silu, self.kernel = silu, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # (B, C, N): the VAE attention's group_norm; the kernel wants (N, C, H, W)
            return self.forward(x.unsqueeze(-1)).squeeze(-1)
        if self.kernel:
            from sdrt.kernels import group_norm

            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.silu else y

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, silu={self.silu}, kernel={self.kernel}"


def use_sdrt_group_norm(model: nn.Module, kernel: bool = True) -> nn.Module:
    """Swap every nn.GroupNorm of `model` for GroupNormAct, fusing the SiLU that diffusers applies right after."""
    from diffusers.models.resnet import ResnetBlock2D

    for m in list(model.modules()):
        if isinstance(m, ResnetBlock2D) and _fusable_resnet(m):
            # forward: norm1 -> nonlinearity -> conv1; (+temb) norm2 -> nonlinearity -> dropout -> conv2;
            # and temb -> nonlinearity -> time_emb_proj. With nonlinearity = Identity on THIS instance, the temb
            # path keeps its SiLU inside time_emb_proj.
            m.norm1 = GroupNormAct(m.norm1, silu=True, kernel=kernel)
            m.norm2 = GroupNormAct(m.norm2, silu=True, kernel=kernel)
            if m.time_emb_proj is not None and not m.skip_time_act:
                m.time_emb_proj = nn.Sequential(nn.SiLU(), m.time_emb_proj)
            m.nonlinearity = nn.Identity()
        elif _is_group_norm(getattr(m, "conv_norm_out", None)) and isinstance(getattr(m, "conv_act", None), nn.SiLU):
            # UNet2DConditionModel / VAE Encoder / Decoder: conv_norm_out -> conv_act -> conv_out, nothing between
            m.conv_norm_out = GroupNormAct(m.conv_norm_out, silu=True, kernel=kernel)
            m.conv_act = nn.Identity()
    for parent in list(model.modules()):  # the rest: transformer input norms, attention group norms
        for name, child in list(parent.named_children()):
            if _is_group_norm(child):
                setattr(parent, name, GroupNormAct(child, silu=False, kernel=kernel))
    return model


def _is_group_norm(m) -> bool:
    return type(m) is nn.GroupNorm  # exactly: AdaGroupNorm / SpatialNorm compute something else


def _fusable_resnet(m) -> bool:
    # "default" adds temb before norm2 (the VAE's "group" has no temb); "scale_shift" modulates after norm2, so
    # SiLU would not follow the norm there.
    return (_is_group_norm(m.norm1) and _is_group_norm(m.norm2) and isinstance(m.nonlinearity, nn.SiLU)
            and m.time_embedding_norm != "scale_shift")
