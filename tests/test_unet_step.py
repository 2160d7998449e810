"""sdrt.unet_step against diffusers' UNet2DConditionModel.forward, on the tiny presets after sdrt's passes, fp32 CPU.

Tolerance 2e-5 (outputs ~1-5), as tests/test_passes.py: the time embedding's GEMMs run over S (or S x B) rows at
once instead of B, which can sum in another order; everything else is the same modules called the same way.
"""

import copy

import pytest
import torch

from sdrt import passes, unet_step
from sdrt.blocks import ResnetBlock, StepEmbedding
from sdrt.models import load_model

ATOL = 2e-5


def _optimized(unet):
    unet = copy.deepcopy(unet)
    for p in (passes.use_sdrt_attention, passes.use_sdrt_group_norm, passes.use_sdrt_geglu,
              passes.use_sdrt_transformer_blocks):
        p(unet, kernel=False)
    return unet


def _inputs(unet, batch, h, w):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, h, w, generator=g)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, generator=g),
                 "time_ids": torch.tensor([[64.0, 48, 0, 8, 64, 48]] * batch) + torch.arange(batch)[:, None]}
    return x, text, added


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2", "tiny-sdxl"])
@pytest.mark.parametrize("h, w", [(8, 8), (9, 10)], ids=["8x8", "odd-9x10"])  # 9x10: up blocks told their size
def test_step_forward_matches_diffusers(preset, h, w):
    unet = _optimized(load_model(preset).unet)
    assert unet_step.supports(unet)
    x, text, added = _inputs(unet, 2, h, w)
    timesteps = torch.tensor([999, 501, 1])  # int64, as most schedules store them
    with torch.inference_mode():
        adds = unet_step.time_adds(unet, timesteps, 2, **(added or {}))
        assert set(adds) == {m for m in unet.modules() if isinstance(m, ResnetBlock)}
        for i, t in enumerate(timesteps):
            ref = unet(x, t.float().expand(2), text, added_cond_kwargs=added, return_dict=False)[0]
            out = unet_step.forward(unet, x, StepEmbedding(adds, i), text)
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_time_adds_shapes_and_broadcast():
    # SD 1/2: one projection row a step, broadcast over the batch; SDXL: a row per sample (its pooled text differs).
    for preset, per_row in (("tiny", False), ("tiny-sdxl", True)):
        unet = _optimized(load_model(preset).unet)
        _, _, added = _inputs(unet, 3, 8, 8)
        with torch.inference_mode():
            adds = unet_step.time_adds(unet, torch.tensor([10.0, 20.0]), 3, **(added or {}))
        for block, table in adds.items():
            assert table.shape == (2, 3, block.norm2.num_channels)
            assert (table.stride(1) != 0) == per_row


def test_supports():
    unet = load_model("tiny").unet
    assert not unet_step.supports(unet)  # stock ResnetBlock2Ds compute the projection themselves
    assert unet_step.supports(_optimized(unet))
    from diffusers import UNet2DConditionModel

    with_classes = UNet2DConditionModel(**dict(unet.config, class_embed_type="timestep"))
    assert not unet_step.supports(_optimized(with_classes))  # a class embedding joins the time embedding
