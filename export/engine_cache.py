"""The engine directory: a cache of TensorRT engines with a complete key, an engines.json manifest, a lock.

    ENGINE_DIR/
      unet.plan, text_encoder.plan, ...   serialized engines (written temp + os.replace)
      timing.cache                        TensorRT's tactic timings, reused by every later build on this GPU
      engines.json                        per engine: its key, its sha256, WHY it was (re)built; written LAST
      .build.lock                         flock'ed by the one builder allowed in the directory

An engine is trusted only if engines.json lists it with the sha256 of the file on disk, so an interrupted build
(engine replaced, manifest not yet) or a half-written file is never loaded. The key holds everything an engine
depends on: the graph's structure, its weights, precision and quantization recipe, profiles, build options,
TensorRT version, GPU compute capability and sdrt version. A TensorRT plan only runs on the TensorRT version
and GPU architecture that built it, so those two are also checked before loading (`check_compatible`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sdrt.export.dir_lock import DirLock

from sdrt.errors import SdrtError

ENGINES_JSON = "engines.json"
TIMING_CACHE = "timing.cache"
LOCK_FILE = ".build.lock"
FORMAT = 1


@dataclass(frozen=True)
class EngineKey:
    component: str
    graph_sha256: str         # structural: nodes, I/O, initializer names/shapes/dtypes -- not their values
    weights_sha256: str       # initializer values only
    precision: str            # the component's build mode: fp32, fp16, int8, int8-strongly-typed
    quantization: str | None  # sha256 of the exporter's quantization recipe (int8), else None
    profiles_sha256: str
    build_options: str        # e.g. "opt_level=3 refit=0"
    trt_version: str
    compute_capability: str   # "8.9": plans are specific to a GPU architecture
    sdrt_version: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> EngineKey:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


class Action(str, enum.Enum):
    SKIP = "skip"      # up to date
    BUILD = "build"
    REFIT = "refit"    # same graph structure, new weights, engine built refittable


@dataclass(frozen=True)
class Decision:
    action: Action
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


# Fields whose change forces a rebuild, with how the reason reads; weights are handled apart (refit).
_REBUILD_REASONS = [
    ("trt_version", "TensorRT version changed"),
    ("compute_capability", "GPU changed"),
    ("graph_sha256", "graph changed"),
    ("precision", "precision changed"),
    ("quantization", "quantization recipe changed"),
    ("profiles_sha256", "profiles changed"),
    ("build_options", "build options changed"),
    ("sdrt_version", "sdrt version changed"),
]
_SHOW_VALUES = {"trt_version", "compute_capability", "precision", "build_options", "sdrt_version"}


def decide(entry: dict | None, key: EngineKey, file_ok: bool, force: bool = False) -> Decision:
    """What to do for one component, given its engines.json entry (or None) and whether the engine file on
    disk matches that entry's sha256. Every reason that applies is listed, most fundamental first."""
    if entry is None:
        return Decision(Action.BUILD, ("new",))
    if not file_ok:
        return Decision(Action.BUILD, ("engine file missing or changed on disk",))
    old = EngineKey.from_json(entry["key"])
    reasons = []
    for name, text in _REBUILD_REASONS:
        a, b = getattr(old, name), getattr(key, name)
        if a != b:
            reasons.append(f"{text} ({a} -> {b})" if name in _SHOW_VALUES else text)
    if force:
        reasons.insert(0, "forced (--force)")
    weights = old.weights_sha256 != key.weights_sha256
    if reasons:
        return Decision(Action.BUILD, tuple(reasons + ["weights changed"] * weights))
    if not weights:
        return Decision(Action.SKIP, ("up to date",))
    if not entry.get("refittable"):
        return Decision(Action.BUILD, ("weights changed (rebuild: engine not built with --refittable)",))
    if key.precision.startswith("int8"):
        # Q/DQ scales move with the weights and are folded into the int8 kernels: not refittable.
        return Decision(Action.BUILD, ("weights changed (rebuild: int8 scales are baked into the engine)",))
    return Decision(Action.REFIT, ("weights changed (refit)",))


def check_compatible(entry: dict, trt_version: str, compute_capability: str, path: Path) -> None:
    """Refuse, with the fix, an engine from another TensorRT version or GPU: TensorRT would reject it at best."""
    key = EngineKey.from_json(entry["key"])
    if key.trt_version != trt_version:
        raise SdrtError(f"{path} was built with TensorRT {key.trt_version}, this is TensorRT {trt_version}; "
                        "rebuild it with `sdrt build`")
    if key.compute_capability != compute_capability:
        raise SdrtError(f"{path} was built for a GPU of compute capability {key.compute_capability}, this GPU is "
                        f"{compute_capability}; rebuild it on this GPU with `sdrt build`")


# --- files -------------------------------------------------------------------------------------------------

