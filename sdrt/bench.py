"""`sdrt bench MODEL --backends eager,onnxruntime,openvino,...`: every backend side by side, in one process.

Protocol (why it is shaped this way: a shared, noisy machine must still give honest ratios):
  0. Every ONNX export the rows need (cached across runs) runs first, each in a child process, before anything is
     loaded: an int8 calibration beside live rows would not fit in memory.
  1. The reference row `eager` (fp32) is always run, first (added when not asked for): speedups and drift are
     against it, and its weights give every row the same tokenized prompt and stage inputs.
  2. Each row is set up alone: load weights or the export, build the runtime, then `--warmup`
     generations and one untimed call of each stage (compilers specialise on shapes and strides). Its peak
     memory is measured over exactly that: peak RSS above the RSS before it (CPU), or the CUDA peak allocation
     (GPU). The first generation's image and latents give the drift against the reference.
  3. Then `--runs` rounds. In each round every live row, in turn (order reversed on odd rounds), times each stage
     once on the same inputs (text encoder, one UNet step at the CFG batch, VAE decode) and one full generation.
     Rows alternate within a round, so a load spike from a neighbour hits every row alike. When the memory left
     would not hold another setup as large as the largest so far, the rows set up until then are measured and
     freed first (`group` in the report says which rows were measured together). `--sequential` finishes and
     frees each row before the next (ratios then assume the machine stays equally busy).
Stage times are medians over rounds; end-to-end has p50/p90/p99 (linear interpolation: with 3 runs p99 is ~max).
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import asdict, dataclass

from sdrt.errors import SdrtError

HELP = "benchmark backends side by side: per-stage latency, end-to-end percentiles, cold start, memory, drift"
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class BenchConfig:
    model: str
    backends: tuple[str, ...] = ("eager", "onnxruntime")
    height: int | None = None       # None: the model's default size
    width: int | None = None
    steps: int | None = None        # None: the model's default
    batch: int = 1                  # images per prompt; the UNet runs 2x that with CFG
    guidance: float = 7.5
    runs: int = 3
    warmup: int = 1
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    device: str | None = None       # None: CUDA when present, else CPU
    sequential: bool = False
    # Wall-clock budget (the GPU suite's slot): rows not started by 75% of it are skipped, and a row's export or
    # engine build runs in a subprocess killed at 90% of it, so the rounds and the report fit in the rest.
    budget_s: float | None = None
    arch: str | None = None         # single-file checkpoints: the preset their weights follow (sdrt.models.load_model)
    profile: bool = False           # per row, one UNet step and one VAE decode under torch.profiler (bench_profile)


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="preset (tiny, sd15, ...), diffusers folder or .safetensors file")
    p.add_argument("--backends", default="eager,onnxruntime", help="comma-separated rows, each NAME[:PRECISION]: "
                   "eager, onnxruntime, openvino, torch, tensorrt, or the peers diffusers and torch.compile "
                   "(default: eager,onnxruntime; eager fp32 is always added as the reference)")
    p.add_argument("--height", type=int, help="pixels (default: the model's size)")
    p.add_argument("--width", type=int, help="pixels (default: the model's size)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale; > 1 doubles the UNet batch (default 7.5)")
    p.add_argument("--runs", type=int, default=3, help="timed rounds per row (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per row first (default 1, min 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--arch", metavar="PRESET", help="single-file checkpoints: the preset whose architecture and "
                   "scheduler the weights follow (sd21-base, sd-turbo: SD 2.x shapes otherwise load as sd21)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--sequential", action="store_true", help="run rows one after another, freeing each (less "
                   "memory; ratios then depend on the machine staying equally busy)")
    p.add_argument("--profile", action="store_true", help="also run one UNet step and one VAE decode per row under "
                   "torch.profiler and report its time by kind of kernel (attention, group norm, layer norm, GEGLU, "
                   "conv, GEMM, other); on a CPU only the PyTorch rows, whose aten ops it can see")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of per-stage latency by backend")


def config_from_args(args) -> BenchConfig:
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if not backends:
        raise SdrtError("--backends is empty")
    if args.runs < 1 or args.warmup < 1:
        raise SdrtError("--runs and --warmup must be >= 1 (the first warm-up generation gives the drift)")
    return BenchConfig(args.model, backends, args.height, args.width, args.steps, args.batch, args.guidance,
                       args.runs, args.warmup, args.seed, args.prompt, args.device, args.sequential,
                       arch=args.arch, profile=args.profile)


def check_outputs(args) -> None:
    """Each --json, --markdown and --plot path can be written, checked before a benchmark of minutes rather than
    after it: not a directory, its folder made (bench_report.write makes it) and writable, and --plot's extension a
    format matplotlib writes."""
    import tempfile
    from pathlib import Path

    suffix = Path(args.plot).suffix[1:].lower() if args.plot else ""  # none: matplotlib writes PNG
    if suffix:  # first: a refused run makes no folders
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
        except ImportError:  # bench_report.plot says so when it gets there, as it always has
            formats = None
        else:
            formats = FigureCanvasAgg.get_supported_filetypes()
        if formats is not None and suffix not in formats:
            raise SdrtError(f"--plot {args.plot}: not an image format matplotlib writes (choose from "
                            f"{', '.join(sorted(formats))})")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if not path:
            continue
        p = Path(path)
        if p.is_dir():
            raise SdrtError(f"{flag} {path}: is a directory")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a file where a folder should be
            raise SdrtError(f"{flag} {path}: cannot make its folder ({e.strerror}: {e.filename})") from None
        try:  # a real open, not os.access: root passes that everywhere, /proc and read-only mounts included
            with open(p, "a") if p.exists() else tempfile.TemporaryFile(dir=p.parent):
                pass
        except OSError as e:
            raise SdrtError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def run(args) -> int:
    from sdrt import bench_report

    cfg = config_from_args(args)
    check_outputs(args)
    report = run_bench(cfg, log=lambda msg: print(msg, flush=True))
    print()
    print(bench_report.markdown(report))
    bench_report.write(report, json_path=args.json, markdown_path=args.markdown, plot_path=args.plot)
    return 0


def command_line(cfg: BenchConfig) -> str:
    """The `sdrt bench` command that reproduces this configuration (recorded in the report)."""
    parts = [cfg.model, "--backends", ",".join(cfg.backends)]
    for flag in ("height", "width", "steps", "batch", "guidance", "runs", "warmup", "seed", "device", "arch"):
        value = getattr(cfg, flag)
        if value is not None and value != getattr(BenchConfig, flag):
            parts += [f"--{flag}", str(value)]
    if cfg.prompt != DEFAULT_PROMPT:
        parts += ["--prompt", cfg.prompt]
    parts += [f"--{flag}" for flag in ("sequential", "profile") if getattr(cfg, flag)]
    return " ".join(["sdrt bench"] + [shlex.quote(p) for p in parts])  # pasted into a shell as it is


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run every row of `cfg` and return the report: {"config", "command", "env", "request", "results": [...]}."""
    import torch

    from sdrt import bench_report
    from sdrt.backends import default_device
    from sdrt.bench_rows import (
        Context,
        PeakMemory,
        is_reference,
        parse_row,
        prepare_exports,
        setup_row,
        stage_inputs,
        time_stages,
        unet_flops,
    )
    from sdrt.models import load_model, source_hash
    from sdrt.pipeline import GenerationRequest, ModelInfo, Pipeline, check_request

    asked = GenerationRequest(prompt=cfg.prompt, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed,
                              height=cfg.height, width=cfg.width, batch=cfg.batch)
    check_request(asked)  # a bad size fails now, not after minutes of ONNX exports (the model's limits: below)
    started, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    device = default_device(cfg.device)
    names = list(dict.fromkeys(cfg.backends))
    if not any(n.strip().lower() in ("eager", "eager:fp32") for n in names):
        names.insert(0, "eager")
    names.sort(key=lambda n: n.strip().lower() not in ("eager", "eager:fp32"))  # the reference first
    for name in names:
        parse_row(name)  # a typo fails now, not as a skipped row; a known row that cannot run here is skipped below

    deadline = None if cfg.budget_s is None else started + 0.9 * cfg.budget_s
    ctx = Context(cfg.model, device, seed=cfg.seed, deadline=deadline, arch=cfg.arch,
                  source_hash=source_hash(cfg.model, cfg.seed))
    prepare_exports(ctx, names, log)  # before anything is loaded: see its docstring

    log(f"loading {cfg.model} (the eager fp32 reference)")
    t = time.perf_counter()
    with PeakMemory(device) as ref_mem:
        components = load_model(cfg.model, seed=cfg.seed, arch=cfg.arch)
    load_s = time.perf_counter() - t
    info = ModelInfo.from_components(components)
    request = Pipeline(info, components.tokenizers, None).resolve(asked)
    inputs = stage_inputs(components, request.batch, request.height, request.width, cfg.prompt,
                          cfg=request.guidance > 1.0, seed=cfg.seed)
    if components.source_hash != ctx.source_hash:  # a diffusers folder whose weights changed while we exported
        raise SdrtError(f"{cfg.model}: its weights changed during the benchmark's setup")
    ctx.info, ctx.tokenizers, ctx.request = info, list(components.tokenizers), request

    results, live, reference, flops, group = [], [], None, None, 0
    def measure_now(rows, last: bool) -> None:
        profile = profiles_now(cfg.profile, device, last)
        if cfg.profile and not profile:
            log(f"not profiling {', '.join(r.spec.name for r in rows)}: on CUDA a profile slows every row measured "
                "after it (pytorch#144455), so only the rows measured last are profiled")
        measure(rows, request, cfg.runs, log, deadline, profile=profile)

    for name in names:
        result = {"backend": name, "skipped": None}
        results.append(result)
        biggest = max((row.result["peak_rss_mb"] or 0 for row in live), default=0)
        if live and available_mb() < 1.25 * biggest:  # the next setup might not fit beside the live rows
            log(f"memory: {available_mb():.0f} MB left, measuring {len(live)} rows before the next is set up")
            measure_now(live, last=False)
            row = first = None  # the measured rows are freed before the next setup
            group += 1
        if cfg.budget_s is not None and time.perf_counter() - started > 0.75 * cfg.budget_s:
            result["skipped"] = f"not started: 75% of the {cfg.budget_s:.0f} s time budget was spent"
            continue
        log(f"[{name}] setting up")
        try:
            spec = parse_row(name)
            is_ref = reference is None and is_reference(spec)
            with PeakMemory(device) as mem:
                row = setup_row(spec, ctx, components if is_ref else None)
                t = time.perf_counter()
                first = row.generate(request)
                for _ in range(cfg.warmup - 1):
                    row.generate(request)
                time_stages(row.backend, inputs.to(row.device), row.device)  # a compiler may specialise on them
                row.cold_s["warmup"] = time.perf_counter() - t
        except Exception as e:  # a row that cannot run says why and never breaks the table
            if reference is None and name == names[0]:
                raise
            result["skipped"] = bench_report.one_line(e)
            log(f"[{name}] skipped: {result['skipped']}")
            continue
        if is_ref:
            reference, flops = first, unet_flops(row.backend, inputs.to(row.device))
            row.cold_s["load"] = load_s
            mem.include(ref_mem)  # its weights were loaded before the row began
            components = None  # the eager row holds the modules now; nothing else keeps them
        result.update(bench_report.describe_row(row, mem, device))
        result.update(bench_report.drift(first, reference, is_ref))
        row.samples = {k: [] for k in ("text_encoder_ms", "unet_step_ms", "vae_decode_ms", "e2e_ms",
                                       "pipeline_unet_step_ms", "outside_loop_ms")}
        row.result, row.inputs = result, inputs.to(row.device)
        result["group"] = group  # rows with the same group were measured in the same rounds
        if cfg.sequential:
            measure_now([row], last=name == names[-1])
            row = first = None  # nothing keeps the runtime: the next row's memory baseline starts clean
            group += 1
        else:
            live.append(row)
    measure_now(live, last=True)
    bench_report.add_speedups(results, flops)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    env = bench_report.environment(device) | {"load_avg_start": load_start}
    return {"config": asdict(cfg), "command": command_line(cfg), "env": env,
            "request": {k: getattr(request, k) for k in ("steps", "guidance", "scheduler", "seed", "height", "width",
                                                         "batch")} | {"prompt": cfg.prompt,
                                                                      "unet_gflop_per_step": flops and flops / 1e9},
            "wall_s": round(time.perf_counter() - started, 1), "results": results}


