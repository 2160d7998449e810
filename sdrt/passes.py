"""Optimization passes: plain functions `model -> model` over one diffusers UNet or VAE instance.

Each pass edits the module tree of the instance it is given (and returns it), never a diffusers class, so a second
model loaded in the same process stays stock. They compose in any order; the torch backend applies

    to_precision(m, dtype) -> use_sdrt_attention(m) -> use_sdrt_group_norm(m) -> use_sdrt_geglu(m)
        -> to_channels_last(m)

  use_sdrt_attention   every diffusers `Attention` gets SdrtAttnProcessor (through the public Attention.set_processor):
                       q/k/v from one fused projection (self-attention: to_qkv, cross-attention: to_kv over the text),
                       read as strided views by sdrt.kernels.attention (flash attention, no (N, N) matrix).
  use_sdrt_group_norm  nn.GroupNorm -> GroupNormAct calling sdrt.kernels.group_norm; where SiLU follows the norm
                       (the UNet's and VAE's conv_norm_out/conv_act) the SiLU is fused into the kernel and that
                       instance's activation becomes nn.Identity. Each SD ResnetBlock2D becomes a ResnetBlock: both
                       SiLUs fused, the time-embedding add folded into norm2, no division by a scale of 1.
  use_sdrt_geglu       diffusers' GEGLU feed-forward activation -> GegluAct: the chunk, GELU and product in one
                       sdrt.kernels.geglu call.
  to_channels_last     NHWC weights: cuDNN's fastest convolutions, and copy-free (B, HW, C) views for attention;
                       Transformer2DModel outputs stay NHWC (no NCHW copy per transformer).
  to_precision         one dtype for every parameter.

`kernel=False` keeps the same module structure but computes with PyTorch ops (SDPA, F.group_norm): the fast path on
CPU, where the Triton kernels only run under the interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


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
            m._get_output_for_continuous_inputs = types.MethodType(_transformer_output_nhwc, m)
    return model.to(memory_format=torch.channels_last)


def _transformer_output_nhwc(self, hidden_states, residual, batch_size, height, width, inner_dim):
    # Transformer2DModel._get_output_for_continuous_inputs without its .contiguous(); hidden_states (B, HW, C).
    if not self.use_linear_projection:  # proj_out is a 1x1 conv: NHWC in, NHWC out
        hidden_states = self.proj_out(hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2))
    else:
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, height, width, -1).permute(0, 3, 1, 2)
    return hidden_states + residual


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

            # written token-major, (B, N, heads, d) seen as (B, heads, N, d): the reshape below is then a view
            out = q.new_empty(batch, tokens, heads, q.shape[-1]).transpose(1, 2)
            out = attention(q, k, v, scale=attn.scale, out=out)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)  # (B, N, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image:  # (B, HW, C) -> (B, C, H, W) as a channels-last view: no copy
            out = out.view(b, h, w, c).permute(0, 3, 1, 2)
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:  # 1 in SD: the division would be a full pass over out for nothing
            out = out / attn.rescale_output_factor
        return out


# ---- GEGLU ------------------------------------------------------------------------------------------------------


class GegluAct(nn.Module):
    """diffusers' GEGLU, `a, gate = proj(x).chunk(2, -1); a * gelu(gate)`, with chunk, GELU and product in one
    sdrt.kernels.geglu call. Eager runs gelu and mul as two kernels: for the projection's (tokens, 2F) output h they
    move 5 passes of a (tokens, F) tensor (gelu reads and writes one, mul reads two and writes one), the kernel 3
    (reads h once, writes y). SD 1.5 at 512^2: 16 feed-forwards a UNet step, h up to 8192 x 2560 fp16 (42 MB).
    Takes over the GEGLU's projection under the same name (state-dict keys unchanged)."""

    def __init__(self, geglu: nn.Module, kernel: bool = True):
        super().__init__()
        self.proj, self.kernel = geglu.proj, kernel

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.proj(hidden_states)  # (B, N, 2F)
        if self.kernel:
            from sdrt.kernels import geglu

            return geglu(h)
        a, gate = h.chunk(2, dim=-1)
        return a * F.gelu(gate)


