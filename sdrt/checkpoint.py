"""Single-file checkpoints: one `.safetensors` in the original CompVis/LDM/SGM key layout -> Components, offline.

Most fine-tunes are shared this way: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text
encoder(s) under the family's prefix (TEXT_PREFIXES). The file holds weights only, so the architecture is borrowed
from the preset whose UNet has exactly the checkpoint's keys and shapes (or from `arch`). Keys are renamed into
diffusers' layout by diffusers' own converters (`diffusers.loaders.single_file_utils`: dict work, no network; we
never call `from_single_file`, which fetches configs from the hub), then loaded strictly.

What the weights cannot say comes from the preset: the scheduler config and so the prediction type. An SD 2.x
512-px "base" model (epsilon) and sd-turbo have sd21's shapes and load as sd21 (v-prediction) unless `arch`
(the CLI's --arch: sd21-base, sd-turbo) says otherwise. Files that mark it themselves are read as marked: an empty
`v_pred` tensor (v-prediction) and `ztsnr` (zero-terminal-SNR betas, trailing spacing), as ComfyUI saves them;
EDM files (`edm_mean`, Playground v2.5) are refused.

Every UNet and VAE tensor must find its place (a dropped key is a different model: unCLIP's label_emb, a merged
LoRA's leftovers), and weights must be floating point (an int8-quantized file cast to fp32 is garbage).

Tokenizer: a `tokenizer/` folder (and for SDXL `tokenizer_2/`) in transformers' format next to the file is used
when present; otherwise CLIP's own tokenizer, built from the merge table sdrt ships (the released models all use
CLIP's 49408-token vocabulary), padded as the released tokenizers pad. Only files whose text encoder is not
CLIP-sized (the tests' tiny random-weight files) get sdrt's small builtin vocabulary.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from sdrt.errors import SdrtError
from sdrt.models import Components, build_text_encoder, hash_files, load_tokenizer, pad_token, preset_defaults
from sdrt.specs import PRESETS, Family, ModelSpec

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Each family's text encoders in order. "...transformer." holds transformers' CLIP layout (keys as in
# CLIPTextModel); "...model." holds OpenCLIP's (fused q/k/v in_proj, resblocks), converted by diffusers.
TEXT_PREFIXES = {
    Family.SD1: ("cond_stage_model.transformer.",),
    Family.SD2: ("cond_stage_model.model.",),
    Family.SDXL: ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}
SDXL_MARKER = "conditioner.embedders.1."
# A standalone VAE file's training leftovers, which merges that bake one in carry along (A1111 and ComfyUI skip
# them too): its discriminator loss and the EMA bookkeeping (an int num_updates).
VAE_EXTRAS = (VAE_PREFIX + "loss.", VAE_PREFIX + "model_ema.")
# What the LDM layout holds under each prefix (and SDXL's UNet label_emb: its add_embedding).
KNOWN_GROUPS = {"unet": {"time_embed", "input_blocks", "middle_block", "out", "output_blocks"},
                "vae": {"encoder", "decoder", "quant_conv", "post_quant_conv"}}


def load_single_file(path: Path, arch: str | None = None) -> Components:
    """Load an original-layout `.safetensors` checkpoint; `arch` (a preset name) overrides detection."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path)
    if not path.is_file():
        raise SdrtError(f"{path}: no such file")
    sd = {k: v for k, v in read_checkpoint(path).items() if not k.startswith(VAE_EXTRAS)}
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        if any(k.startswith("model_ema.") for k in sd):
            raise SdrtError(f"{path}: holds only EMA weights (model_ema.*), which sdrt does not read; use a file "
                            f"with {UNET_PREFIX}*")
        raise SdrtError(f"{path}: no UNet weights ({UNET_PREFIX}*) found; not an original-layout SD checkpoint")
    if arch is None:
        arch = detect_preset(path, sd)
    elif arch not in PRESETS:
        raise SdrtError(f"unknown arch '{arch}' (presets: {', '.join(PRESETS)})")
    spec = PRESETS[arch]
    if problems := unet_mismatch(spec, sd):
        raise SdrtError(f"{path}: does not match preset '{arch}': unet: {problems}")
    prefixes = (VAE_PREFIX, *TEXT_PREFIXES[spec.family])
    for prefix in prefixes:
        if not any(k.startswith(prefix) for k in sd):
            raise SdrtError(f"{path}: no weights under {prefix}* (expected for a {spec.family.value} checkpoint)")
    for k, v in sd.items():  # text encoders keep position_ids, an int64 buffer
        if k.startswith((UNET_PREFIX, *prefixes)) and not v.is_floating_point() and not k.endswith("position_ids"):
            raise SdrtError(f"{path}: {k} is {str(v.dtype)[6:]}; sdrt reads floating-point weights only "
                            "(quantized checkpoints are not supported)")
    scheduler = marked_scheduler(path, sd, spec.scheduler)

    tokenizers = load_tokenizers(path.parent, spec)
    # each encoder pools at its own tokenizer's end-of-text id (tokenizer_2/ may come without tokenizer/)
    text_encoders = [build_text_encoder(cfg, tok.bos_token_id, tok.eos_token_id)
                     for cfg, tok in zip(spec.text_encoders, tokenizers)]
    unet = UNet2DConditionModel(**spec.unet)
    vae = AutoencoderKL(**spec.vae)

    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for what, prefix, module, fn, config in (("unet", UNET_PREFIX, unet, convert_ldm_unet_checkpoint, spec.unet),
                                             ("vae", VAE_PREFIX, vae, convert_ldm_vae_checkpoint, spec.vae)):
        try:
            converted = convert(fn, sd, dict(config))
        except SdrtError as e:
            raise SdrtError(f"{path}: {what}: {e}") from None
        load_strict(path, what, module, converted)  # missing keys and wrong shapes are named first
        # the converters rename one to one and skip what the architecture has no place for
        if (n := sum(k.startswith(prefix) for k in sd)) > len(converted):
            known = KNOWN_GROUPS[what] | ({"label_emb"} if what == "unet" and spec.family is Family.SDXL else set())
            groups = sorted({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)} - known)
            raise SdrtError(f"{path}: {what}: {n - len(converted)} of its {n} tensors have no place in '{arch}'"
                            + (f" ({', '.join(groups[:3])})" if groups else "") + ": a variant sdrt cannot run")
    for i, (prefix, te) in enumerate(zip(TEXT_PREFIXES[spec.family], text_encoders)):
        what = "text_encoder" + ("_2" if i else "")
        try:
            with warnings.catch_warnings():  # a malformed file's deprecation warnings (x.T of a 1-D tensor)
                warnings.simplefilter("ignore")
                converted = convert_text_encoder(sd, prefix, te)
        except (KeyError, IndexError, ValueError, RuntimeError) as e:  # a tensor of the wrong rank, a missing key
            raise SdrtError(f"{path}: {what}: unexpected layout ({type(e).__name__}: {e})") from None
        load_strict(path, what, te, converted)
    return Components(path.stem, spec.family, tokenizers, text_encoders, unet, vae, scheduler,
                      spec.default_size, str(path), hash_files(checkpoint_files(path)), preset_defaults(spec))


