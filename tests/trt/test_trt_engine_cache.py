"""Engine cache: keys and every invalidation reason, refusal of foreign engines, atomic writes, the lock, and the
structural/weights hashes of ONNX graphs (no TensorRT)."""

import dataclasses
import hashlib
import json
import subprocess
import sys
import threading
import time

import pytest
from sdrt.export.engine_cache import (
    Action,
    BuildLock,
    EngineKey,
    atomic_write,
    check_compatible,
    decide,
    load_trusted,
    onnx_digest,
    read_manifest,
    write_manifest,
)

from sdrt.errors import SdrtError

KEY = EngineKey(component="unet", graph_sha256="g", weights_sha256="w", precision="fp16", quantization=None,
                profiles_sha256="p", build_options="opt_level=3 refit=0", trt_version="10.0.1",
                compute_capability="8.9", sdrt_version="0.1.0")


def entry(key=KEY, refittable=False):
    return {"file": "unet.plan", "key": key.to_json(), "refittable": refittable, "reason": "new"}


def test_key_round_trips_through_json():
    assert EngineKey.from_json(json.loads(json.dumps(KEY.to_json()))) == KEY


def test_new_missing_and_up_to_date():
    assert decide(None, KEY, file_ok=False).reasons == ("new",)
    assert decide(entry(), KEY, file_ok=False).reasons == ("engine file missing or changed on disk",)
    d = decide(entry(), KEY, file_ok=True)
    assert (d.action, d.reason) == (Action.SKIP, "up to date")
    assert decide(entry(), KEY, file_ok=True, force=True).reasons == ("forced (--force)",)


@pytest.mark.parametrize("field,value,reason", [
    ("trt_version", "10.3.0", "TensorRT version changed (10.0.1 -> 10.3.0)"),
    ("compute_capability", "9.0", "GPU changed (8.9 -> 9.0)"),
    ("graph_sha256", "g2", "graph changed"),
    ("precision", "int8", "precision changed (fp16 -> int8)"),
    ("quantization", "recipe", "quantization recipe changed"),
    ("profiles_sha256", "p2", "profiles changed"),
    ("build_options", "opt_level=5 refit=0", "build options changed (opt_level=3 refit=0 -> opt_level=5 refit=0)"),
    ("sdrt_version", "0.2.0", "sdrt version changed (0.1.0 -> 0.2.0)"),
])
def test_every_rebuild_reason(field, value, reason):
    d = decide(entry(refittable=True), dataclasses.replace(KEY, **{field: value}), file_ok=True)
    assert (d.action, d.reasons) == (Action.BUILD, (reason,))


def test_weights_only_refit_or_rebuild():
    new = dataclasses.replace(KEY, weights_sha256="w2")
    assert decide(entry(refittable=True), new, True) == decide(entry(refittable=True), new, True)
    d = decide(entry(refittable=True), new, True)
    assert (d.action, d.reason) == (Action.REFIT, "weights changed (refit)")
    d = decide(entry(refittable=False), new, True)
    assert (d.action, d.reason) == (Action.BUILD, "weights changed (rebuild: engine not built with --refittable)")
    int8 = dataclasses.replace(KEY, precision="int8")
    d = decide(entry(int8, refittable=True), dataclasses.replace(int8, weights_sha256="w2"), True)
    assert (d.action, d.reason) == (Action.BUILD, "weights changed (rebuild: int8 scales are baked into the engine)")


def test_all_reasons_are_listed_together():
    new = dataclasses.replace(KEY, trt_version="10.3.0", graph_sha256="g2", weights_sha256="w2")
    d = decide(entry(refittable=True), new, True)
    assert d.action is Action.BUILD  # a structural change wins over refit
    assert d.reason == "TensorRT version changed (10.0.1 -> 10.3.0); graph changed; weights changed"


def test_foreign_engines_are_refused():
    check_compatible(entry(), "10.0.1", "8.9", "e/unet.plan")
    with pytest.raises(SdrtError, match=r"e/unet.plan was built with TensorRT 10.0.1, this is TensorRT 10.3.0; "
                                        r"rebuild it with `sdrt build`"):
        check_compatible(entry(), "10.3.0", "8.9", "e/unet.plan")
    with pytest.raises(SdrtError, match=r"compute capability 8.9, this GPU is 9.0; rebuild it on this GPU"):
        check_compatible(entry(), "10.0.1", "9.0", "e/unet.plan")


