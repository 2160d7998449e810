"""`sdrt generate MODEL PROMPT -o OUT.png`: txt2img, or img2img with --init-image, on any backend.

Several images (--batch N) are written as OUT.png, OUT-1.png, ..., OUT-{N-1}.png. Each PNG carries its generation
parameters as JSON in a text chunk (key `sdrt`: see sdrt.image), so any image can be made again from itself:
`sdrt generate MODEL --params-from OUT.png` (flags given beside it override what the PNG says).
The onnxruntime backend (the default on CPU) needs ONNX graphs: without --onnx-dir they are exported once into
~/.cache/sdrt/onnx/<weights hash>-<precision> and reused while the weights are unchanged.
"""

from __future__ import annotations

HELP = "generate images from a prompt (txt2img) or from an init image (img2img)"


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="preset (tiny, sd15, sd21, sdxl, sd-turbo, ...), diffusers folder "
                   "or .safetensors checkpoint")
    p.add_argument("prompt", metavar="PROMPT", nargs="?", help='the prompt ("" for unconditional; over 77 tokens '
                   "is truncated); may be left out with --params-from")
    p.add_argument("-n", "--negative-prompt", metavar="TEXT", help="what to steer away from (default: none)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1 turns it off (default: the "
                   "model's)")
    p.add_argument("--scheduler", metavar="NAME", help="ddim, pndm, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, lcm "
                   "(default: the model's)")
    p.add_argument("--seed", type=int, help="noise seed (default: random; printed and stored in the PNG)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the init image's, else the model's)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 8")
    p.add_argument("--batch", type=int, help="images to generate (default 1)")
    p.add_argument("--init-image", metavar="PATH", help="img2img: start from this image")
    p.add_argument("--strength", type=float, help="img2img: how much of the schedule to run, in (0, 1] (default 0.8)")
    p.add_argument("--backend", default="auto", metavar="NAME[:PRECISION]",
                   help="auto, eager, onnxruntime, torch, tensorrt, openvino; precision fp32, fp16, bf16, int8 "
                   "(default: the backend's own: fp32 for eager and onnxruntime, fp16 for torch on CUDA, OpenVINO's "
                   "for openvino, the engines' for tensorrt). auto: the fastest available here")
    p.add_argument("--onnx-dir", metavar="DIR", help="`sdrt export` graphs for onnxruntime and openvino (exported "
                   "there if missing or stale; default: a cache under $SDRT_CACHE/onnx, ~/.cache/sdrt/onnx), "
                   "and for tensorrt the export its `sdrt build` engines sit in (required)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--arch", metavar="PRESET", help="single-file checkpoints: the preset whose architecture and "
                   "scheduler the weights follow, where their shapes cannot tell (SD 2.x shapes load as sd21, "
                   "v-prediction; say sd21-base or sd-turbo for those)")
    p.add_argument("-o", "--output", default="out.png", metavar="OUT.png", help="output file (default out.png)")
    p.add_argument("--params-from", metavar="IMAGE.png", help="make an image again: take the prompt, seed, steps, "
                   "scheduler, guidance, size, batch and init image stored in a PNG that sdrt wrote; flags given "
                   "here override them (an image from a batch comes back with its whole batch)")


