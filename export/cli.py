"""`sdrt export MODEL -o DIR`: text encoder(s), UNet and VAE to validated ONNX graphs plus DIR/manifest.json."""

from __future__ import annotations

HELP = "export a model's text encoders, UNet and VAE to validated ONNX graphs (dynamic batch and size)"


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="preset (tiny, sd15, sd21, sdxl, sd-turbo, ...), diffusers folder "
                   "or .safetensors checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output directory: DIR/<component>.onnx and DIR/manifest.json")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (default); fp16 (fp16 graphs keep the timestep embedding, SD 2.x attention scores and "
                   "SDXL's VAE in fp32); int8 (a Q/DQ UNet calibrated on real denoising steps, with a quality gate)")
    p.add_argument("--calibration-prompts", metavar="FILE", help="int8: one prompt per line (default: 12 built-in)")
    p.add_argument("--calibration-steps", type=int, metavar="N", help="int8: denoising steps per "
                   "calibration prompt (default 8)")
    p.add_argument("--calibration-size", type=int, metavar="PX", help="int8: calibration resolution (default: "
                   "the model's)")
    p.add_argument("--int8-recipe", choices=("ort-cpu", "tensorrt"), help="int8: ort-cpu "
                   "(u8 activations, ONNX Runtime's fast x86 path; default) or tensorrt (symmetric s8 activations)")
    p.add_argument("--opset", type=int, help="ONNX opset: 17 or 18 (default 18; int8 quantizes the opset-18 "
                   "export)")
    p.add_argument("--components", nargs="+", metavar="NAME", help="only these: text_encoder, text_encoder_2, "
                   "unet, vae_decoder, vae_encoder (default: all the model has)")
    p.add_argument("--force", action="store_true", help="re-export even when DIR is up to date; int8: also write "
                   "a graph that fails the quality gate")
    p.add_argument("--seed", type=int, default=0, help="weight seed for presets (default 0)")
    p.add_argument("--arch", metavar="PRESET", help="single-file checkpoints: the preset whose architecture and "
                   "scheduler the weights follow, where their shapes cannot tell (SD 2.x shapes load as sd21, "
                   "v-prediction; say sd21-base or sd-turbo for those)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-component progress on stderr")


def run(args) -> int:
    from sdrt.errors import SdrtError

    if args.precision not in ("fp32", "fp16", "int8"):
        raise SdrtError(f"precision '{args.precision}' is not one of fp32, fp16, int8")
    if not args.output:
        raise SdrtError("the output directory (-o) is empty")
    int8_only = [f for f, v in (("--calibration-prompts", args.calibration_prompts), ("--calibration-steps",
                 args.calibration_steps), ("--calibration-size", args.calibration_size), ("--int8-recipe",
                 args.int8_recipe)) if v is not None]
    if args.precision == "int8":
        # the UNet is quantized from the fp32 export of the whole model (the other graphs are linked from it)
        if args.components:
            raise SdrtError("--components is for fp32 and fp16 exports; int8 exports the whole model")
        if args.opset not in (None, 18):
            raise SdrtError(f"--opset {args.opset}: int8 quantizes the opset-18 fp32 export")
        return run_int8(args)
    if int8_only:
        raise SdrtError(f"{', '.join(int8_only)}: only for --precision int8")
    from sdrt.export.onnx_export import export_model

    from sdrt.models import load_model

    # The graphs do not depend on --arch (only the scheduler does), but the weights are checked against it here.
    model = args.model if args.arch is None else load_model(args.model, arch=args.arch)
    m = export_model(model, args.output, precision=args.precision, opset=18 if args.opset is None else args.opset,
                     components=args.components, force=args.force, progress=not args.quiet, seed=args.seed)
    worst = max(c["validation"]["max_rel"] for c in m["components"].values())
    print(f"{args.output}: {', '.join(m['components'])} ({m['precision']}, opset {m['opset']}); sizes "
          f"{m['min_size']}..{m['max_size']} px in steps of {m['size_multiple']}, any batch; worst ORT vs torch "
          f"max_rel {worst:.1e}")
    return 0


def run_int8(args) -> int:
    from sdrt.export.int8 import export_int8

    from sdrt.models import load_model

    recipe = args.int8_recipe or "ort-cpu"
    steps = 8 if args.calibration_steps is None else args.calibration_steps
    m = export_int8(load_model(args.model, seed=args.seed, arch=args.arch), None, args.output,
                    calibration_prompts=args.calibration_prompts, calibration_steps=steps,
                    force=args.force, recipe=recipe, size=args.calibration_size, progress=not args.quiet)
    gate = m["int8"]["quality_gate"]
    print(f"{args.output}: int8 UNet ({recipe} recipe), quality gate {gate['psnr_db']:.1f} dB image PSNR "
          f"vs fp32 eager")
    return 0