def atomic_write(path: Path, data) -> None:
    """Write bytes (or any buffer) to `path` so that readers see the old file or the whole new one, never a
    part: temp file in the same directory, fsync, os.replace. On failure the temp file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable before anything written after it
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str | None:
    try:
        with open(path, "rb") as f:
            h = hashlib.sha256()
            while block := f.read(chunk):
                h.update(block)
            return h.hexdigest()
    except FileNotFoundError:
        return None


def canonical_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def empty_manifest() -> dict:
    return {"format": FORMAT, "engines": {}}


def read_manifest(engine_dir: Path) -> dict:
    path = Path(engine_dir) / ENGINES_JSON
    if not path.exists():
        return empty_manifest()
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SdrtError(f"{path} is unreadable ({e}); delete it to rebuild every engine") from None
    if m.get("format") != FORMAT:
        raise SdrtError(f"{path} has format {m.get('format')}, this sdrt reads format {FORMAT}; rebuild the engines")
    return m


def write_manifest(engine_dir: Path, manifest: dict) -> None:
    atomic_write(Path(engine_dir) / ENGINES_JSON, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def load_trusted(engine_dir: Path, trt_version: str, compute_capability: str,
                 components: list[str] | None = None) -> dict[str, bytes]:
    """The engines' bytes, each checked against engines.json: same TensorRT, same GPU, same sha256. Anything
    else is refused with a one-line error, never handed to TensorRT."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    if not manifest["engines"]:
        raise SdrtError(f"no engines in {engine_dir} (no {ENGINES_JSON}): build them with `sdrt build ONNX_DIR "
                        f"-o {engine_dir}`")
    out = {}
    for name in components or sorted(manifest["engines"]):
        entry = manifest["engines"].get(name)
        if entry is None:
            raise SdrtError(f"{engine_dir} has no {name} engine; has {', '.join(sorted(manifest['engines']))}")
        path = engine_dir / entry["file"]
        check_compatible(entry, trt_version, compute_capability, path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SdrtError(f"{path}: {e.strerror}; rebuild with `sdrt build`") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SdrtError(f"{path} is not the engine {ENGINES_JSON} recorded (an interrupted or concurrent build?); "
                            "rerun `sdrt build`")
        out[name] = data
    return out


def trusted_engine(engine_dir: Path, entry: dict | None) -> bool:
    """The file exists and is byte for byte the one the manifest recorded (size first: cheap)."""
    if entry is None:
        return False
    path = Path(engine_dir) / entry["file"]
    return (path.exists() and path.stat().st_size == entry.get("bytes")
            and file_sha256(path) == entry.get("sha256"))


# --- lock --------------------------------------------------------------------------------------------------

class BuildLock(DirLock):
    """The one builder allowed in ENGINE_DIR: two would overwrite each other's engines and manifest."""

    def __init__(self, engine_dir: Path, timeout_s: float = 0.0, poll_s: float = 0.1):
        super().__init__(engine_dir, LOCK_FILE, "sdrt build", timeout_s, poll_s,
                         hint=" (raise --lock-timeout to wait longer)")


# --- ONNX hashes -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OnnxDigest:
    graph_sha256: str
    weights_sha256: str
    has_qdq: bool             # QuantizeLinear/DequantizeLinear nodes: an int8 (explicitly quantized) graph
    uint8_qdq: bool = False   # some Q/DQ has a uint8 zero point (ORT's asymmetric u8 recipe): TensorRT needs s8


def _external(init) -> dict | None:
    from onnx import TensorProto

    if init.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in init.external_data}


def onnx_digest(path: Path, chunk: int = 1 << 24) -> OnnxDigest:
    """Structural hash (the graph with every initializer's data and file layout removed, plus metadata that
    doesn't change what runs) and weights hash (every initializer's name, dtype, dims and bytes, sorted by
    name; external data streamed from its file, so a multi-GB UNet is never in memory at once)."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    w = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        w.update(f"{init.name}\0{init.data_type}\0{tuple(init.dims)}\0".encode())
        ext = _external(init)
        if ext is None:
            w.update(init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes())
            continue
        with open(path.parent / ext["location"], "rb") as f:
            f.seek(int(ext.get("offset", 0)))
            left = int(ext["length"]) if "length" in ext else None  # no length: to the end of the file
            while left is None or left > 0:
                block = f.read(chunk if left is None else min(chunk, left))
                if not block:
                    break
                w.update(block)
                left = None if left is None else left - len(block)
    for init in model.graph.initializer:
        init.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data",
                      "external_data"):
            init.ClearField(field)
        init.data_location = onnx.TensorProto.DEFAULT
    for field in ("doc_string", "producer_name", "producer_version", "metadata_props"):
        model.ClearField(field)
    graph = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    uint8 = any(len(n.input) > 2 and dtypes.get(n.input[2]) == onnx.TensorProto.UINT8 for n in qdq)
    return OnnxDigest(graph, w.hexdigest(), bool(qdq), uint8)