def profiles_now(profile: bool, device, last: bool) -> bool:
    """Whether rows measured now are profiled. A profile runs after its rows' timed rounds; on CUDA, Kineto leaves
    CUPTI attached when a profile ends, which slows everything after it (pytorch#144455), so there only the rows
    measured last are (with --sequential: the last row)."""
    return profile and (device.type != "cuda" or last)


def measure(rows: list, request, runs: int, log, deadline: float | None = None, profile: bool = False) -> None:
    """`runs` rounds over `rows`: per row one sample of each stage and one end-to-end generation; then summarize
    into each row's result, profile it if asked (sdrt.bench_profile), and release the row. Past `deadline` (the
    time budget) no new round starts once every row has one: a report with fewer rounds beats a suite killed before
    it writes anything."""
    from sdrt.bench_rows import ONNX_BACKENDS, release_memory, time_stages

    for r in range(runs):
        if r and deadline is not None and time.perf_counter() > deadline:
            log(f"time budget spent: {r} of {runs} rounds measured")
            break
        for row in rows if r % 2 == 0 else rows[::-1]:  # alternate the order: no row always runs after another
            for k, v in time_stages(row.backend, row.inputs, row.device).items():
                row.samples[k].append(v)
            out = row.generate(request)
            row.samples["e2e_ms"].append(out.timings["total_ms"])
            row.samples["pipeline_unet_step_ms"] += list(out.timings.get("unet_ms", []))
            if "denoise_ms" in out.timings:  # sdrt's pipeline: what an image costs besides its denoising loop
                row.samples["outside_loop_ms"].append(out.timings["total_ms"] - out.timings["denoise_ms"])
        if rows:
            log(f"round {r + 1}/{runs}: " + ", ".join(f"{row.spec.name} {row.samples['e2e_ms'][-1]:.0f} ms"
                                                       for row in rows))
    from sdrt import bench_report

    for row in rows:
        row.result.update(bench_report.summarize(row.samples, request))
        row.result["rounds"] = len(row.samples["e2e_ms"])
        # On a CPU the profiler sees aten ops only: an ONNX runtime's work would be invisible, so only torch rows.
        if profile and (row.device.type == "cuda" or row.spec.kind not in ONNX_BACKENDS):
            from sdrt.bench_profile import profile_stages

            try:
                row.result["profile"] = profile_stages(row.backend, row.inputs, row.device)
            except Exception as e:  # the profiler is a diagnostic: never the reason a row has no numbers
                log(f"[{row.spec.name}] profile failed: {bench_report.one_line(e)}")
    rows.clear()  # the rows' runtimes go with the last references to them
    release_memory()


def available_mb() -> float:
    """MemAvailable from /proc/meminfo, in MB (inf where there is no /proc: no memory guard)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return float("inf")
