"""`sdrt info MODEL`: components, parameter counts, dtypes, default resolution, scheduler, prediction type."""

from __future__ import annotations

HELP = "show a model's components, parameter counts, dtypes, resolution, scheduler and prediction type"


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="preset (tiny, sd15, sd21, sdxl, sd-turbo, ...), diffusers folder "
                   "or .safetensors checkpoint")
    p.add_argument("--seed", type=int, default=0, help="weight seed for presets (default 0)")
    p.add_argument("--arch", metavar="PRESET", help="single-file checkpoints: the preset whose architecture and "
                   "scheduler the weights follow, where their shapes cannot tell (SD 2.x shapes load as sd21, "
                   "v-prediction; say sd21-base or sd-turbo for those)")


def describe(c) -> list[str]:
    from sdrt.models import count_params

    lines = [f"model:       {c.name} ({c.source})", f"family:      {c.family.value}",
             f"resolution:  {c.default_size}x{c.default_size} (latent {c.default_size // 8}x{c.default_size // 8})",
             f"scheduler:   {c.scheduler_config.get('_class_name', '?')} "
             f"(timestep_spacing={c.scheduler_config.get('timestep_spacing', 'leading')}; default sampler "
             f"{c.defaults.get('scheduler')}, {c.defaults.get('steps')} steps, guidance {c.defaults.get('guidance')})",
             f"prediction:  {c.prediction_type}", f"vae scale:   {c.vae_scale}" +
             (" (VAE kept in fp32: overflows in fp16)" if c.vae_force_upcast else ""),
             f"weights:     sha256 {c.source_hash[:16]}", "components:"]
    for name, m in c.modules.items():
        p = next(m.parameters())
        lines.append(f"  {name:<15} {type(m).__name__:<28} {count_params(m) / 1e6:>9.2f} M params  {str(p.dtype)[6:]}")
    for i, tok in enumerate(c.tokenizers):
        lines.append(f"  {'tokenizer' + ('_2' if i else ''):<15} {type(tok).__name__:<28} {len(tok):>9} tokens"
                     f"  max_length {tok.model_max_length}")
    return lines


def run(args) -> int:
    from sdrt.models import load_model

    print("\n".join(describe(load_model(args.model, seed=args.seed, arch=args.arch))))
    return 0
