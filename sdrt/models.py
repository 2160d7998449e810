"""MODEL argument -> components: tokenizer(s), text encoder(s), UNet, VAE, scheduler config and metadata.

MODEL is a preset name (random weights, built in-process), a local diffusers folder (with model_index.json), or a
local single-file `.safetensors` checkpoint (original/LDM layout, architecture from the matching preset). Nothing is
ever fetched from a hub: every from_pretrained call gets a local path and local_files_only=True.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdrt.errors import SdrtError
from sdrt.specs import PRESETS, Family, ModelSpec


@dataclass
class Components:
    name: str
    family: Family
    tokenizers: list            # transformers CLIPTokenizer, one per text encoder
    text_encoders: list         # CLIPTextModel / CLIPTextModelWithProjection
    unet: torch.nn.Module       # diffusers UNet2DConditionModel
    vae: torch.nn.Module        # diffusers AutoencoderKL
    scheduler_config: dict
    default_size: int
    source: str                 # what MODEL was: "preset:tiny", a folder or a file path
    source_hash: str            # sha256 of the weight files (or of the preset name and seed)
    defaults: dict = field(default_factory=dict)  # steps, guidance, scheduler

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_force_upcast(self) -> bool:
        """Whether the VAE must stay fp32 in fp16 runs. diffusers' AutoencoderKL defaults force_upcast to True, so
        nearly every VAE config says it; only the SDXL pipelines honour it (SDXL's VAE overflows in fp16), while
        SD 1.x/2.x decode in fp16. So do we: in eager, the torch backend and the exporter alike."""
        return self.family is Family.SDXL and bool(getattr(self.vae.config, "force_upcast", False))

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        return {**dict(zip(names, self.text_encoders)), "unet": self.unet, "vae": self.vae}


def load_model(model: str, dtype: torch.dtype = torch.float32, seed: int = 0, arch: str | None = None) -> Components:
    """Resolve MODEL (preset name, diffusers folder or .safetensors file) into eval-mode components. `arch` (a
    preset name) says what a single-file checkpoint's weights cannot: its architecture and scheduler."""
    if arch is not None and not str(model).endswith(".safetensors"):
        raise SdrtError(f"--arch is for single-file .safetensors checkpoints; '{model}' says its own architecture")
    if model in PRESETS:
        c = build_preset(PRESETS[model], seed=seed)
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise SdrtError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}) nor an existing path")
        if path.is_dir():
            c = load_diffusers_folder(path)
        elif path.suffix == ".safetensors":
            from sdrt.checkpoint import load_single_file

            c = load_single_file(path, arch)
        else:
            raise SdrtError(f"{path}: expected a diffusers folder (model_index.json) or a .safetensors file")
    for m in c.modules.values():
        if next(m.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
            m.to(dtype)
        m.eval().requires_grad_(False)
    return c


def source_hash(model: str, seed: int = 0) -> str:
    """The weights' identity without building anything: caches (ONNX exports, engines) key on it, so an
    up-to-date check costs a file hash (a few seconds for SD1.5), not a model build."""
    if model in PRESETS:
        return hashlib.sha256(f"preset:{model}:seed={seed}".encode()).hexdigest()
    path = Path(model).expanduser()
    if not path.exists():
        raise SdrtError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return hash_files(weight_files(path) if path.is_dir() else [path])


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors")) + sorted(folder.rglob("*.bin"))


def build_text_encoder(cfg: dict, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kw = {k: v for k, v in cfg.items() if k != "projection"}
    config = CLIPTextConfig(**kw, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return (CLIPTextModelWithProjection if cfg.get("projection") else CLIPTextModel)(config)


def build_preset(spec: ModelSpec, seed: int = 0) -> Components:
    """Seeded random weights with the preset's exact architecture (no files, no download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdrt.tokenizer import builtin_tokenizer

    # SDXL's second tokenizer pads with "!" as the released one does; both share the builtin vocabulary.
    tokenizers = [builtin_tokenizer(pad_token="!" if i == 1 else "<|endoftext|>")
                  for i in range(len(spec.text_encoders))]
    bos, eos = tokenizers[0].bos_token_id, tokenizers[0].eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoders = [build_text_encoder(cfg, bos, eos) for cfg in spec.text_encoders]
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
    return Components(spec.name, spec.family, tokenizers, text_encoders, unet, vae, dict(spec.scheduler),
                      spec.default_size, f"preset:{spec.name}", source_hash(spec.name, seed), preset_defaults(spec))


def preset_defaults(spec: ModelSpec) -> dict:
    return dict(steps=spec.default_steps, guidance=spec.default_guidance, scheduler=spec.default_scheduler)


def family_of(unet_config, n_text_encoders: int) -> Family:
    if n_text_encoders == 2 or getattr(unet_config, "addition_embed_type", None) == "text_time":
        return Family.SDXL
    return Family.SD2 if unet_config.cross_attention_dim == 1024 else Family.SD1


def load_diffusers_folder(path: Path) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = path / "model_index.json"
    if not index.is_file():
        raise SdrtError(f"{path}: not a diffusers folder (no model_index.json)")
    try:
        entries = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise SdrtError(f"{index}: invalid JSON ({e.msg}, line {e.lineno})") from None
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if "text_encoder_2" in entries:
        needed += ["text_encoder_2", "tokenizer_2"]
    for name in needed:
        if not (path / name).is_dir():
            raise SdrtError(f"{path}: component '{name}' is missing (no {name}/ folder)")
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise SdrtError(f"{path}: component 'scheduler' is missing scheduler_config.json")

    def load(what: str, fn):
        try:
            return fn()
        except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SdrtError(f"{path}: cannot load {what}: {first}") from None

    def text_encoder(sub: str):
        # The SDXL second encoder is CLIPTextModelWithProjection (its pooled output is projected).
        cls_name = entries.get(sub, [None, None])[1]
        cls = CLIPTextModelWithProjection if cls_name == "CLIPTextModelWithProjection" else CLIPTextModel
        return load(sub, lambda: cls.from_pretrained(path / sub, local_files_only=True))

    subs = ["text_encoder"] + (["text_encoder_2"] if "text_encoder_2" in entries else [])
    text_encoders = [text_encoder(s) for s in subs]
    tokenizers = [load(f"tokenizer{s[12:]}", lambda s=s: CLIPTokenizer.from_pretrained(
        path / f"tokenizer{s[12:]}", local_files_only=True)) for s in subs]
    unet = load("unet", lambda: UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True))
    vae = load("vae", lambda: AutoencoderKL.from_pretrained(path / "vae", local_files_only=True))
    sched = load("scheduler", lambda: json.loads(sched_file.read_text()))
    family = family_of(unet.config, len(text_encoders))
    size = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    defaults = dict(steps=30, guidance=5.0 if family is Family.SDXL else 7.5,
                    scheduler={"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "LCMScheduler": "lcm",
                               "EulerAncestralDiscreteScheduler": "euler-a"}.get(sched.get("_class_name"), "euler"))
    return Components(path.name, family, tokenizers, text_encoders, unet, vae, sched, size, str(path),
                      hash_files(weight_files(path)), defaults)


def hash_files(files: list[Path]) -> str:
    """sha256 over the weight files' bytes, streamed (a 3.4 GB UNet takes a few seconds)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def save_diffusers_folder(c: Components, path: Path) -> None:
    """Write components as a diffusers folder (used by tests and by users who want to keep a preset)."""
    path = Path(path)
    names = ["text_encoder", "text_encoder_2"][: len(c.text_encoders)]
    for name, te, tok in zip(names, c.text_encoders, c.tokenizers):
        te.save_pretrained(path / name)
        tok.save_pretrained(path / name.replace("text_encoder", "tokenizer"))
    c.unet.save_pretrained(path / "unet")
    c.vae.save_pretrained(path / "vae")
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(c.scheduler_config, indent=2))
    index = {"_class_name": "StableDiffusionXLPipeline" if c.family is Family.SDXL else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", c.scheduler_config.get("_class_name", "PNDMScheduler")]}
    for name, te in zip(names, c.text_encoders):
        index[name] = ["transformers", type(te).__name__]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def count_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