def _engine_dir(tmp_path, data=b"ENGINE"):
    d = tmp_path / "engines"
    d.mkdir()
    (d / "unet.plan").write_bytes(data)
    e = dict(entry(), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    write_manifest(d, {"format": 1, "engines": {"unet": e}})
    return d


def test_load_trusted_checks_version_gpu_and_bytes(tmp_path):
    d = _engine_dir(tmp_path)
    assert load_trusted(d, "10.0.1", "8.9") == {"unet": b"ENGINE"}
    with pytest.raises(SdrtError, match="TensorRT 10.0.1, this is TensorRT 10.1.0"):
        load_trusted(d, "10.1.0", "8.9")
    with pytest.raises(SdrtError, match="this GPU is 8.6"):
        load_trusted(d, "10.0.1", "8.6")
    with pytest.raises(SdrtError, match="has no vae_decoder engine; has unet"):
        load_trusted(d, "10.0.1", "8.9", ["vae_decoder"])
    (d / "unet.plan").write_bytes(b"ENGINX")  # a half-finished or concurrent build: never handed to TensorRT
    with pytest.raises(SdrtError, match="is not the engine engines.json recorded"):
        load_trusted(d, "10.0.1", "8.9")
    (d / "unet.plan").unlink()
    with pytest.raises(SdrtError, match="rebuild with `sdrt build`"):
        load_trusted(d, "10.0.1", "8.9")
    with pytest.raises(SdrtError, match=r"no engines in .*build them with `sdrt build ONNX_DIR"):
        load_trusted(tmp_path / "nothing", "10.0.1", "8.9")


def test_manifest_errors(tmp_path):
    assert read_manifest(tmp_path) == {"format": 1, "engines": {}}
    (tmp_path / "engines.json").write_text("{not json")
    with pytest.raises(SdrtError, match="unreadable.*delete it to rebuild"):
        read_manifest(tmp_path)
    (tmp_path / "engines.json").write_text('{"format": 99, "engines": {}}')
    with pytest.raises(SdrtError, match="format 99"):
        read_manifest(tmp_path)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "unet.plan"
    atomic_write(path, b"old engine")
    with pytest.raises(TypeError):  # the write fails after the temp file exists (a full disk, a killed builder)
        atomic_write(path, object())
    assert path.read_bytes() == b"old engine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.plan"]  # no temp file left behind


def test_lock_excludes_a_second_open_and_is_released(tmp_path):
    with BuildLock(tmp_path), pytest.raises(SdrtError, match=r"another `sdrt build` \(pid \d+\) is writing "
                                                               r".*--lock-timeout"), BuildLock(tmp_path, timeout_s=0.2):
        pass
    with BuildLock(tmp_path):  # released on exit
        pass


def test_lock_waits_for_the_holder(tmp_path):
    holder = BuildLock(tmp_path).__enter__()
    threading.Timer(0.3, holder.__exit__, (None, None, None)).start()
    t0 = time.monotonic()
    with BuildLock(tmp_path, timeout_s=10):
        assert time.monotonic() - t0 >= 0.25


def test_lock_excludes_another_process(tmp_path):
    code = ("import sys, time; from sdrt.export.engine_cache import BuildLock\n"
            "with BuildLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(SdrtError, match=f"pid {proc.pid}"), BuildLock(tmp_path, timeout_s=0.3):
            pass
    finally:
        proc.kill()
        proc.wait()
    with BuildLock(tmp_path, timeout_s=5):  # the kernel released a dead holder's lock
        pass


def test_onnx_structure_and_weights_hashes(tmp_path, make_onnx_dir):
    a = make_onnx_dir(tmp_path / "a", seed=0)
    b = make_onnx_dir(tmp_path / "b", seed=1)                          # same graphs, other weights
    c = make_onnx_dir(tmp_path / "c", seed=0, external=("unet",))      # same weights, in a side file
    d = make_onnx_dir(tmp_path / "d", seed=0, extra_node=("unet",))    # one more node
    q = make_onnx_dir(tmp_path / "q", seed=0, qdq=True)
    da, db, dc, dd, dq = (onnx_digest(x / "unet.onnx") for x in (a, b, c, d, q))
    assert da.graph_sha256 == db.graph_sha256 and da.weights_sha256 != db.weights_sha256
    assert (dc.graph_sha256, dc.weights_sha256) == (da.graph_sha256, da.weights_sha256)
    assert dd.graph_sha256 != da.graph_sha256 and dd.weights_sha256 == da.weights_sha256
    assert dq.has_qdq and not da.has_qdq


def test_metadata_does_not_change_the_graph_hash(tmp_path, make_onnx_dir):
    import onnx

    a = make_onnx_dir(tmp_path / "a")
    model = onnx.load(str(a / "vae_encoder.onnx"))
    before = onnx_digest(a / "vae_encoder.onnx")
    model.producer_version = "9.9"
    model.doc_string = "exported at noon"
    onnx.helper.set_model_props(model, {"exported_at": "noon"})
    onnx.save(model, str(a / "vae_encoder.onnx"))
    assert onnx_digest(a / "vae_encoder.onnx") == before
