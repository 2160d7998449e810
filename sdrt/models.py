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

# What diffusers and transformers raise when a component's config has a value of the wrong type or shape: they build
# the module from it as given ("block_out_channels": 5 is a TypeError, [] an IndexError, "heads": 0 a division).
CONFIG_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, ArithmeticError)
try:  # transformers 5 validates configs with huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
    CONFIG_ERRORS += (StrictDataclassError,)
except ImportError:
    pass


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
    source_hash: str            # sha256 of the weight and config files (or of the preset name and seed)
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
    if arch is not None and not str(model).lower().endswith(".safetensors"):
        raise SdrtError(f"--arch is for single-file .safetensors checkpoints; '{model}' says its own architecture")
    if model in PRESETS:
        c = build_preset(PRESETS[model], seed=seed)
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise SdrtError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}) nor an existing path")
        if path.is_dir():
            c = load_diffusers_folder(path)
        elif path.suffix.lower() == ".safetensors":
            from sdrt.checkpoint import load_single_file

            c = load_single_file(path, arch)
        else:
            raise SdrtError(f"{path}: expected a diffusers folder (model_index.json) or a .safetensors file")
    check_vocabularies(c)
    check_supported(c)
    for m in c.modules.values():
        if next(m.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
            m.to(dtype)
        m.eval().requires_grad_(False)
    return c


def check_vocabularies(c: Components) -> None:
    """Every id a tokenizer can emit must have a row in its text encoder's embedding: a tokenizer with a textual
    inversion's added tokens, beside weights without their embeddings, would otherwise fail at the first prompt
    that uses one (an IndexError inside the embedding lookup)."""
    for i, (tok, te) in enumerate(zip(c.tokenizers, c.text_encoders)):
        rows = te.get_input_embeddings().num_embeddings
        if len(tok) > rows:
            raise SdrtError(f"{c.source}: tokenizer{'_2' if i else ''} has {len(tok)} tokens but text_encoder"
                            f"{'_2' if i else ''} embeds only {rows} (added tokens without their embeddings?)")


def check_supported(c: Components) -> None:
    """Variants whose pipelines differ from SD's text-to-image loop, refused by name instead of run wrong."""
    u, v = c.unet.config, c.vae.config
    class_embed, addition_embed = getattr(u, "class_embed_type", None), getattr(u, "addition_embed_type", None)
    widths = [t.config.hidden_size for t in c.text_encoders]  # SDXL's UNet reads both encoders side by side
    cross = u.cross_attention_dim if isinstance(u.cross_attention_dim, (list, tuple)) else [u.cross_attention_dim]
    problems = [
        ((addition_embed == "text_time") != (len(widths) == 2), f"unet has addition_embed_type={addition_embed!r} "
         f"beside {len(widths)} text encoder(s): SDXL's UNet takes two and others one (an SDXL refiner, or a UNet "
         "from another model)"),
        (set(cross) != {sum(widths)}, f"the text encoders give {sum(widths)} channels where the unet's "
         f"cross-attention takes {u.cross_attention_dim} (a UNet from another model)"),
        (getattr(u, "time_cond_proj_dim", None) is not None, "unet has time_cond_proj_dim: an LCM-distilled UNet, "
         "which takes a guidance embedding instead of classifier-free guidance"),
        (getattr(c.unet, "class_embedding", None) is not None, f"unet has a class embedding (class_embed_type="
         f"{class_embed!r}: unCLIP, the x4 upscaler's noise level): it needs class labels"),
        (addition_embed not in (None, "text_time"),
         f"unet has addition_embed_type={addition_embed!r}; only SDXL's text_time is run"),
        (u.in_channels != v.latent_channels, f"unet takes {u.in_channels} input channels where the VAE's latents "
         f"have {v.latent_channels} (an inpainting, instruct-pix2pix, depth or upscaler UNet)"),
        (getattr(v, "latents_mean", None) is not None or getattr(v, "latents_std", None) is not None,
         "vae has latents_mean/latents_std (Playground-style latent normalisation)"),
    ]
    for bad, what in problems:
        if bad:
            raise SdrtError(f"{c.source}: {what}: not supported")


def source_hash(model: str, seed: int = 0) -> str:
    """The weights' identity without building anything: caches (ONNX exports, engines) key on it, so an
    up-to-date check costs a file hash (a few seconds for SD1.5), not a model build."""
    if model in PRESETS:
        check_seed(seed)
        return hashlib.sha256(f"preset:{model}:seed={seed}".encode()).hexdigest()
    path = Path(model).expanduser()
    if not path.exists():
        raise SdrtError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    if path.is_dir():
        return hash_files(weight_files(path))
    from sdrt.checkpoint import checkpoint_files

    return hash_files(checkpoint_files(path))


def check_seed(seed: int) -> None:
    """Weight seeds and the pipeline's noise seeds alike: torch.manual_seed takes [-2^63, 2^64) and folds the
    negatives onto other seeds."""
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise SdrtError(f"seed must be an integer in [0, 2^63), got {seed!r}")


def weight_files(folder: Path) -> list[Path]:
    """What a folder's graphs are made of: the weights, and the configs that shape them (an edited norm_eps or
    hidden_act is another model, whose cached export must not be reused)."""
    configs = [f for f in [folder / "model_index.json", *folder.glob("*/config.json")] if f.is_file()]
    return sorted(folder.rglob("*.safetensors")) + sorted(folder.rglob("*.bin")) + sorted(configs)


def build_text_encoder(cfg: dict, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kw = {k: v for k, v in cfg.items() if k != "projection"}
    config = CLIPTextConfig(**kw, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return (CLIPTextModelWithProjection if cfg.get("projection") else CLIPTextModel)(config)


def build_preset(spec: ModelSpec, seed: int = 0) -> Components:
    """Seeded random weights with the preset's exact architecture (no files, no download)."""
    check_seed(seed)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdrt.tokenizer import builtin_tokenizer

    tokenizers = [builtin_tokenizer(pad_token=pad_token(spec.family, i)) for i in range(len(spec.text_encoders))]
    bos, eos = tokenizers[0].bos_token_id, tokenizers[0].eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoders = [build_text_encoder(cfg, bos, eos) for cfg in spec.text_encoders]
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
    return Components(spec.name, spec.family, tokenizers, text_encoders, unet, vae, dict(spec.scheduler),
                      spec.default_size, f"preset:{spec.name}", source_hash(spec.name, seed), preset_defaults(spec))


def pad_token(family: Family, index: int) -> str:
    """What the released tokenizers pad with: OpenCLIP's encoders (SD 2.x's, SDXL's second) were trained on
    zero-padded ids, id 0 being '!'; OpenAI's CLIP-L (SD 1.x's, SDXL's first) pads with end-of-text."""
    return "!" if family is Family.SD2 or index == 1 else "<|endoftext|>"


def preset_defaults(spec: ModelSpec) -> dict:
    return dict(steps=spec.default_steps, guidance=spec.default_guidance, scheduler=spec.default_scheduler)


def family_of(unet_config, n_text_encoders: int) -> Family:
    if n_text_encoders == 2 or getattr(unet_config, "addition_embed_type", None) == "text_time":
        return Family.SDXL
    return Family.SD2 if unet_config.cross_attention_dim == 1024 else Family.SD1


def load_diffusers_folder(path: Path) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index = path / "model_index.json"
    if not index.is_file():
        raise SdrtError(f"{path}: not a diffusers folder (no model_index.json)")
    entries = read_json_object(index)
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if "text_encoder_2" in entries:
        needed += ["text_encoder_2", "tokenizer_2"]
    for name in needed:
        if not (path / name).is_dir():
            raise SdrtError(f"{path}: component '{name}' is missing (no {name}/ folder)")
        entry = entries.get(name, ["", ""])  # diffusers writes [library, class]; we read the text encoders' class
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise SdrtError(f"{index}: '{name}' must be [library, class], got {json.dumps(entry)}")
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise SdrtError(f"{path}: component 'scheduler' is missing scheduler_config.json")

    def load(sub: str, fn):
        config = path / sub / "config.json"
        if config.is_file():  # the libraries take a non-object config for a hub model id and say so, confusingly
            read_json_object(config)
        try:
            return fn()
        except (OSError, RuntimeError) as e:  # missing, truncated or corrupt files
            raise SdrtError(f"{path}: cannot load {sub}: {first_line(e)}") from None
        except CONFIG_ERRORS as e:
            raise SdrtError(f"{config}: cannot build {sub} from it: {type(e).__name__}: {first_line(e)}") from None

    def text_encoder(sub: str):
        # The SDXL second encoder is CLIPTextModelWithProjection (its pooled output is projected).
        cls_name = entries.get(sub, ["", ""])[1]
        cls = CLIPTextModelWithProjection if cls_name == "CLIPTextModelWithProjection" else CLIPTextModel
        return load(sub, lambda: cls.from_pretrained(path / sub, local_files_only=True))

    subs = ["text_encoder"] + (["text_encoder_2"] if "text_encoder_2" in entries else [])
    text_encoders = [text_encoder(s) for s in subs]
    tokenizers = [load_tokenizer(path / f"tokenizer{s[12:]}") for s in subs]
    unet = load("unet", lambda: UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True))
    vae = load("vae", lambda: AutoencoderKL.from_pretrained(path / "vae", local_files_only=True))
    sched = read_json_object(sched_file)
    family = family_of(unet.config, len(text_encoders))
    sample = unet.config.sample_size  # diffusers takes any value here and uses it only in its own pipelines
    if type(sample) is not int or sample < 1:
        raise SdrtError(f"{path / 'unet' / 'config.json'}: sample_size must be a positive integer, got {sample!r}")
    size = sample * 2 ** (len(vae.config.block_out_channels) - 1)
    cls_name = str(sched.get("_class_name"))  # str: a list there would be unhashable
    defaults = dict(steps=30, guidance=5.0 if family is Family.SDXL else 7.5,
                    scheduler=default_scheduler(cls_name, sched))
    return Components(path.name, family, tokenizers, text_encoders, unet, vae, sched, size, str(path),
                      hash_files(weight_files(path)), defaults)


def default_scheduler(cls_name: str, config: dict) -> str:
    """The sampler a folder's scheduler class names; Euler for classes sdrt does not implement (UniPC, DDPM,
    Heun, KDPM2: `sdrt info` shows the class beside the default, and --scheduler overrides it)."""
    if cls_name == "DPMSolverMultistepScheduler":
        return "dpmpp-2m-karras" if config.get("use_karras_sigmas") is True else "dpmpp-2m"
    return {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "LCMScheduler": "lcm",
            "EulerAncestralDiscreteScheduler": "euler-a"}.get(cls_name, "euler")


# What transformers' CLIPTokenizer reads its vocabulary from: the fast tokenizer's file, or the slow one's pair.
VOCAB_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def load_tokenizer(folder: Path, **kw):
    """A CLIPTokenizer from a transformers tokenizer folder. transformers builds one out of an empty folder (two
    special tokens, model_max_length 1e30, which overflows on padding), so the vocabulary files and what was loaded
    are checked: every backend runs CLIP's 77-token context."""
    from transformers import CLIPTokenizer

    from sdrt.tokenizer import MAX_LENGTH

    if not any(all((folder / f).is_file() for f in files) for files in VOCAB_FILES):
        raise SdrtError(f"{folder}: no tokenizer vocabulary (tokenizer.json, or vocab.json and merges.txt)")
    try:
        tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True, **kw)
    except Exception as e:  # also the tokenizers library's bare Exception ("Error while initializing BPE")
        raise SdrtError(f"{folder}: cannot load tokenizer: {first_line(e)}") from None
    if tok.model_max_length != MAX_LENGTH:
        raise SdrtError(f"{folder}: model_max_length is {tok.model_max_length!r}, not CLIP's {MAX_LENGTH} "
                        "(set it in tokenizer_config.json)")
    if len(tok) < 256:  # byte-level BPE: one symbol per byte at least, or text cannot be encoded
        raise SdrtError(f"{folder}: a vocabulary of {len(tok)} tokens is not a CLIP BPE vocabulary")
    return tok


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold an object: model_index.json, a component's config."""
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise SdrtError(f"{file}: invalid JSON ({e.msg}, line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SdrtError(f"{file}: cannot read: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise SdrtError(f"{file}: expected a JSON object, got {json.dumps(data)[:40]}")
    return data


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def hash_files(files: list[Path]) -> str:
    """sha256 over the files' names and bytes (weights and configs: weight_files), streamed (a 3.4 GB UNet takes
    a few seconds)."""
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
