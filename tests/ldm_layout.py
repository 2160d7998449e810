"""Test-side writer: diffusers-layout Components -> the original CompVis/LDM/SGM single-file key layout.

The inverse of what sdrt.checkpoint reads (after diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py
and convert_diffusers_to_original_sdxl.py), generalised from their hard-coded SD block counts to any preset's config:
key renames, OpenCLIP's fused q/k/v `in_proj`, and the VAE mid-block attention stored as 1x1 convs. It also writes
the extras released files carry and a loader must ignore (CLIP's old position_ids buffer, OpenCLIP's logit_scale
and SD 2.x's unused text_projection, the UNet's noise schedule).
"""

from __future__ import annotations

import torch

from sdrt.specs import Family

UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
OPENCLIP_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                  ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def to_ldm_state_dict(c) -> dict[str, torch.Tensor]:
    out = {"alphas_cumprod": torch.linspace(1.0, 0.005, 1000)}  # LDM files keep the schedule; loaders ignore it
    out.update(rename(c.unet.state_dict(), unet_prefixes(c.unet.config), "model.diffusion_model."))
    vae = rename(c.vae.state_dict(), vae_prefixes(c.vae.config), "first_stage_model.")
    for k, v in vae.items():
        if ".mid.attn_1." in k and v.ndim == 2:  # LDM's VAE attention is 1x1 convs: (C, C) -> (C, C, 1, 1)
            v = v[:, :, None, None]
        out[k] = v
    if c.family is Family.SD1:
        out.update(hf_clip(c.text_encoders[0], "cond_stage_model.transformer."))
    elif c.family is Family.SD2:
        out.update(open_clip(c.text_encoders[0], "cond_stage_model.model."))
        hidden, proj = c.text_encoders[0].config.hidden_size, c.text_encoders[0].config.projection_dim
        out["cond_stage_model.model.text_projection"] = torch.zeros(hidden, proj)  # in SD 2.x files, unused
    else:
        out.update(hf_clip(c.text_encoders[0], "conditioner.embedders.0.transformer."))
        out.update(open_clip(c.text_encoders[1], "conditioner.embedders.1.model."))
    # safetensors refuses shared storage and wants contiguous tensors
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def rename(sd: dict, prefixes: list[tuple], root: str) -> dict:
    """Swap each key's diffusers prefix for its LDM one, then rename parts of the rest; unmatched keys are kept."""
    out = {}
    for k, v in sd.items():
        for d, ldm, parts in prefixes:
            if k.startswith(d):
                rest = "." + k[len(d):]
                for a, b in parts:
                    rest = rest.replace(f".{a}.", f".{b}.")
                k = ldm + rest[1:]
                break
        out[root + k] = v
    return out


def unet_prefixes(cfg) -> list[tuple]:
    """(diffusers prefix, LDM prefix, renames inside) for a UNet2DConditionModel config."""
    L, n = cfg.layers_per_block, len(cfg.block_out_channels)
    m = [("time_embedding.linear_1.", "time_embed.0.", ()), ("time_embedding.linear_2.", "time_embed.2.", ()),
         ("add_embedding.linear_1.", "label_emb.0.0.", ()), ("add_embedding.linear_2.", "label_emb.0.2.", ()),
         ("conv_in.", "input_blocks.0.0.", ()), ("conv_norm_out.", "out.0.", ()), ("conv_out.", "out.2.", ()),
         ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", ()),
         ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)]
    for b in range(n):
        for j in range(L):  # input_blocks: conv_in, then per level L (resnet, attention) pairs and a downsampler
            i = 1 + b * (L + 1) + j
            m += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0.", UNET_RESNET),
                  (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.", ())]
        m.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{1 + b * (L + 1) + L}.0.op.", ()))
        for j in range(L + 1):  # output_blocks: per level L+1 (resnet, attention[, upsampler on the last])
            i = b * (L + 1) + j
            m += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0.", UNET_RESNET),
                  (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.", ())]
        slot = 2 if "CrossAttn" in cfg.up_block_types[b] else 1
        m.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{b * (L + 1) + L}.{slot}.conv.", ()))
    return m


def vae_prefixes(cfg) -> list[tuple]:
    n, shortcut = len(cfg.block_out_channels), (("conv_shortcut", "nin_shortcut"),)
    m = []
    for part in ("encoder", "decoder"):
        m += [(f"{part}.conv_norm_out.", f"{part}.norm_out.", ()),
              (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION),
              (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", shortcut),
              (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", shortcut)]
    for b in range(n):  # the LDM decoder numbers its levels from the bottom: diffusers' up_blocks.b is up.(n-1-b)
        m += [(f"encoder.down_blocks.{b}.resnets.", f"encoder.down.{b}.block.", shortcut),
              (f"encoder.down_blocks.{b}.downsamplers.0.", f"encoder.down.{b}.downsample.", ()),
              (f"decoder.up_blocks.{b}.resnets.", f"decoder.up.{n - 1 - b}.block.", shortcut),
              (f"decoder.up_blocks.{b}.upsamplers.0.", f"decoder.up.{n - 1 - b}.upsample.", ())]
    return m


def hf_clip(te, prefix: str) -> dict:
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in te.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(te.config.max_position_embeddings)[None]  # old buffer
    return {prefix + k: v for k, v in sd.items()}


def open_clip(te, prefix: str) -> dict:
    sd = {k.removeprefix("text_model."): v for k, v in te.state_dict().items()}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
           prefix + "logit_scale": torch.tensor(4.6052)}
    if "text_projection.weight" in sd:  # nn.Linear (proj, hidden) -> OpenCLIP's x @ P with P (hidden, proj)
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T
    for i in range(te.config.num_hidden_layers):
        d, o = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.in_proj_{kind}"] = torch.cat([sd.pop(d + f"self_attn.{x}_proj.{kind}") for x in "qkv"])
        for a, b in OPENCLIP_LAYER:
            for kind in ("weight", "bias"):
                out[o + f"{b}.{kind}"] = sd.pop(d + f"{a}.{kind}")
    assert not sd, f"open_clip: unconverted keys {list(sd)[:3]}"
    return out
