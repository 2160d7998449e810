"""Incremental and atomic exports, external data, and load_manifest's refusals. Uses tiny's text encoder and VAE
decoder only (the quickest two graphs)."""

import os
import shutil

import pytest
import torch
from sdrt.export import onnx_check
from sdrt.export.dir_lock import DirLock
from sdrt.export.onnx_check import compare, run_onnx, session
from sdrt.export.onnx_export import LOCK_FILE, export_model
from sdrt.export.onnx_graph import EXTERNAL_DATA_THRESHOLD
from sdrt.export.onnx_manifest import load_manifest
from sdrt.export.onnx_specs import graph_specs

from sdrt.errors import SdrtError

TWO = ["text_encoder", "vae_decoder"]


def export(c, out, **kw):
    return export_model(c, out, components=TWO, **kw)


def leftovers(out):  # hidden files other than the lock file, which stays (an flock on it is the lock)
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE)


def test_rerun_is_a_noop(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    m = export(tiny, out)
    def stamps():  # the lock file records who holds it: the one file a no-op run writes
        return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_FILE}

    before = stamps()
    capsys.readouterr()
    assert export(tiny, out) == m
    assert "up to date" in capsys.readouterr().err
    assert stamps() == before  # nothing rewritten
    # --force and another precision are not no-ops
    assert "exporting" in (export(tiny, out, force=True, progress=True), capsys.readouterr().err)[1]
    assert export(tiny, out, precision="fp16")["precision"] == "fp16"