def marked_scheduler(path: Path, sd: dict, preset: dict) -> dict:
    """The preset's scheduler config, changed as the file's own marker keys say."""
    if "edm_mean" in sd or "edm_std" in sd or "edm_vpred.sigma_max" in sd:
        raise SdrtError(f"{path}: an EDM checkpoint (edm_* keys, as Playground v2.5 has): not supported")
    out = dict(preset)
    if "v_pred" in sd:
        out["prediction_type"] = "v_prediction"
    if "ztsnr" in sd:  # zero-SNR training (arXiv 2305.08891) samples from t = T - 1
        out.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return out


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise SdrtError(f"{path}: not a valid safetensors file ({str(e).strip().splitlines()[0]})") from None


def detect_preset(path: Path, sd: dict) -> str:
    """The first preset (same family, same cross-attention width) whose UNet has exactly these keys and shapes."""
    xl = any(k.startswith(SDXL_MARKER) for k in sd)
    # attn2 is cross-attention: to_k maps the text context (width = cross_attention_dim) to the inner dim.
    ctx = next((v.shape[1] for k, v in sd.items()
                if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") and v.dim() == 2), None)
    closest = ""
    for name, spec in PRESETS.items():
        if (spec.family is Family.SDXL) != xl or spec.unet["cross_attention_dim"] != ctx:
            continue
        problems = unet_mismatch(spec, sd)
        if not problems:
            return name
        closest = closest or f"; closest '{name}': {problems}"
    sgm = any(k.startswith("conditioner.") for k in sd)  # an SDXL refiner's, or one missing an encoder
    layout = "SDXL" if xl else "SGM, SDXL-refiner-like," if sgm else "SD 1.x/2.x"
    raise SdrtError(f"{path}: the UNet matches no preset ({layout} layout, "
                    f"cross-attention width {ctx}){closest}")


def unet_mismatch(spec: ModelSpec, sd: dict) -> str | None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):  # shapes only: no memory, no init (the sdxl UNet builds in ~0.2 s)
        expected = {k: tuple(v.shape) for k, v in UNet2DConditionModel(**spec.unet).state_dict().items()}
    try:
        got = convert(convert_ldm_unet_checkpoint, sd, dict(spec.unet))
    except SdrtError as e:
        return str(e)
    return mismatch(expected, got)


def convert(fn, sd: dict, config: dict) -> dict:
    """Run a diffusers converter; it indexes keys it expects, so a layout it doesn't know raises KeyError."""
    try:
        out = fn(sd, config)
    except (KeyError, IndexError) as e:
        raise SdrtError(f"unexpected layout, key {e} missing") from None
    return {k: v for k, v in out.items() if v is not None}  # converters .get() optional keys (e.g. a bias)


def convert_text_encoder(sd: dict, prefix: str, model) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if prefix.endswith(".model."):
        out = convert_open_clip_checkpoint(model, sd, prefix=prefix)
    else:
        out = convert_ldm_clip_checkpoint(sd, remove_prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel (no text_model. level)
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    # Files written with older transformers carry the position_ids buffer, which newer ones recompute.
    expected = model.state_dict()
    return {k: v for k, v in out.items() if not k.endswith("position_ids") or k in expected}


def mismatch(expected: dict[str, tuple], got: dict[str, torch.Tensor]) -> str | None:
    """None when `got` has exactly the expected keys and shapes, else a one-line summary naming a few keys."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [f"{k} {tuple(got[k].shape)} vs {expected[k]}" for k in expected
             if k in got and tuple(got[k].shape) != expected[k]]
    parts = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    return "; ".join(parts) or None


def load_strict(path: Path, what: str, module: torch.nn.Module, sd: dict) -> None:
    if problems := mismatch({k: tuple(v.shape) for k, v in module.state_dict().items()}, sd):
        raise SdrtError(f"{path}: {what}: {problems}")
    module.load_state_dict(sd, strict=True)  # copies (and casts fp16/bf16 files) into the fp32 parameters


def load_tokenizers(folder: Path, spec: ModelSpec) -> list:
    """`tokenizer/` (`tokenizer_2/`) beside the file, else CLIP's own (sdrt.tokenizer.clip_tokenizer) for a
    CLIP-sized encoder, or the builtin one for the small random-weight test models."""
    from sdrt.tokenizer import CLIP_VOCAB_SIZE, builtin_tokenizer, clip_tokenizer

    out = []
    for i, cfg in enumerate(spec.text_encoders):
        pad = {"pad_token": pad_token(spec.family, i)}
        own = folder / ("tokenizer_2" if i else "tokenizer")
        src = own if own.is_dir() else folder / "tokenizer"
        if not src.is_dir():
            out.append((clip_tokenizer if cfg["vocab_size"] == CLIP_VOCAB_SIZE else builtin_tokenizer)(**pad))
            continue
        # a tokenizer_2/ folder brings its own pad token; tokenizer/ reused for SDXL's second gets '!'
        out.append(load_tokenizer(src, **({} if src == own else pad)))
    return out


def checkpoint_files(path: Path) -> list[Path]:
    """What a single file's graphs are made of (the export and engine caches' key): the weights, the tokenizer
    folders beside it (their end-of-text id is where the text encoders pool), and CLIP's merge table where one
    is missing (it stands in)."""
    from sdrt.tokenizer import CLIP_BPE

    folders = [path.parent / name for name in ("tokenizer", "tokenizer_2")]
    files = [f for d in folders if d.is_dir() for f in sorted(d.iterdir()) if f.is_file()]
    return [path, *files] + ([CLIP_BPE] if not all(d.is_dir() for d in folders) else [])