def run(args) -> int:
    import secrets
    import sys
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from sdrt import __version__
    from sdrt.backends import Backend, Precision, make_backend, parse_spec, preflight
    from sdrt.errors import SdrtError
    from sdrt.image import load_image, output_paths, save_png
    from sdrt.pipeline import GenerationRequest, Pipeline, check_request

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    source = None
    if args.params_from is not None:
        source = take_params(args, args.params_from)
    if args.prompt is None:
        raise SdrtError("PROMPT is missing (give one, or --params-from IMAGE.png)")
    batch = 1 if args.batch is None else args.batch
    if args.strength is not None and args.init_image is None:
        raise SdrtError("--strength needs --init-image (it is the img2img denoising strength)")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
        scheduler=args.scheduler, seed=seed, height=args.height, width=args.width, batch=batch,
        init_image=load_image(args.init_image) if args.init_image else None,
        strength=0.8 if args.strength is None else args.strength)
    check_request(request)  # bad input fails here, before a model is loaded or exported
    paths = output_paths(args.output, batch)
    spec = parse_spec(args.backend, args.device)
    preflight(spec, args.device)  # before the model is loaded or exported: a wrong spec fails in a second

    from sdrt.models import load_model

    components = load_model(args.model, arch=args.arch)
    onnx_dir = args.onnx_dir
    if spec.backend in (Backend.ONNXRUNTIME, Backend.OPENVINO):
        from sdrt.backends.onnxruntime import ensure_onnx

        # OpenVINO picks fp32/bf16 at compile time from the fp32 graphs; int8 reads the Q/DQ export.
        export = spec.precision if spec.backend is Backend.ONNXRUNTIME or spec.precision is Precision.INT8 else None
        onnx_dir = ensure_onnx(components, export or Precision.FP32, onnx_dir, log=say)
    backend = make_backend(spec, components=components, onnx_dir=onnx_dir, device=args.device)
    pipe = Pipeline.from_components(components, backend)
    if source is not None and source.get("model_hash") not in (None, pipe.info.source_hash):
        say(f"warning: {args.params_from} was made with other weights ({source.get('model')}, sha256 "
            f"{str(source['model_hash'])[:16]}): expect another image")
    del components  # the backend holds what it needs; an ONNX backend frees the PyTorch weights here
    precision = getattr(backend, "precision", None)
    # what auto resolved to; Precision is a str enum and OpenVINO reports its resolved hint as a plain str
    used = f"{backend.name}:{getattr(precision, 'value', precision)}" if precision else backend.name
    t_ready = time.perf_counter()

    bar = None

    def progress(i: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, leave=False)
        bar.update(1)

    try:
        result = pipe.generate(request, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    for w in result.warnings:
        say(f"warning: {w}")
    if not (np.isfinite(result.pixels).all() and torch.isfinite(result.latents).all()):
        raise SdrtError("the image came out NaN/inf (weights with NaNs, or a guidance so large it overflows): "
                        "nothing written")

    r = result.request
    prompts = r.prompts
    for k, (path, image) in enumerate(zip(paths, result.images)):
        params = {"prompt": prompts[k // r.batch], "negative_prompt": r.negative_prompt, "seed": r.seed,
                  "steps": r.steps, "scheduler": r.scheduler, "guidance": r.guidance, "height": r.height,
                  "width": r.width, "batch": r.batch, "index": k, "model": pipe.info.name,
                  "model_hash": pipe.info.source_hash, "backend": used, "sdrt_version": __version__}
        if r.init_image is not None:
            # absolute: --params-from makes it again from any directory (a relative path would name another file)
            params.update(init_image=str(Path(args.init_image).expanduser().absolute()), strength=r.strength)
        save_png(image, path, params)
    t = result.timings
    unet = t["unet_ms"]
    say(f"wrote {', '.join(map(str, paths))} ({r.width}x{r.height}, {r.scheduler} {r.steps} steps, seed {r.seed}, "
        f"{used}) in {time.perf_counter() - t0:.2f} s: setup {t_ready - t0:.2f} s, "
        f"generate {t['total_ms'] / 1e3:.2f} s "
        f"(text {t['text_encoder_ms']:.0f} ms, unet {sum(unet) / max(len(unet), 1):.1f} ms/step x {len(unet)}, "
        f"vae {t['vae_decode_ms']:.0f} ms)")
    return 0


# What --params-from restores: the request's parameters as `sdrt generate` stores them in the PNG (see run), and
# the JSON types each may have there.
RESTORED = {"prompt": (str,), "negative_prompt": (str,), "seed": (int,), "steps": (int,), "scheduler": (str,),
            "guidance": (int, float), "height": (int,), "width": (int,), "batch": (int,), "init_image": (str,),
            "strength": (int, float)}


def take_params(args, path) -> dict:
    """Fill every option of RESTORED the command line left unset from the PNG at `path`; returns its parameters."""
    from sdrt.errors import SdrtError
    from sdrt.image import params_from

    params = params_from(path)
    for key, types in RESTORED.items():
        value = params.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            want = " or ".join(t.__name__ for t in types)
            raise SdrtError(f"{path}: its {key} is {value!r} ({type(value).__name__}, not {want})")
        if getattr(args, key) is None and value is not None:
            setattr(args, key, value)
    return params
