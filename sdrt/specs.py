"""Model specs as data: one frozen dataclass per architecture and a dict of named presets.

A preset carries the diffusers configs of every component, so `tiny`, `sd15`, `sd21`, `sdxl` and `sd-turbo`
can be built with seeded random weights (no download) and so a single-file checkpoint can borrow its
architecture. Family and prediction type are enums/strings read off the configs, never guessed from names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Family(str, enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"


# Scheduler configs as the released checkpoints ship them (scheduler/scheduler_config.json).
_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PNDM_SD15 = dict(_class_name="PNDMScheduler", **_SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True,
                 steps_offset=1, clip_sample=False, prediction_type="epsilon", timestep_spacing="leading")
DDIM_SD21 = dict(_class_name="DDIMScheduler", **_SD_BETAS, set_alpha_to_one=False, steps_offset=1,
                 clip_sample=False, prediction_type="v_prediction", timestep_spacing="leading")
EULER_SDXL = dict(_class_name="EulerDiscreteScheduler", **_SD_BETAS, steps_offset=1, prediction_type="epsilon",
                  timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
                  clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)  # what --scheduler ddim/pndm read
EULER_TURBO = dict(EULER_SDXL, timestep_spacing="trailing", steps_offset=1)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family
    unet: dict                     # UNet2DConditionModel config
    vae: dict                      # AutoencoderKL config
    text_encoders: tuple[dict, ...]  # CLIPTextConfig kwargs; "projection": True -> CLIPTextModelWithProjection
    scheduler: dict                # diffusers scheduler config
    default_size: int              # pixels, square
    default_steps: int = 30
    default_guidance: float = 7.5
    default_scheduler: str = "pndm"

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")

    @property
    def vae_scale(self) -> float:
        return float(self.vae.get("scaling_factor", 0.18215))


# --- text encoders (CLIPTextConfig kwargs). vocab_size is the CLIP BPE size; the builtin tokenizer's ids fit in it.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# SD 2.x ships OpenCLIP ViT-H with its last layer already dropped (23 of 24 layers).
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                     projection=True)

# --- VAEs
VAE_SD = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
# SDXL's VAE overflows in fp16 (force_upcast): exporters keep it in fp32.
VAE_SDXL = dict(VAE_SD, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# --- UNets
_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
UNET_SD15 = dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32)
UNET_SD21 = dict(UNET_SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)
UNET_SDXL = dict(sample_size=128, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)

# `tiny`: SD-1.x-shaped (2 cross-attention levels + 1 plain, a cross-attention mid block, VAE downsampling 8x,
# CLIP text encoder) at a few million parameters, so every test runs the real code paths in seconds.
TINY_TEXT = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64,
                 attention_head_dim=8, norm_num_groups=32)
TINY_VAE = dict(VAE_SD, block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64)
# Tiny SD 2.x (linear projections, per-level head dims, v-prediction) and SDXL (two encoders, pooled text embeds,
# micro-conditioning, fp32-only VAE) so each family's code path is tested, not just SD 1.x.
TINY_SD2_UNET = dict(TINY_UNET, use_linear_projection=True, attention_head_dim=(2, 4, 4))
TINY_SDXL_TEXT2 = dict(TINY_TEXT, hidden_size=32, intermediate_size=64, projection_dim=32, hidden_act="gelu",
                       projection=True)
TINY_SDXL_UNET = dict(TINY_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64 + 32,
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8)  # pooled text (32) + 6 time ids x 8

PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("tiny", Family.SD1, TINY_UNET, TINY_VAE, (TINY_TEXT,), PNDM_SD15, default_size=64,
                      default_steps=10),
    "tiny-sd2": ModelSpec("tiny-sd2", Family.SD2, TINY_SD2_UNET, TINY_VAE, (dict(TINY_TEXT, hidden_act="gelu"),),
                          DDIM_SD21, default_size=64, default_steps=10, default_scheduler="ddim"),
    "tiny-sdxl": ModelSpec("tiny-sdxl", Family.SDXL, TINY_SDXL_UNET, dict(TINY_VAE, scaling_factor=0.13025,
                           force_upcast=True), (TINY_TEXT, TINY_SDXL_TEXT2), EULER_SDXL, default_size=64,
                           default_steps=10, default_guidance=5.0, default_scheduler="euler"),
    "sd15": ModelSpec("sd15", Family.SD1, UNET_SD15, VAE_SD, (CLIP_L,), PNDM_SD15, default_size=512),
    "sd21": ModelSpec("sd21", Family.SD2, UNET_SD21, VAE_SD, (OPENCLIP_H,), DDIM_SD21, default_size=768,
                      default_scheduler="ddim"),
    # SD 2.x 512 px "base" models: sd21's weights, epsilon prediction. A single file cannot say which: --arch does.
    "sd21-base": ModelSpec("sd21-base", Family.SD2, dict(UNET_SD21, sample_size=64), VAE_SD, (OPENCLIP_H,),
                           dict(DDIM_SD21, prediction_type="epsilon"), default_size=512, default_scheduler="ddim"),
    "sdxl": ModelSpec("sdxl", Family.SDXL, UNET_SDXL, VAE_SDXL, (CLIP_L, OPENCLIP_BIGG), EULER_SDXL,
                      default_size=1024, default_guidance=5.0, default_scheduler="euler"),
    "sd-turbo": ModelSpec("sd-turbo", Family.SD2, dict(UNET_SD21, sample_size=64), VAE_SD, (OPENCLIP_H,),
                          EULER_TURBO, default_size=512, default_steps=1, default_guidance=0.0,
                          default_scheduler="euler"),
}


PRESET_NAMES = tuple(PRESETS)
