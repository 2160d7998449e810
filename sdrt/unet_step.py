"""The UNet as the torch backend's denoising loop runs it: the time embedding of every step computed before the first.

diffusers' UNet2DConditionModel.forward turns each step's timestep into the embedding the resnets add before norm2:
the sinusoidal projection, a 2-layer MLP, SDXL's added conditioning (pooled text and size ids through their own
MLP), the activation, and in each resnet a (B, 1280) x (1280, C) projection. sd15: 37 tiny kernels a step, 24 of
them GEMMs; none of them depends on the latents, so they can all run before the loop, batched over the S steps:

    time_adds(unet, timesteps (S,), batch, text_embeds, time_ids) -> {ResnetBlock: (S, B, C_out)}   once per loop
    forward(unet, sample (B, 4, h, w), StepEmbedding(adds, i), text (B, 77, C_text)) -> (B, 4, h, w)   each step

`forward` is diffusers' forward for what `supports` accepts (SD 1.x, 2.x and XL after sdrt.passes: SD's block types,
every resnet an sdrt ResnetBlock, no class or image conditioning, no ControlNet residuals), with the embedding given
instead of computed: each ResnetBlock reads its row of the table (sdrt.blocks.StepEmbedding). tests/test_unet_step.py
holds it to diffusers' forward.
"""

from __future__ import annotations

import torch
from torch import nn

from sdrt.blocks import ResnetBlock, StepEmbedding, time_resnets


def supports(unet: nn.Module) -> bool:
    """Whether `forward` computes what diffusers' forward does for this UNet (else the caller runs diffusers')."""
    if time_resnets(unet) is None:
        return False
    cfg = unet.config
    return (unet.class_embedding is None and cfg.addition_embed_type in (None, "text_time")
            and unet.encoder_hid_proj is None and not cfg.center_input_sample
            and unet.time_embedding.cond_proj is None and getattr(unet, "position_net", None) is None)


def time_adds(unet: nn.Module, timesteps: torch.Tensor, batch: int, text_embeds=None,
              time_ids=None) -> dict[nn.Module, torch.Tensor]:
    """Every ResnetBlock's norm2 add for every step: {block: (S, batch, C_out)}.

    timesteps (S,): the UNet's timestep input of each step (the same for all rows of a step). text_embeds (batch, P)
    and time_ids (batch, 6): SDXL's added conditioning, the same in every step. Computed as diffusers' forward does
    for one step, with S (times batch) rows in each GEMM instead of batch.
    """
    steps = timesteps.shape[0]
    emb = unet.time_embedding(unet.time_proj(timesteps.to(torch.float32)).to(unet.dtype))[:, None]  # (S, 1, C_emb)
    if unet.config.addition_embed_type == "text_time":  # (batch, C_emb): per row, the same in every step
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=None,
                                 added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
        emb = emb + aug[None]  # (S, batch, C_emb)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    adds = {}  # SD 1/2: one row a step, broadcast over the batch (stride 0: group_norm reads add by its strides)
    for m in unet.modules():
        if isinstance(m, ResnetBlock) and (add := m.time_add(emb)) is not None:
            adds[m] = add.expand(steps, batch, add.shape[-1])
    return adds


def forward(unet: nn.Module, sample: torch.Tensor, temb: StepEmbedding, text: torch.Tensor) -> torch.Tensor:
    """diffusers' UNet2DConditionModel.forward(sample, timestep, text) for a UNet that `supports`, the timestep's
    embedding given as temb. sample (B, 4, h, w) -> noise prediction (B, 4, h, w)."""
    # a latent size the upsamplers cannot double back to: each up block is told its skip's size (diffusers' rule)
    odd = any(d % 2**unet.num_upsamplers for d in sample.shape[-2:])
    sample = unet.conv_in(sample)
    skips = (sample,)
    for block in unet.down_blocks:
        text_kw = {"encoder_hidden_states": text} if getattr(block, "has_cross_attention", False) else {}
        sample, res = block(hidden_states=sample, temb=temb, **text_kw)
        skips += res
    if unet.mid_block is not None:
        text_kw = {"encoder_hidden_states": text} if getattr(unet.mid_block, "has_cross_attention", False) else {}
        sample = unet.mid_block(sample, temb, **text_kw)
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if odd and i < len(unet.up_blocks) - 1 else None
        text_kw = {"encoder_hidden_states": text} if getattr(block, "has_cross_attention", False) else {}
        sample = block(hidden_states=sample, temb=temb, res_hidden_states_tuple=res, upsample_size=size, **text_kw)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)
