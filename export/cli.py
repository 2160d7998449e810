"""`sdrt export MODEL -o DIR`: text encoder(s), UNet and VAE to validated ONNX graphs plus DIR/manifest.json."""

from __future__ import annotations

HELP = "export a model's text encoders, UNet and VAE to validated ONNX graphs (dynamic batch and size)"


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="preset (tiny, sd15, sd21, sdxl, sd-turbo, ...), diffusers folder "
                   "or .safetensors checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output directory: DIR/<component>.onnx and DIR/manifest.json")
    p.add_argument("--precision", default="fp32", help="fp32 (default) or fp16 (fp16 graphs keep the timestep "
                   "embedding, SD 2.x attention scores and SDXL's VAE in fp32)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset: 17 or 18 (default 18)")
    p.add_argument("--components", nargs="+", metavar="NAME", help="only these: text_encoder, text_encoder_2, "
                   "unet, vae_decoder, vae_encoder (default: all the model has)")
    p.add_argument("--force", action="store_true", help="re-export even when DIR is up to date")
    p.add_argument("--seed", type=int, default=0, help="weight seed for presets (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-component progress on stderr")


def run(args) -> int:
    from sdrt.export.onnx_export import export_model

    m = export_model(args.model, args.output, precision=args.precision, opset=args.opset,
                     components=args.components, force=args.force, progress=not args.quiet, seed=args.seed)
    worst = max(c["validation"]["max_rel"] for c in m["components"].values())
    print(f"{args.output}: {', '.join(m['components'])} ({m['precision']}, opset {m['opset']}); sizes "
          f"{m['min_size']}..{m['max_size']} px in steps of {m['size_multiple']}, any batch; worst ORT vs torch "
          f"max_rel {worst:.1e}")
    return 0
