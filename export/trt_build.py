"""Build TensorRT engines from an `sdrt export` directory: one engine per component, cached in an engine dir.

`build_engines` is the orchestration (plan, decide, build or refit, write atomically, manifest last, under the
directory lock); the TensorRT calls live in `trt_builder.TensorRTBuilder`, passed in, so everything but TensorRT
itself is tested on machines without it (tests pass a fake builder that returns bytes).

Precision, per component (`component_mode`):
  fp32  TensorRT's default (TF32 allowed on Ampere+).
  fp16  BuilderFlag.FP16: TensorRT may run any layer in fp16. VAEs the exporter or model keep in fp32 (SDXL's
        overflows in fp16) stay fp32.
  int8  needs an explicitly quantized graph: QuantizeLinear/DequantizeLinear pairs from `sdrt export`'s int8
        path (precision "int8" in its manifest). A Q/DQ graph whose float parts are fp16 is built STRONGLY_TYPED
        (TensorRT keeps the graph's own types; precision flags are not allowed then); an fp32 Q/DQ graph is built
        with INT8 + FP16 so the unquantized layers may still use fp16. Components without Q/DQ (text encoders,
        VAE) are built as for fp16.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from sdrt.export.engine_cache import (
    TIMING_CACHE,
    Action,
    BuildLock,
    Decision,
    EngineKey,
    atomic_write,
    canonical_sha256,
    decide,
    onnx_digest,
    read_manifest,
    trusted_engine,
    write_manifest,
)
from sdrt.export.onnx_manifest import entry_problem, model_components
from sdrt.export.trt_profiles import ComponentProfile, ProfileSpec, component_profiles, parse_profiles

from sdrt import __version__
from sdrt.errors import SdrtError

COMPONENT_ORDER = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


class Mode(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"                          # Q/DQ graph, weakly typed: INT8 + FP16 flags
    INT8_STRONG = "int8-strongly-typed"    # Q/DQ graph in fp16: the network's types are the precision


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"                # what the user asked; each component gets a Mode from it
    profiles: tuple[ProfileSpec, ...] = ()
    cfg: bool = True                       # classifier-free guidance doubles the UNet batch
    opt_level: int = 3                     # builder_optimization_level: 0 fast build .. 5 slow build, fastest engine
    refittable: bool = False               # BuilderFlag.REFIT: later weight-only changes refit instead of rebuild
    force: bool = False
    lock_timeout_s: float = 0.0
    components: tuple[str, ...] | None = None
    verbose: bool = False


@dataclass(frozen=True)
class ComponentPlan:
    name: str
    onnx_path: Path
    mode: Mode
    profiles: list[ComponentProfile]
    opt_level: int
    refittable: bool

    @property
    def strongly_typed(self) -> bool:
        return self.mode is Mode.INT8_STRONG

    @property
    def builder_flags(self) -> tuple[str, ...]:
        """trt.BuilderFlag names to set."""
        precision = {Mode.FP32: (), Mode.FP16: ("FP16",), Mode.INT8: ("INT8", "FP16"), Mode.INT8_STRONG: ()}
        return precision[self.mode] + (("REFIT",) if self.refittable else ())


@dataclass
class BuiltEngine:
    plan: object                           # bytes or a buffer (TensorRT's IHostMemory)
    timing_cache: bytes | None = None


class Builder(Protocol):
    trt_version: str
    compute_capability: str                # "8.9"
    device_name: str

    def build(self, plan: ComponentPlan, timing_cache: bytes | None, log: Callable[[str], None]) -> BuiltEngine: ...
    def refit(self, plan: ComponentPlan, engine: bytes) -> object: ...


@dataclass
class BuildRecord:
    component: str
    decision: Decision
    seconds: float = 0.0
    bytes: int = 0
    mode: str = ""


@dataclass(frozen=True)
class Planned:
    plan: ComponentPlan
    key: EngineKey
    extra: dict = field(default_factory=dict)  # I/O spec copied into engines.json


# --- the ONNX directory ------------------------------------------------------------------------------------

def read_onnx_manifest(onnx_dir: Path) -> dict:
    onnx_dir = Path(onnx_dir)
    if not onnx_dir.is_dir():
        raise SdrtError(f"{onnx_dir} is not a directory: pass the output of `sdrt export MODEL -o DIR`")
    path = onnx_dir / "manifest.json"
    if not path.exists():
        raise SdrtError(f"{onnx_dir} has no manifest.json: not an `sdrt export` directory, or an interrupted export "
                        "(the manifest is written last)")
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise SdrtError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("components"), dict) or not m["components"]:
        raise SdrtError(f"{path} lists no components; re-export with `sdrt export`")
    if not isinstance(m.get("model"), dict) or not isinstance(m["model"].get("default_size"), int):
        raise SdrtError(f"{path} has no model description with a default_size; re-export with `sdrt export`")
    for name, comp in m["components"].items():
        ok = isinstance(comp, dict) and isinstance(comp.get("file"), str) and isinstance(comp.get("inputs"), list)
        if not ok:
            raise SdrtError(f"{path}: the {name} entry lacks its file or inputs; re-export with `sdrt export`")
        if not (onnx_dir / comp["file"]).exists():
            raise SdrtError(f"{onnx_dir / comp['file']} ({name}) is missing; re-export with `sdrt export`")
        # sizes only (the hashes would read every graph): a truncated file is refused before any build
        if (problem := entry_problem(onnx_dir, comp, verify_hashes=False)) is not None:
            raise SdrtError(f"{path}: {name}: {problem}; re-export with `sdrt export`")
    return m


def force_fp32(name: str, comp: dict, manifest: dict) -> bool:
    """Components that must not run in fp16: a graph the exporter kept in fp32 inside an fp16 export, and the
    VAE of models whose VAE overflows in fp16 (diffusers' force_upcast; SDXL's)."""
    if manifest.get("precision") == "fp16" and comp.get("dtype") == "float32":
        return True
    model = manifest.get("model", {})
    return name.startswith("vae") and bool(model.get("vae_force_upcast", model.get("family") == "sdxl"))


def component_mode(name: str, precision: str, comp: dict, manifest: dict, has_qdq: bool) -> Mode:
    if has_qdq and precision != "int8":
        raise SdrtError(f"{comp['file']} is an int8 (Q/DQ) graph: build it with --precision int8")
    if has_qdq:
        return Mode.INT8_STRONG if comp.get("dtype") == "float16" else Mode.INT8
    if precision == "fp32" or force_fp32(name, comp, manifest):
        return Mode.FP32
    return Mode.FP16


def quantization_sha256(manifest: dict) -> str | None:
    """The int8 export's quantization recipe (`sdrt export --precision int8` records it), hashed for the key of the
    graphs it quantized. Its scales are in the weights hash too; the recipe also names the Q/DQ placement."""
    recipe = (manifest.get("int8") or {}).get("settings", {}).get("recipe")
    return canonical_sha256(recipe) if recipe else None


def check_sizes(specs: tuple[ProfileSpec, ...], manifest: dict) -> None:
    """Profiles within the sizes the export serves (its manifest's min_size and size_multiple): below min_size the
    UNet's lowest level is empty. max_size is only the exporter's advice; the graphs have no upper bound."""
    lo, step = manifest.get("min_size", 8), manifest.get("size_multiple", 8)
    for spec in specs:
        for span in (spec.height, spec.width):
            if span.min < lo:
                raise SdrtError(f"--profile {spec}: {span.min} px is below the export's minimum {lo} px")
            if any(v % step for v in (span.min, span.opt, span.max)):
                raise SdrtError(f"--profile {spec}: sizes must be multiples of {step} px for this export")


def check_request(onnx_dir: Path, manifest: dict, options: BuildOptions) -> list[str]:
    """The components to build, in pipeline order, once the options fit the export (cheap: the CLI checks this
    before it looks for TensorRT, so a user sees their own mistakes first)."""
    check_sizes(options.profiles, manifest)
    available = [c for c in COMPONENT_ORDER if c in manifest["components"]]
    available += sorted(set(manifest["components"]) - set(available))
    names = list(options.components or available)
    unknown = [n for n in names if n not in manifest["components"]]
    if unknown:
        raise SdrtError(f"no component {unknown[0]!r} in {onnx_dir}; it has {', '.join(available)}")
    # Without --components, what a generation needs (the VAE encoder is img2img's): an export that was stopped
    # lists only the components it had not begun to replace, and engines for those alone would fail later.
    needed = [n for n in model_components(manifest["model"]) if n != "vae_encoder"]
    missing = [n for n in needed if n not in manifest["components"]]
    if options.components is None and missing:
        raise SdrtError(f"{onnx_dir} has no {', '.join(missing)} (an export that did not finish?): re-run `sdrt "
                        "export`, or build what it has with --components")
    if not options.lock_timeout_s >= 0:  # also NaN
        raise SdrtError(f"--lock-timeout must be a number of seconds >= 0, got {options.lock_timeout_s}")
    return names


def graph_digest(path: Path):
    from google.protobuf.message import DecodeError

    try:
        return onnx_digest(path)
    except (OSError, DecodeError) as e:  # a truncated or foreign file that the manifest had no size for
        raise SdrtError(f"{path}: not a readable ONNX graph ({e}); re-export with `sdrt export`") from None


def make_engine_dir(engine_dir: Path) -> None:
    try:
        engine_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdrtError(f"{engine_dir}: cannot create the engine directory ({e.strerror})") from None


def plan_components(onnx_dir: Path, manifest: dict, options: BuildOptions, builder: Builder) -> list[Planned]:
    """Hash every graph and derive every profile before building anything: bad input fails in seconds."""
    names = check_request(onnx_dir, manifest, options)
    digests = {n: graph_digest(onnx_dir / manifest["components"][n]["file"]) for n in names}
    if options.precision == "int8" and not any(d.has_qdq for d in digests.values()):
        raise SdrtError(f"--precision int8 needs an int8 (Q/DQ) export; {onnx_dir} is "
                        f"{manifest.get('precision', '?')}: run the int8 export first")
    asym = [n for n in names if digests[n].uint8_qdq]
    if asym:
        raise SdrtError(f"{asym[0]}.onnx is quantized with uint8 activations (ONNX Runtime's recipe); TensorRT "
                        "needs symmetric int8 Q/DQ: re-export with the tensorrt int8 recipe")
    planned = []
    for n in names:
        comp, d = manifest["components"][n], digests[n]
        plan = ComponentPlan(n, onnx_dir / comp["file"], component_mode(n, options.precision, comp, manifest,
                                                                        d.has_qdq),
                             component_profiles(n, comp["inputs"], options.profiles, options.cfg),
                             options.opt_level, options.refittable)
        key = EngineKey(
            component=n, graph_sha256=d.graph_sha256, weights_sha256=d.weights_sha256, precision=plan.mode.value,
            quantization=quantization_sha256(manifest) if d.has_qdq else None,
            # shapes only: a bucket's name merging into a shared text-encoder profile changes no engine
            profiles_sha256=canonical_sha256([p.to_json()["inputs"] for p in plan.profiles]),
            build_options=f"opt_level={options.opt_level} refit={int(options.refittable)}",
            trt_version=builder.trt_version, compute_capability=builder.compute_capability, sdrt_version=__version__)
        planned.append(Planned(plan, key, {"inputs": comp["inputs"], "outputs": comp.get("outputs", [])}))
    return planned


# --- orchestration -----------------------------------------------------------------------------------------

def _timing_cache(engine_dir: Path, manifest: dict, builder: Builder, log) -> bytes | None:
    """Reuse timings only from the same TensorRT on the same GPU architecture; they mean nothing elsewhere."""
    meta, path = manifest.get("timing_cache"), engine_dir / TIMING_CACHE
    if not path.exists() or not meta:
        return None
    if (meta.get("trt_version"), meta.get("compute_capability")) != (builder.trt_version, builder.compute_capability):
        log(f"timing cache is from TensorRT {meta.get('trt_version')} on sm {meta.get('compute_capability')}: "
            "starting a fresh one")
        return None
    data = path.read_bytes()
    return data if hashlib.sha256(data).hexdigest() == meta.get("sha256") else None


def _check_partial(engine_dir: Path, manifest: dict, done: dict, building: set[str]) -> None:
    """engines.json records one precision, CFG setting and bucket list for the whole directory (the backend
    refuses requests by them before any work). A --components build that changed them while other
    engines stay as they were would make that record wrong for the engines it did not touch."""
    kept = sorted(set(manifest["engines"]) - building)
    if not kept:
        return
    changed = [f"{k} {manifest[k]} -> {done[k]}" for k in ("precision", "cfg", "profiles")
               if k in manifest and manifest[k] != done[k]]
    if changed:
        raise SdrtError(f"{engine_dir}: the {', '.join(kept)} engine(s) stay as built, so this --components build "
                        f"cannot change {'; '.join(changed)}: build every component (no --components) or use "
                        "another -o")


def build_engines(onnx_dir: Path, engine_dir: Path, options: BuildOptions, builder: Builder,
                  log: Callable[[str], None] = print) -> list[BuildRecord]:
    onnx_dir, engine_dir = Path(onnx_dir), Path(engine_dir)
    onnx_manifest = read_onnx_manifest(onnx_dir)
    if not options.profiles:  # as the CLI does without --profile
        options = replace(options, profiles=parse_profiles(None, onnx_manifest["model"]["default_size"]))
    make_engine_dir(engine_dir)
    with BuildLock(engine_dir, options.lock_timeout_s):
        manifest = read_manifest(engine_dir)
        planned = plan_components(onnx_dir, onnx_manifest, options, builder)
        # what the whole directory was built for: recorded once every engine is done
        done = {"sdrt_version": __version__, "onnx_dir": str(onnx_dir.resolve()), "model": onnx_manifest.get("model"),
                "precision": options.precision, "cfg": options.cfg, "profiles": [str(s) for s in options.profiles]}
        _check_partial(engine_dir, manifest, done, {p.plan.name for p in planned})
        cache = _timing_cache(engine_dir, manifest, builder, log)
        records = []
        for i, p in enumerate(planned, 1):
            name, prefix = p.plan.name, f"[{i}/{len(planned)}] {p.plan.name}"
            entry = manifest["engines"].get(name)
            decision = decide(entry, p.key, trusted_engine(engine_dir, entry), options.force)
            record = BuildRecord(name, decision, mode=p.plan.mode.value)
            records.append(record)
            if decision.action is Action.SKIP:
                entry["profiles"] = [q.to_json() for q in p.plan.profiles]  # same shapes; names may be new
                log(f"{prefix}: up to date ({entry['key']['precision']}; built because: {entry['reason']})")
                continue
            names = ", ".join(q.name for q in p.plan.profiles)
            log(f"{prefix}: {decision.action.value} ({decision.reason}): {p.plan.mode.value}, "
                f"{len(p.plan.profiles)} profile(s) [{names}], opt level {p.plan.opt_level}")
            t0 = time.perf_counter()
            if decision.action is Action.REFIT:
                data = builder.refit(p.plan, (engine_dir / entry["file"]).read_bytes())
            else:
                built = builder.build(p.plan, cache, log)
                data, cache = built.plan, built.timing_cache or cache
            record.seconds = time.perf_counter() - t0
            view = memoryview(data).cast("B")  # TensorRT's IHostMemory or bytes, as flat bytes
            record.bytes = view.nbytes
            file = f"{name}.plan"
            atomic_write(engine_dir / file, view)
            if decision.action is Action.BUILD and cache:
                atomic_write(engine_dir / TIMING_CACHE, cache)
                manifest["timing_cache"] = {"file": TIMING_CACHE, "trt_version": builder.trt_version,
                                            "compute_capability": builder.compute_capability,
                                            "sha256": hashlib.sha256(cache).hexdigest()}
            manifest["engines"][name] = {
                "file": file, "bytes": view.nbytes, "sha256": hashlib.sha256(view).hexdigest(),
                "key": p.key.to_json(), "key_sha256": canonical_sha256(p.key.to_json()),
                "reason": decision.reason, "action": decision.action.value, "refittable": p.plan.refittable,
                "profiles": [q.to_json() for q in p.plan.profiles], "device_name": builder.device_name,
                "build_s": round(record.seconds, 3), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **p.extra}
            write_manifest(engine_dir, manifest)  # last: only now is the new engine trusted
            log(f"{prefix}: {decision.action.value} done in {record.seconds:.1f} s ({record.bytes / 1e6:.1f} MB)")
        manifest.update(done)
        write_manifest(engine_dir, manifest)
    return records


def summary(records: list[BuildRecord]) -> str:
    lines = [f"{'component':<16}{'mode':<21}{'action':<8}{'seconds':>9}{'MB':>10}  reason"]
    for r in records:
        mb = f"{r.bytes / 1e6:.1f}" if r.bytes else "-"
        secs = f"{r.seconds:.1f}" if r.decision.action is not Action.SKIP else "-"
        lines.append(f"{r.component:<16}{r.mode:<21}{r.decision.action.value:<8}{secs:>9}{mb:>10}  {r.decision.reason}")
    return "\n".join(lines)