def _dies_on_second(check_graph, calls: list):
    """check_graph, except that the 2nd component dies after its graph was written to its temp folder (and the
    1st one's files have replaced any old ones)."""
    def check(*a, **kw):
        calls.append(a[0].name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return check_graph(*a, **kw)
    return check


def test_interrupted_export_is_not_trusted(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    real, calls = onnx_check.check_graph, []
    dies_on_second = _dies_on_second(real, calls)
    monkeypatch.setattr(onnx_check, "check_graph", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        export(tiny, out)
    # the 1st graph is in place, but no manifest vouches for it and no temp file is left behind
    assert (out / "text_encoder.onnx").is_file() and not (out / "vae_decoder.onnx").exists()
    assert leftovers(out) == []
    with pytest.raises(SdrtError, match="no manifest.json"):
        load_manifest(out, require=TWO)
    # a run killed harder (no `finally`) leaves a temp folder: the next run deletes it and exports everything
    dead = f".sdrt-tmp-{2**22 + 7}-unet"  # above Linux's largest pid_max: no such process
    (out / dead).mkdir()
    (out / dead / "unet.onnx").write_bytes(b"half a graph")
    live = out / f".sdrt-tmp-{os.getppid()}-unet"  # a running export's folder is not touched
    live.mkdir()
    monkeypatch.setattr(onnx_check, "check_graph", real)
    capsys.readouterr()
    m = export(tiny, out, progress=True)
    assert "text_encoder, vae_decoder" in capsys.readouterr().err.splitlines()[0]  # both exported, none kept
    assert leftovers(out) == [live.name] and load_manifest(out, require=TWO) == m
    live.rmdir()

    # now interrupt a re-export at another precision: the old manifest no longer lists the replaced 1st file
    monkeypatch.setattr(onnx_check, "check_graph", dies_on_second)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        export(tiny, out, precision="fp16")
    with pytest.raises(SdrtError, match="partial export, missing text_encoder"):
        load_manifest(out, require=TWO, verify_hashes=False)
    assert load_manifest(out, require=["vae_decoder"])["precision"] == "fp32"  # untouched: still vouched for
    # the next fp32 run re-exports only the replaced file and keeps the untouched one
    monkeypatch.setattr(onnx_check, "check_graph", real)
    capsys.readouterr()
    m2 = export(tiny, out, progress=True)
    err = capsys.readouterr().err.splitlines()[0]
    assert err.endswith("text_encoder (kept: vae_decoder)"), err
    assert m2["components"]["vae_decoder"] == m["components"]["vae_decoder"]
    assert load_manifest(out, require=TWO) == m2


def test_an_interrupted_reexport_of_other_weights_leaves_no_same_size_file_vouched_for(tiny, tmp_path, monkeypatch):
    # Other weights of the same architecture (a fine-tune; here the preset's seed 1) give graphs of the same size
    # as the old ones, and the runtime checks sizes only (hashing SD1.5's UNet takes seconds). Die after the 1st
    # new graph has replaced the old one: the old manifest must not list it any more.
    from sdrt.models import load_model

    out = tmp_path / "o"
    old = export(tiny, out, progress=False)
    monkeypatch.setattr(onnx_check, "check_graph", _dies_on_second(onnx_check.check_graph, []))
    with pytest.raises(KeyboardInterrupt):
        export(load_model("tiny", seed=1), out, progress=False)
    assert (out / "text_encoder.onnx").stat().st_size == old["components"]["text_encoder"]["graph_bytes"]
    with pytest.raises(SdrtError, match="partial export, missing text_encoder"):
        load_manifest(out, require=TWO, verify_hashes=False)


def test_load_manifest_refusals(tiny, tmp_path):
    with pytest.raises(SdrtError, match="no such directory"):
        load_manifest(tmp_path / "nope")
    out = tmp_path / "o"
    export(tiny, out)
    with pytest.raises(SdrtError, match="partial export, missing unet, vae_encoder"):
        load_manifest(out)  # default: every component of the model
    graph = out / "vae_decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1  # same size, other bytes: only the hash notices
    graph.write_bytes(bytes(data))
    assert load_manifest(out, require=TWO, verify_hashes=False)
    with pytest.raises(SdrtError, match="vae_decoder.onnx does not match its sha256"):
        load_manifest(out, require=TWO)
    graph.write_bytes(b"truncated")
    with pytest.raises(SdrtError, match="vae_decoder.onnx has 9 bytes"):
        load_manifest(out, require=TWO, verify_hashes=False)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(SdrtError, match="invalid JSON"):
        load_manifest(out)


def test_external_data(tiny, tmp_path):
    """Graphs over 2 GB keep their weights in <file>.data; forced here with a threshold of 0 bytes."""
    assert EXTERNAL_DATA_THRESHOLD < 2**31  # protobuf's limit
    out = tmp_path / "o"
    m = export_model(tiny, out, components=["vae_decoder"], external_data_threshold=0, progress=False)
    e = m["components"]["vae_decoder"]
    assert e["external_data"] == "vae_decoder.onnx.data"
    assert e["graph_bytes"] < 200_000 < e["weights_bytes"]  # weights (~1 MB) moved out of the graph
    assert e["bytes"] == e["graph_bytes"] + e["weights_bytes"]
    assert e["validation"]["max_rel"] < 2e-5
    # the data file is referenced relative to the graph: the folder can move
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    assert load_manifest(moved, require=["vae_decoder"])
    spec = graph_specs(tiny)["vae_decoder"]
    args = spec.sample_inputs(1, 88, 40, seed=2)
    with torch.no_grad():
        ref = spec.module(*args)
    _, max_rel, finite = compare(run_onnx(session(moved / "vae_decoder.onnx"), args), [ref])
    assert finite and max_rel < 2e-5
    # a later export under the threshold drops the stale data file
    export_model(tiny, moved, components=["vae_decoder"], force=True, progress=False)
    assert not os.path.exists(moved / "vae_decoder.onnx.data")


def test_a_second_export_into_the_same_directory_waits_then_reuses(tiny, tmp_path, capsys):
    # Two services starting together on one cache: the second waits for the first's lock, then finds its graphs
    # up to date instead of exporting them again (minutes and gigabytes on a real model).
    import threading

    done = export(tiny, tmp_path / "first")
    capsys.readouterr()
    out, result = tmp_path / "shared", {}
    with DirLock(out, LOCK_FILE, "test"):  # the first exporter, mid-write
        second = threading.Thread(target=lambda: result.update(m=export(tiny, out, progress=True)))
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive()  # waiting on the lock, not exporting beside the holder
        shutil.copytree(tmp_path / "first", out, dirs_exist_ok=True)  # what the first exporter leaves behind
    second.join(timeout=60)
    err = capsys.readouterr().err
    assert "another export (pid" in err and "up to date" in err and "exporting" not in err
    assert result["m"] == done


def test_an_unwritable_directory_is_a_one_line_error(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    (out / LOCK_FILE).mkdir()  # where the lock file must go: unopenable as a file, for root too
    with pytest.raises(SdrtError, match="cannot write .*export.lock"):
        with DirLock(out, LOCK_FILE, "test"):
            pass


def test_a_full_rerun_after_a_partial_export_is_not_up_to_date(tmp_path):
    # `sdrt export tiny -o D --components ...` then `sdrt export tiny -o D`: the second once said "up to date"
    # and left D partial (no --components means all the model has, not all the last run wrote)
    from sdrt.export.onnx_export import _up_to_date

    out = tmp_path / "o"
    m = export_model("tiny", out, components=TWO, progress=False)
    assert _up_to_date("tiny", 0, out, "fp32", m["opset"], TWO, False) == m
    assert _up_to_date("tiny", 0, out, "fp32", m["opset"], None, False) is None


def test_a_manifest_entry_outside_the_directory_is_not_trusted(tiny, tmp_path):
    out = tmp_path / "o"
    export(tiny, out)
    shutil.copy(out / "vae_decoder.onnx", tmp_path / "elsewhere.onnx")
    text = (out / "manifest.json").read_text().replace('"vae_decoder.onnx"', '"../elsewhere.onnx"')
    (out / "manifest.json").write_text(text)
    with pytest.raises(SdrtError, match="'../elsewhere.onnx' is not a file name in the export directory"):
        load_manifest(out, require=TWO, verify_hashes=False)
