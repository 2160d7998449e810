"""`sdrt build ONNX_DIR --backend tensorrt`: engines for every exported component, cached and reused."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

HELP = "build TensorRT engines from an `sdrt export` directory (cached: rebuilt or refit only when something changed)"

EPILOG = """\
profiles (--profile, repeatable; one TensorRT optimization profile per resolution bucket):
  HxW[@B]   each of H, W, B is N, MIN-MAX (tuned for MIN) or MIN-OPT-MAX; B defaults to 1
  512x512@1                      one static shape: the fastest engine
  768x1024@1-4                   768x1024, batch 1 to 4, tuned for batch 1
  512-768-1024x512-768-1024@1    any size 512..1024, tuned for 768x768
  default: the model's default size, batch 1 to 4. Sizes are pixels, multiples of 8. With guidance (the
  default) the UNet's batch is doubled; --no-cfg for guidance-free models (sd-turbo).

precision:
  fp16  FP16 kernels allowed (VAEs that overflow in fp16, such as SDXL's, stay fp32)
  int8  an int8 (Q/DQ) export; fp16 Q/DQ graphs are built strongly typed, fp32 ones with INT8+FP16
  fp32  reference accuracy (TF32 on Ampere and newer)

cache: ENGINE_DIR/engines.json records each engine's key (graph and weights hashes, precision, profiles,
TensorRT version, GPU compute capability, sdrt version) and why it was built. Unchanged engines are skipped;
engines built with --refittable are refit, not rebuilt, when only the weights changed. TensorRT's timing cache
(ENGINE_DIR/timing.cache) makes rebuilds on the same GPU faster."""


def add_arguments(p) -> None:
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("onnx_dir", metavar="ONNX_DIR", help="an `sdrt export` output directory (with manifest.json)")
    p.add_argument("--backend", choices=["tensorrt"], default="tensorrt", help="engine backend (default tensorrt)")
    p.add_argument("--precision", choices=["fp16", "int8", "fp32"], default="fp16", help="default fp16")
    p.add_argument("--profile", action="append", metavar="HxW@B", help="resolution bucket (repeatable, see below)")
    p.add_argument("--no-cfg", dest="cfg", action="store_false",
                   help="size the UNet for guidance-free sampling (no doubled batch)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="N",
                   help="TensorRT builder optimization level 0-5: higher builds slower, may run faster (default 3)")
    p.add_argument("--refittable", action="store_true",
                   help="build refittable engines: new weights for the same graph are refit in seconds")
    p.add_argument("--components", metavar="NAME[,NAME]", help="build only these components (default all)")
    p.add_argument("-o", "--output", dest="engine_dir", metavar="ENGINE_DIR",
                   help="engine directory (default ONNX_DIR/tensorrt)")
    p.add_argument("--force", action="store_true", help="rebuild even the engines that are up to date")
    p.add_argument("--lock-timeout", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for another builder in ENGINE_DIR (default: fail at once)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")


def _missing_dirs(path: Path) -> list[Path]:
    """path and those of its parents that do not exist yet, deepest first: what mkdir(parents=True) would make."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def run(args, make_builder=None) -> int:
    """`make_builder(options)` returns the builder (tests pass a fake; default: TensorRT, required here)."""
    from sdrt.export.trt_build import (
        BuildOptions,
        build_engines,
        check_request,
        make_engine_dir,
        read_onnx_manifest,
        summary,
    )
    from sdrt.export.trt_builder import TensorRTBuilder
    from sdrt.export.trt_profiles import parse_profile, parse_profiles

    for text in args.profile or []:  # syntax errors before touching any file
        parse_profile(text)
    onnx_dir = Path(args.onnx_dir)
    manifest = read_onnx_manifest(onnx_dir)
    options = BuildOptions(
        precision=args.precision, profiles=parse_profiles(args.profile, manifest["model"]["default_size"]),
        cfg=args.cfg, opt_level=args.opt_level, refittable=args.refittable, force=args.force,
        lock_timeout_s=args.lock_timeout, verbose=args.verbose,
        components=tuple(c.strip() for c in args.components.split(",")) if args.components else None)
    engine_dir = Path(args.engine_dir) if args.engine_dir else onnx_dir / "tensorrt"
    check_request(onnx_dir, manifest, options)  # the user's own mistakes before "TensorRT is not installed"
    made = _missing_dirs(engine_dir)
    make_engine_dir(engine_dir)
    try:
        builder = (make_builder or (lambda o: TensorRTBuilder(verbose=o.verbose)))(options)
    except BaseException:  # no TensorRT, no GPU: leave no empty engine directory behind
        for d in made:
            with contextlib.suppress(OSError):  # not empty any more: someone else's now
                d.rmdir()
        raise
    print(f"building {args.precision} engines for {manifest['model'].get('name', onnx_dir.name)} into {engine_dir} "
          f"(TensorRT {builder.trt_version}, {builder.device_name}, compute capability {builder.compute_capability}; "
          f"profiles {', '.join(str(s) for s in options.profiles)})", flush=True)
    records = build_engines(onnx_dir, engine_dir, options, builder, log=lambda line: print(line, flush=True))
    print(summary(records))
    return 0
