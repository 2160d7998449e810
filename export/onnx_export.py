"""`export_model`: a model's components -> DIR/<component>.onnx (+ .onnx.data) and DIR/manifest.json.

Per component: trace (onnx_graph.trace, at onnx_specs.trace_shape) -> onnxscript's optimizer -> [fp16] -> save
into a private temp folder DIR/.sdrt-tmp-<pid>-<component>/ -> check on ONNX Runtime at onnx_specs.check_shape ->
hash -> os.replace into DIR (weights first, graph last). The manifest is written last, atomically.

Incremental: a run whose key (format, sdrt version, source hash, precision, opset) matches DIR's manifest keeps
every component whose files still match their recorded sizes and hashes, and exports only the rest; when nothing
is left it is a no-op and says so. A file without a matching manifest entry is never trusted: before a component's
files are replaced, DIR's old manifest is rewritten without it, so an interrupted run leaves the old manifest minus
what it replaced (even a same-size file, which the runtime's size-only check would take for the old one), or none.
Temp folders left by a killed run are deleted at the start of the next one (those of a live pid are left alone).

One export per DIR at a time: the writing part holds an flock on DIR/.export.lock (sdrt.export.dir_lock), and a
second export into DIR waits for it, then finds the first one's graphs up to date. That is two `sdrt generate`
processes starting together on the shared cache, or an int8 export (the same lock, in its own directory).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from sdrt.export.dir_lock import DirLock

from sdrt.errors import SdrtError

PRECISIONS = ("fp32", "fp16")
OPSETS = (17, 18)
TMP_PREFIX = ".sdrt-tmp-"
LOCK_FILE = ".export.lock"
LOCK_TIMEOUT_S = 3600.0  # an sdxl export takes minutes; a holder that died has already released the lock
KEY = ("format", "sdrt_version", "precision", "opset")


def export_model(model, out_dir, precision: str = "fp32", opset: int = 18, components=None, force: bool = False,
                 progress: bool = True, external_data_threshold: int | None = None, seed: int = 0) -> dict:
    """Export `model` (a MODEL string for sdrt.models.load_model, or fp32 `Components`) to ONNX in `out_dir`.

    components: names out of text_encoder, text_encoder_2, unet, vae_decoder, vae_encoder (default: all the
    model has). external_data_threshold: initializer bytes above which weights go to `<file>.data` (default
    2 GiB - 64 MiB; tests pass 0). Returns the manifest dict (also in DIR/manifest.json)."""
    from sdrt.export.onnx_graph import EXTERNAL_DATA_THRESHOLD
    from sdrt.export.onnx_manifest import entry_problem, forget, read_manifest, write_manifest
    from sdrt.export.onnx_specs import graph_specs

    if precision not in PRECISIONS:
        raise SdrtError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if opset not in OPSETS:
        raise SdrtError(f"opset {opset} is not supported (use {' or '.join(map(str, OPSETS))})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SdrtError(f"output path {out_dir} exists and is not a directory")
    if isinstance(model, (str, os.PathLike)) and not force:
        up_to_date = _up_to_date(str(model), seed, out_dir, precision, opset, components, progress)
        if up_to_date is not None:
            return up_to_date
    c = _components(model, seed)
    specs = graph_specs(c)
    names = _select(components, specs, c.name)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdrtError(f"cannot create {out_dir}: {e.strerror}") from None
    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    with export_lock(out_dir, say):
        _clean_temp(out_dir)

        header = _header(c, precision, opset)
        old = read_manifest(out_dir)
        same = old is not None and all(old.get(k) == header[k] for k in KEY) and \
            old.get("model", {}).get("source_hash") == header["model"]["source_hash"]
        kept = {}
        if same:
            for n, entry in old["components"].items():
                if n in specs and not (force and n in names) and entry_problem(out_dir, entry) is None:
                    kept[n] = entry
        todo = [n for n in names if n not in kept]
        if not todo and old is not None and kept == old["components"]:
            say(_up_to_date_line(out_dir, names))
            return old

        t0, peak = time.perf_counter(), _reset_peak_rss()
        say(f"exporting {c.name} ({precision}, opset {opset}) to {out_dir}: {', '.join(todo)}"
            + (f" (kept: {', '.join(kept)})" if kept else ""))
        if old is not None and old.get("model", {}).get("source_hash") != header["model"]["source_hash"]:
            old = forget(out_dir, old, list(old["components"]))  # the tokenizers below are another model's
        _save_tokenizers(c, out_dir)
        for n in todo:
            def before_replace(name=n):
                nonlocal old
                old = forget(out_dir, old, [name])
            kept[n] = export_component(specs[n], out_dir, precision, opset, c, threshold, before_replace)
            e, v = kept[n], kept[n]["validation"]
            peak = max(peak, e["peak_rss_mb"])
            say(f"  {n:<15} {e['export_s']:6.1f} s  peak RSS {e['peak_rss_mb'] / 1024:5.2f} GiB  "
                f"{e['bytes'] / 1e6:8.1f} MB  {e['dtype']}  ORT vs torch: max_abs {v['max_abs']:.1e} "
                f"max_rel {v['max_rel']:.1e} <= {v['tolerance']:.0e} (batch {v['batch']}, {v['height']}x{v['width']})")
        manifest = {**header, "components": {n: kept[n] for n in specs if n in kept}}
        write_manifest(out_dir, manifest)
        say(f"wrote {out_dir / 'manifest.json'} in {time.perf_counter() - t0:.1f} s "
            f"(peak RSS {max(peak, _peak_rss_mb()) / 1024:.2f} GiB)")
        return manifest


def export_component(spec, out_dir: Path, precision: str, opset: int, c, threshold: int,
                     before_replace=lambda: None) -> dict:
    """One graph, start to finish, in a private temp folder in out_dir; returns its manifest entry. Only the final
    os.replace calls put files under their real names, after before_replace() (which takes the component out of
    DIR's old manifest)."""
    from sdrt.export.onnx_check import check_graph
    from sdrt.export.onnx_graph import io_dtypes, optimize, save, to_fp16, trace
    from sdrt.export.onnx_manifest import sha256_file
    from sdrt.export.onnx_specs import check_shape, trace_shape

    tmp = out_dir / f"{TMP_PREFIX}{os.getpid()}-{spec.name}"
    _reset_peak_rss()
    t0 = time.perf_counter()
    try:
        (tmp / "trace").mkdir(parents=True)
        model = trace(spec, spec.sample_inputs(*trace_shape(c)), tmp / "trace" / "model.onnx", opset)
        optimize(model)
        fp16 = precision == "fp16" and spec.fp16
        if fp16:
            model = to_fp16(model, spec)
        graph = tmp / f"{spec.name}.onnx"
        data = save(model, graph, threshold)
        del model
        shutil.rmtree(tmp / "trace")  # the traced weights, read lazily until saved (one file per tensor > 2 GB)
        dtype = "float16" if fp16 else "float32"
        t1 = time.perf_counter()
        validation = check_graph(spec, graph, *check_shape(c), dtype=dtype)
        check_s = time.perf_counter() - t1
        dtypes = io_dtypes(graph)
        entry = {"file": graph.name, "external_data": data, "opset": opset, "dtype": dtype,
                 "graph_sha256": sha256_file(graph), "graph_bytes": graph.stat().st_size,
                 "weights_sha256": sha256_file(tmp / data) if data else None,
                 "weights_bytes": (tmp / data).stat().st_size if data else None,
                 "inputs": [_io(t, dtypes) for t in spec.inputs], "outputs": [_io(t, dtypes) for t in spec.outputs],
                 "dynamic_axes": {k: {str(i): a for i, a in v.items()} for k, v in spec.dynamic_axes.items()},
                 "validation": validation}
        if precision == "fp16" and not fp16:
            entry["fp32_reason"] = "SDXL's VAE overflows in fp16 (vae.config.force_upcast)"
        entry["bytes"] = entry["graph_bytes"] + (entry["weights_bytes"] or 0)
        before_replace()
        # weights before graph: a graph in DIR only ever refers to a complete data file
        if data:
            os.replace(tmp / data, out_dir / data)
        elif (out_dir / f"{graph.name}.data").exists():
            (out_dir / f"{graph.name}.data").unlink()
        os.replace(graph, out_dir / graph.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    entry["export_s"] = round(time.perf_counter() - t0, 2)
    entry["check_s"] = round(check_s, 2)
    entry["peak_rss_mb"] = round(_peak_rss_mb())
    return entry


def _io(t, dtypes: dict) -> dict:
    return {"name": t.name, "dtype": dtypes[t.name], "shape": list(t.shape)}


def _components(model, seed: int):
    import torch

    from sdrt.models import load_model

    c = load_model(model, seed=seed) if isinstance(model, (str, os.PathLike)) else model
    for name, m in c.modules.items():
        if next(m.parameters()).dtype != torch.float32:
            raise SdrtError(f"export needs fp32 modules ({name} is {next(m.parameters()).dtype}); "
                            "--precision fp16 converts the graphs")
    return c


def _up_to_date(model: str, seed: int, out_dir: Path, precision: str, opset: int, components,
                progress: bool) -> dict | None:
    """The no-op re-run without building the model: same weights hash, precision, opset, sdrt version, and every
    requested component's file matching the manifest. None means: build the model and go the long way."""
    from sdrt.export.onnx_manifest import FORMAT, entry_problem, model_components, read_manifest

    from sdrt import __version__
    from sdrt.models import source_hash

    old = read_manifest(out_dir) if out_dir.is_dir() else None
    if old is None or (old.get("format"), old.get("sdrt_version"), old.get("precision"), old.get("opset")) != (
            FORMAT, __version__, precision, opset):
        return None
    entries = old.get("components", {})
    # no --components: all the model has, not all the last (perhaps partial) export wrote
    every = model_components(old.get("model", {}))
    wanted = [components] if isinstance(components, str) else list(dict.fromkeys(components or every))
    if not wanted or any(n not in entries or entry_problem(out_dir, entries[n]) for n in wanted):
        return None
    if old.get("model", {}).get("source_hash") != source_hash(model, seed):
        return None
    if progress:
        print(_up_to_date_line(out_dir, wanted), file=sys.stderr, flush=True)
    return old


def _up_to_date_line(out_dir: Path, names) -> str:
    return (f"{out_dir}: up to date ({', '.join(names)}: same weights, precision, opset and sdrt version; files "
            "match the manifest), nothing to do (--force re-exports)")


def export_lock(out_dir: Path, say) -> DirLock:
    """One export per directory (this one and the int8 export): a second one, say another service starting on the
    same cache, waits, then finds the first one's graphs up to date instead of spending the same minutes and
    gigabytes again."""
    return DirLock(out_dir, LOCK_FILE, "sdrt export", LOCK_TIMEOUT_S,
                   on_wait=lambda holder: say(f"{out_dir}: another export ({holder}) is writing here; waiting for it"))


def _select(components, specs: dict, model_name: str) -> list[str]:
    if not components:
        return list(specs)
    components = [components] if isinstance(components, str) else list(components)
    from sdrt.export.onnx_specs import COMPONENTS

    for n in components:
        if n not in specs:
            why = f"model {model_name} has no {n}" if n in COMPONENTS else f"unknown component '{n}'"
            raise SdrtError(f"{why} (choose from {', '.join(specs)})")
    return [n for n in specs if n in components]


def _header(c, precision: str, opset: int) -> dict:
    import onnx
    import onnxruntime
    import torch
    from sdrt.export.onnx_manifest import FORMAT
    from sdrt.export.onnx_specs import size_bounds, trace_shape

    from sdrt import __version__

    b, h, w = trace_shape(c)
    return {"format": FORMAT, "sdrt_version": __version__, "precision": precision, "opset": opset,
            "model": {"name": c.name, "family": c.family.value, "source": c.source, "source_hash": c.source_hash,
                      "prediction_type": c.prediction_type, "vae_scale": c.vae_scale,
                      "default_size": c.default_size, "scheduler_config": c.scheduler_config,
                      # what the graphs honour: True = the VAE stays fp32 in fp16 exports (SDXL)
                      "vae_force_upcast": c.vae_force_upcast,
                      "defaults": c.defaults, "tokenizers": [f"tokenizer{'_2' if i else ''}"
                                                             for i in range(len(c.tokenizers))]},
            **size_bounds(c), "trace": {"batch": b, "height": h, "width": w},
            "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__,
                              "onnxruntime": onnxruntime.__version__}}


def _save_tokenizers(c, out_dir: Path) -> None:
    """DIR/tokenizer[_2]/, the ids the text encoder graphs take, for other runtimes that serve the export (sdrt
    itself tokenizes with the model it loads); each folder replaced whole."""
    for i, tok in enumerate(c.tokenizers):
        final = out_dir / f"tokenizer{'_2' if i else ''}"
        tmp = out_dir / f"{TMP_PREFIX}{os.getpid()}-{final.name}"
        tok.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


def _clean_temp(out_dir: Path) -> None:
    """Delete temp files left by exports that died (named after their pid); a running export's are left alone."""
    stale = [(p, p.name[len(TMP_PREFIX):].split("-")[0]) for p in out_dir.glob(f"{TMP_PREFIX}*")]
    stale += [(p, p.name.rsplit("-", 1)[1]) for p in out_dir.glob(".manifest.json.tmp-*")]
    for p, pid in stale:
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def _reset_peak_rss() -> float:
    """Linux: writing 5 to clear_refs resets VmHWM, so each component's peak is its own. Returns the peak so far."""
    before = _peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return before


def _peak_rss_mb() -> float:
    """Peak resident memory in MiB since the last reset (VmHWM); getrusage's lifetime peak where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