def use_sdrt_geglu(model: nn.Module, kernel: bool = True) -> nn.Module:
    """Swap every diffusers GEGLU of `model` (exactly that class: its subclasses may compute otherwise) for GegluAct."""
    from diffusers.models.activations import GEGLU

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is GEGLU:
                setattr(parent, name, GegluAct(child, kernel=kernel))
    return model


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

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W) or (N, C, L); add (N, C) or None: normalise x + add[:, :, None, None], not materialised."""
        if x.ndim == 3:  # (B, C, N): the VAE attention's group_norm; the kernel wants (N, C, H, W)
            return self.forward(x.unsqueeze(-1), add).squeeze(-1)
        if self.kernel:
            from sdrt.kernels import group_norm

            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu, add=add)
        if add is not None:
            x = x + add[:, :, None, None]
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.silu else y

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, silu={self.silu}, kernel={self.kernel}"


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D as SD 1/2/XL and their VAEs configure it (SiLU, the time embedding added before
    norm2), with its elementwise steps folded into the GroupNorm kernel:

        h = GN1+SiLU(x) -> [up/downsample] -> conv1 -> GN2+SiLU(h + temb) -> dropout -> conv2;   out = shortcut(x) + h

    The stock block runs each SiLU, `h + temb` and `/ output_scale_factor` (1 in SD) as kernels of their own, each a
    full read and write of h. Built from a ResnetBlock2D, taking over its submodules under the same names, so the
    state dict keeps its keys; the temb SiLU runs here, ahead of time_emb_proj.
    """

    def __init__(self, block: nn.Module, kernel: bool = True):
        super().__init__()
        self.norm1 = GroupNormAct(block.norm1, silu=True, kernel=kernel)
        self.conv1, self.time_emb_proj, self.conv2 = block.conv1, block.time_emb_proj, block.conv2
        self.norm2 = GroupNormAct(block.norm2, silu=True, kernel=kernel)
        self.dropout, self.conv_shortcut = block.dropout, block.conv_shortcut
        self.upsample, self.downsample = block.upsample, block.downsample
        self.skip_time_act, self.output_scale_factor = block.skip_time_act, block.output_scale_factor
        self.adds_temb = block.time_embedding_norm == "default"  # else temb is ignored, as ResnetBlock2D does
        self.in_channels, self.out_channels = block.in_channels, block.out_channels

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        # input_tensor (B, C_in, H, W); temb (B, C_temb) or None (the VAE)
        h = self.norm1(input_tensor)
        if self.upsample is not None:
            if h.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails at large batches (diffusers#984)
                input_tensor, h = input_tensor.contiguous(), h.contiguous()
            input_tensor, h = self.upsample(input_tensor), self.upsample(h)
        elif self.downsample is not None:
            input_tensor, h = self.downsample(input_tensor), self.downsample(h)
        h = self.conv1(h)
        add = None
        if self.adds_temb and self.time_emb_proj is not None and temb is not None:  # (B, C_out): per sample, channel
            add = self.time_emb_proj(temb if self.skip_time_act else F.silu(temb))
        h = self.conv2(self.dropout(self.norm2(h, add)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        out = input_tensor + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


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
            if _is_group_norm(child):
                setattr(parent, name, GroupNormAct(child, silu=False, kernel=kernel))
    return model


def _hoist_time_act(unet: nn.Module) -> None:
    """Every SD resnet block applies SiLU to the same time embedding before its projection: 22 identical (2, 1280)
    kernels a UNet step in SD 1.5 (~2 us each even inside a CUDA graph). Where the UNet has no activation of its own
    on the embedding (time_embed_act, a diffusers config option) and every module that consumes it is a ResnetBlock,
    the UNet applies it once and the blocks skip theirs."""
    from diffusers import UNet2DConditionModel

    if type(unet) is not UNet2DConditionModel or unet.time_embed_act is not None:
        return
    consumers = [m for m in unet.modules() if hasattr(m, "time_emb_proj")]
    if not consumers or not all(isinstance(m, ResnetBlock) and not m.skip_time_act for m in consumers):
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
