"""ONNX export metadata as data: one `GraphSpec` per submodel plus a thin wrapper that fixes its forward signature.

Components and their fixed I/O (the ONNX contract; backends and int8 read these names from the manifest):

    text_encoder[_2]  input_ids (B, 77) int64 -> last_hidden_state (B, 77, C), pooled_output (B, P)
                      [+ penultimate_hidden_state (B, 77, C) for SDXL, which conditions on hidden_states[-2]]
    unet              sample (B, 4, h, w), timestep (B,) fp32, encoder_hidden_states (B, 77, X)
                      [+ text_embeds (B, P2), time_ids (B, 6) for SDXL] -> noise_pred (B, 4, h, w)
    vae_decoder       latent (B, 4, h, w) -> image (B, 3, 8h, 8w)        (post_quant_conv + decoder, no scaling)
    vae_encoder       image (B, 3, H, W) -> latent (B, 8, H/8, W/8)       (moments = mean || logvar, no scaling)

Sizes. Every graph is traced once and serves every batch and every H, W that is a multiple of 8. diffusers' UNet
picks its upsampling mode from the traced size: when the latent is a multiple of 2**num_upsamplers it upsamples by
a fixed factor 2 (which breaks on other sizes), otherwise it resizes each level to its skip connection's shape.
We therefore trace at a latent size that is NOT such a multiple, so the size-following path is recorded; it gives
the same result on every size (nearest resize to exactly 2n equals upsampling by 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
TOKENS = 77  # CLIP context length: fixed, not a dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str        # as exported in fp32 ("float32" | "int64"); fp16 graphs turn float32 into float16
    shape: tuple      # ints and axis names, e.g. ("batch", 4, "latent_height", "latent_width")
    fill: str = "randn"  # how sample inputs are drawn: randn | tokens | timestep | time_ids


@dataclass(frozen=True)
class GraphSpec:
    name: str
    module: torch.nn.Module          # the wrapper; its forward takes the inputs below in order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    fp16: bool = True                # False: stays fp32 in fp16 exports (SDXL's VAE overflows in fp16)
    keep_fp32_inputs: tuple[str, ...] = ()  # fp16 graphs keep these inputs, and their sinusoidal embeddings, fp32
    fp32_attention_scores: bool = False     # fp16 graphs compute QK^T and softmax in fp32 (SD 2.x overflows)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.inputs + self.outputs}

    def sample_inputs(self, batch: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Inputs for a batch at height x width pixels, drawn from a fixed seed (the same for torch and ORT)."""
        g = torch.Generator().manual_seed(seed)
        dims = {"batch": batch, "height": height, "width": width, "latent_height": height // 8,
                "latent_width": width // 8}
        return tuple(_fill(t, [dims.get(d, d) for d in t.shape], height, width, self.module, g) for t in self.inputs)


def _fill(t: TensorSpec, shape: list[int], height: int, width: int, module, g) -> torch.Tensor:
    if t.fill == "tokens":  # bos, a few random tokens, then eos padding as the CLIP tokenizer writes them
        cfg = module.model.config
        ids = torch.randint(0, min(cfg.vocab_size, 900), shape, generator=g)
        lengths = torch.randint(1, shape[1] - 1, (shape[0],), generator=g)
        ids[torch.arange(shape[1]) > lengths[:, None]] = cfg.eos_token_id
        ids[torch.arange(shape[0]), lengths] = cfg.eos_token_id
        ids[:, 0] = cfg.bos_token_id
        return ids
    if t.fill == "timestep":  # fractional timesteps too: Euler-type samplers interpolate them
        return torch.rand(shape, generator=g) * 999.0
    if t.fill == "time_ids":  # SDXL micro-conditioning: original size, crop top-left, target size
        return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32).repeat(shape[0], 1)
    return torch.randn(shape, generator=g)


# --- thin wrappers: fixed positional signatures, tuple outputs, nothing else.
class TextEncoder(torch.nn.Module):
    def __init__(self, model, penultimate: bool):
        super().__init__()
        self.model, self.penultimate = model, penultimate

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=self.penultimate)
        # CLIPTextModelWithProjection (SDXL's 2nd encoder) returns the projected text_embeds as its pooled output
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        if self.penultimate:
            return out.last_hidden_state, pooled, out.hidden_states[-2]
        return out.last_hidden_state, pooled


class UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        if self.vae.post_quant_conv is not None:
            latent = self.vae.post_quant_conv(latent)
        return self.vae.decoder(latent)


class VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        moments = self.vae.encoder(image)
        return moments if self.vae.quant_conv is None else self.vae.quant_conv(moments)


def graph_specs(c) -> dict[str, GraphSpec]:
    """All exportable graphs of `sdrt.models.Components`, in export order."""
    from sdrt.specs import Family

    sdxl = c.family is Family.SDXL
    specs = {}
    for i, te in enumerate(c.text_encoders):
        width = te.config.hidden_size
        pooled = te.config.projection_dim if hasattr(te, "text_projection") else width
        outs = [TensorSpec("last_hidden_state", "float32", ("batch", TOKENS, width)),
                TensorSpec("pooled_output", "float32", ("batch", pooled))]
        if sdxl:
            outs.append(TensorSpec("penultimate_hidden_state", "float32", ("batch", TOKENS, width)))
        name = "text_encoder" + ("_2" if i else "")
        specs[name] = GraphSpec(name, TextEncoder(te, sdxl), (TensorSpec("input_ids", "int64", ("batch", TOKENS),
                                                                         "tokens"),), tuple(outs))

    u = c.unet.config
    lat = ("batch", u.in_channels, "latent_height", "latent_width")
    ins = [TensorSpec("sample", "float32", lat), TensorSpec("timestep", "float32", ("batch",), "timestep"),
           TensorSpec("encoder_hidden_states", "float32", ("batch", TOKENS, u.cross_attention_dim))]
    keep = ["timestep"]
    if sdxl:
        pooled = u.projection_class_embeddings_input_dim - 6 * u.addition_time_embed_dim
        ins += [TensorSpec("text_embeds", "float32", ("batch", pooled)),
                TensorSpec("time_ids", "float32", ("batch", 6), "time_ids")]
        keep.append("time_ids")
    specs["unet"] = GraphSpec("unet", UNet(c.unet), tuple(ins),
                              (TensorSpec("noise_pred", "float32", ("batch", u.out_channels) + lat[2:]),),
                              keep_fp32_inputs=tuple(keep), fp32_attention_scores=c.family is Family.SD2)

    v = c.vae.config
    vae_fp16 = not c.vae_force_upcast  # SDXL's VAE (see Components.vae_force_upcast)
    latent = TensorSpec("latent", "float32", ("batch", v.latent_channels, "latent_height", "latent_width"))
    image = TensorSpec("image", "float32", ("batch", v.out_channels, "height", "width"))
    specs["vae_decoder"] = GraphSpec("vae_decoder", VaeDecoder(c.vae), (latent,), (image,), fp16=vae_fp16)
    moments = TensorSpec("latent", "float32", ("batch", 2 * v.latent_channels, "latent_height", "latent_width"))
    specs["vae_encoder"] = GraphSpec("vae_encoder", VaeEncoder(c.vae), (image,), (moments,), fp16=vae_fp16)
    return specs


def size_bounds(c) -> dict[str, int]:
    """Pixel sizes one export serves, as data for the runtime: H and W multiples of `size_multiple` in
    [min_size, max_size]. min_size keeps the UNet's lowest level at least 1x1 without relying on odd-size rounding;
    max_size is what backends should build shape profiles for (the ONNX graphs themselves have no upper bound)."""
    factor = 8 * 2 ** c.unet.num_upsamplers  # pixels per latent cell at the UNet's lowest level
    return {"size_multiple": 8, "min_size": factor, "max_size": 2 * c.default_size}


def trace_shape(c) -> tuple[int, int, int]:
    """(batch, height, width) the graphs are traced at: latent 1.5x and 2.5x the UNet's overall factor, so not a
    multiple of it (see the module docstring); sd15: 96x160 px (latent 12x20), tiny: 48x80 px (latent 6x10)."""
    m = size_bounds(c)["min_size"]
    return 1, m * 3 // 2, m * 5 // 2


def check_shape(c) -> tuple[int, int, int]:
    """(batch, height, width) validated on ONNX Runtime: a different batch and a size the trace never saw, odd in
    latent cells so the size-following upsampling is exercised; sd15: 2 x 72x88 px, tiny: 2 x 40x56 px."""
    m = size_bounds(c)["min_size"]
    return 2, m + 8, m + 24
