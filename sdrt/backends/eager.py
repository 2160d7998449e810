"""Eager PyTorch: the loaded diffusers/transformers modules behind the backend verbs. The baseline.

It computes exactly what the ONNX graphs are specified to compute (same inputs, same output names), so every other
backend is checked against this one and this one against diffusers' own pipelines.
"""

from __future__ import annotations

import torch

from sdrt.backends import Precision, default_device
from sdrt.errors import SdrtError


def create(precision: Precision | None, components=None, onnx_dir=None, device=None) -> EagerBackend:
    precision = precision or Precision.FP32
    if components is None:
        raise SdrtError("the eager backend needs the model's PyTorch weights (components)")
    if precision is Precision.INT8:
        raise SdrtError("the eager backend runs fp32, fp16 or bf16; int8 needs onnxruntime or tensorrt")
    return EagerBackend(components, precision, device)


class EagerBackend:
    name = "eager"
    size_multiple = 8  # the VAE downsamples 8x; the UNet handles odd latent sizes itself (upsample_size)

    def __init__(self, components, precision: Precision = Precision.FP32, device=None):
        self.device = default_device(device)
        self.dtype = precision.torch_dtype
        self.precision = precision
        # SDXL's VAE overflows in fp16 (force_upcast): it stays fp32 whatever the precision.
        self.vae_dtype = torch.float32 if components.vae_force_upcast else self.dtype
        # Moved in place (no copy): a 7 GB model is not duplicated.
        self.text_encoders = [_place(te, self.device, self.dtype) for te in components.text_encoders]
        self.unet_module = _place(components.unet, self.device, self.dtype)
        self.vae = _place(components.vae, self.device, self.vae_dtype)

    @torch.inference_mode()
    def text_encoder(self, index: int, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # input_ids (B, 77) int64 -> last_hidden_state (B, 77, C), pooled_output (B, C or projection_dim),
        # penultimate_hidden_state (B, 77, C) = hidden_states[-2], what SDXL consumes.
        out = self.text_encoders[index](input_ids.to(self.device), output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return {"last_hidden_state": out.last_hidden_state, "pooled_output": pooled,
                "penultimate_hidden_state": out.hidden_states[-2]}

    @torch.inference_mode()
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None) -> torch.Tensor:
        # sample (B, 4, h, w), timestep (B,) float32, encoder_hidden_states (B, 77, C); SDXL: text_embeds (B, P),
        # time_ids (B, 6) -> noise_pred (B, 4, h, w)
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds.to(self.device, self.dtype),
                     "time_ids": time_ids.to(self.device, self.dtype)}
        return self.unet_module(sample.to(self.device, self.dtype), timestep.to(self.device),
                                encoder_hidden_states=encoder_hidden_states.to(self.device, self.dtype),
                                added_cond_kwargs=added, return_dict=False)[0]

    @torch.inference_mode()
    def vae_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        # latent (B, 4, h, w), already / vae_scale -> image (B, 3, 8h, 8w) in [-1, 1], not clamped
        return self.vae.decode(latent.to(self.device, self.vae_dtype), return_dict=False)[0]

    @torch.inference_mode()
    def vae_encoder(self, image: torch.Tensor) -> torch.Tensor:
        # image (B, 3, H, W) in [-1, 1] -> moments (B, 8, H/8, W/8): the quant_conv output, mean ‖ logvar
        h = self.vae.encoder(image.to(self.device, self.vae_dtype))
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h


def _place(module, device, dtype):
    # Only what changes: diffusers warns on every .to(dtype), even a no-op one.
    p = next(module.parameters())
    if p.dtype != dtype:
        module.to(dtype)
    if p.device != device:
        module.to(device)
    return module
