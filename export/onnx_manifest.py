"""`DIR/manifest.json`: what an export wrote, read back by the runtime, the benchmark harness and int8.

A manifest is trusted only as a whole: it is written last and atomically (temp file + os.replace), and every
component it lists must still have its files with the recorded sizes and sha256. Anything else (no manifest, an
older format, a component missing, a file replaced or truncated by an interrupted export) is an SdrtError saying
to re-run `sdrt export`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sdrt.errors import SdrtError

FORMAT = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(out_dir: Path) -> dict | None:
    """The parsed manifest, or None when there is none or it is unreadable (the exporter then starts afresh)."""
    try:
        m = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if well_formed(m) else None


def well_formed(m) -> bool:
    """The shape every reader relies on: a format-1 object whose model and component entries are objects."""
    return (isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("model", {}), dict)
            and isinstance(m.get("components"), dict) and all(isinstance(e, dict) for e in m["components"].values()))


def write_manifest(out_dir: Path, manifest: dict) -> None:
    out_dir = Path(out_dir)
    tmp = out_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)


def forget(out_dir: Path, manifest: dict | None, names) -> dict | None:
    """`manifest` without the entries `names`, written to DIR before their files are replaced, and returned. The
    runtime's quick check (verify_hashes=False) compares sizes only, and a new graph of the same architecture has
    the old one's size: were the run to die between the replace and the new manifest, the old entry would vouch
    for the new file."""
    if manifest is None or not any(n in manifest["components"] for n in names):
        return manifest
    manifest = {**manifest, "components": {n: e for n, e in manifest["components"].items() if n not in names}}
    write_manifest(out_dir, manifest)
    return manifest


def entry_problem(out_dir: Path, entry: dict, verify_hashes: bool = True) -> str | None:
    """Why a component entry cannot be trusted, or None: each file must exist with its recorded size and hash."""
    files = [(entry.get("file"), entry.get("graph_sha256"), entry.get("graph_bytes"))]
    if entry.get("external_data"):
        files.append((entry["external_data"], entry.get("weights_sha256"), entry.get("weights_bytes")))
    for name, digest, size in files:
        if not name or not digest:
            return "incomplete entry"
        if not isinstance(name, str) or Path(name).name != name:  # the export's own files only, never ../x.onnx
            return f"{name!r} is not a file name in the export directory"
        path = Path(out_dir) / name
        if not path.is_file():
            return f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if verify_hashes and sha256_file(path) != digest:
            return f"{name} does not match its sha256 in the manifest"
    return None


def model_components(model: dict) -> list[str]:
    """Every graph an export of the manifest's model has: the text encoder(s), unet, vae_decoder, vae_encoder."""
    n_text = 2 if model.get("family") == "sdxl" else 1
    return ["text_encoder", "text_encoder_2"][:n_text] + ["unet", "vae_decoder", "vae_encoder"]


def load_manifest(out_dir, require=None, verify_hashes: bool = True) -> dict:
    """Read and validate DIR/manifest.json. `require`: component names that must be present (default: all of the
    model's, i.e. the text encoder(s), unet, vae_decoder and vae_encoder). `verify_hashes=False` checks file sizes
    only (hashing SD1.5's 3.4 GB UNet takes a few seconds)."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not out_dir.is_dir():
        raise SdrtError(f"{out_dir}: no such directory (run `sdrt export MODEL -o {out_dir}`)")
    if not path.is_file():
        raise SdrtError(f"{out_dir}: no {MANIFEST} (not an sdrt export, or one that did not finish; "
                        f"run `sdrt export MODEL -o {out_dir}`)")
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise SdrtError(f"{path}: invalid JSON ({e})") from None
    if not well_formed(m):
        raise SdrtError(f"{path}: not a format-{FORMAT} sdrt manifest (re-run `sdrt export`)")
    if require is None:
        require = model_components(m.get("model", {}))
    missing = [c for c in require if c not in m["components"]]
    if missing:
        raise SdrtError(f"{path}: partial export, missing {', '.join(missing)} (run `sdrt export` with those "
                        f"components)")
    for name, entry in m["components"].items():
        problem = entry_problem(out_dir, entry, verify_hashes)
        if problem:
            raise SdrtError(f"{path}: stale export, {name}: {problem} (re-run `sdrt export`)")
    return m
