"""`sdrt bench` and the GPU suite's dry run on the tiny preset: the report's schema, skipped rows, the outputs.

Timings on a shared CI machine mean nothing, so only their shape is checked (present, positive, ordered
percentiles); drift is checked for real (fp32 graphs must match eager to float rounding).
"""

import argparse
import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from sdrt import bench
from sdrt.errors import SdrtError

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"backend", "kind", "precision", "device", "text_encoder_ms", "unet_step_ms", "vae_decode_ms", "e2e_ms",
            "steps_per_s", "images_per_s", "speedup_unet_vs_eager", "speedup_e2e_vs_eager", "cold_start_s",
            "peak_mem_mb", "psnr_vs_eager", "latent_max_abs_vs_eager", "samples", "skipped"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The session's private ONNX export cache ($SDRT_CACHE), shared with test_openvino: tiny is exported once."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.getbasetemp() / "sdrt-cache"
        path.mkdir(exist_ok=True)
        mp.setenv("SDRT_CACHE", str(path))
        yield path


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def check_row(row: dict, runs: int) -> None:
    assert ROW_KEYS <= row.keys(), ROW_KEYS - row.keys()
    assert row["skipped"] is None and not row.get("nonfinite_output")  # a NaN image has no PSNR either
    for k in ("text_encoder_ms", "unet_step_ms", "vae_decode_ms"):
        assert row[k] > 0 and len(row["samples"][k]) == runs
    e2e = row["e2e_ms"]
    assert 0 < e2e["p50"] <= e2e["p90"] <= e2e["p99"]
    assert row["peak_mem_mb"] is not None and row["cold_start_s"]["warmup"] > 0


def test_bench_tiny(tmp_path, cache, monkeypatch):
    # A known row that cannot run: TensorRT absent (as it is everywhere here; also where it is installed).
    why = "TensorRT is not installed (as this test pretends)"
    monkeypatch.setattr("sdrt.backends.tensorrt.tensorrt_available", lambda: (False, why))
    out = {k: tmp_path / f"report.{k}" for k in ("json", "md", "png")}
    args = parse(["tiny", "--backends", "eager,onnxruntime,tensorrt:fp16", "--runs", "2", "--steps", "2",
                  "--json", str(out["json"]), "--markdown", str(out["md"]), "--plot", str(out["png"])])
    assert bench.run(args) == 0
    report = json.loads(out["json"].read_text())
    rows = {r["backend"]: r for r in report["results"]}
    assert list(rows) == ["eager", "onnxruntime", "tensorrt:fp16"]
    assert rows["tensorrt:fp16"]["skipped"] == why  # a known row that cannot run here: its reason
    for name in ("eager", "onnxruntime"):
        check_row(rows[name], runs=2)
    # The reference row has no drift to report (null, not inf: JSON has no infinity); its speedups are 1 by
    # definition. The fp32 ONNX graph differs from eager only by float reassociation (~130 dB, latents ~1e-5).
    eager, ort = rows["eager"], rows["onnxruntime"]
    assert eager["psnr_vs_eager"] is None and eager["latent_max_abs_vs_eager"] is None
    assert eager["speedup_unet_vs_eager"] == eager["speedup_e2e_vs_eager"] == 1.0
    assert ort["psnr_vs_eager"] is None or ort["psnr_vs_eager"] > 100  # None: bit-identical
    assert ort["latent_max_abs_vs_eager"] < 1e-4
    assert ort["cold_start_s"]["export"] > 0 and ort["cold_start_s"]["load"] is None
    assert report["request"]["steps"] == 2 and report["request"]["batch"] == 1
    assert {"torch", "onnxruntime", "diffusers"} <= report["env"]["versions"].keys()
    assert report["env"]["cpu"] and "git" in report["env"]
    assert report["command"].startswith("sdrt bench tiny --backends eager,onnxruntime,tensorrt:fp16")
    md = out["md"].read_text()
    assert "| eager | fp32 |" in md and "| tensorrt:fp16 | skipped: TensorRT is not" in md
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_adds_the_reference_and_runs_a_peer_sequentially(tmp_path):
    # diffusers' own pipeline on the same weights and seed: the eager row's twin, so drift is float noise only.
    report = bench.run_bench(bench.BenchConfig("tiny", ("diffusers",), steps=2, runs=1, sequential=True),
                             log=lambda m: None)
    rows = report["results"]
    assert [r["backend"] for r in rows] == ["eager", "diffusers"]
    check_row(rows[1], runs=1)
    assert rows[1]["psnr_vs_eager"] is None or rows[1]["psnr_vs_eager"] > 100
    assert rows[1]["latent_max_abs_vs_eager"] < 1e-4


def test_diffusers_peer_in_fp16_starts_from_the_same_noise():
    # diffusers draws its initial latents in the pipeline's dtype, and CPU randn in fp16 is another sequence than in
    # fp32: left to itself the fp16 peer paints another image (12 dB on sd15). Drift must be fp16 rounding only.
    report = bench.run_bench(bench.BenchConfig("tiny", ("diffusers:fp16",), steps=2, runs=1, sequential=True),
                             log=lambda m: None)
    assert report["results"][1]["psnr_vs_eager"] > 35


def test_bench_profile_splits_each_stage_by_kind_of_kernel():
    # eager on a CPU: aten ops' self times by kind add up to the call; the ONNX Runtime row's work is invisible to
    # torch.profiler on a CPU, so it gets no profile rather than a misleading near-zero one.
    report = bench.run_bench(bench.BenchConfig("tiny", ("eager", "onnxruntime"), steps=2, runs=1, profile=True),
                             log=lambda m: None)
    eager, ort = report["results"]
    assert "profile" not in ort
    for stage in ("UNet step", "VAE decode"):
        p = eager["profile"][stage]
        assert p["kinds"]["conv"] > 0 and p["total_ms"] > 0
        assert sum(p["kinds"].values()) == pytest.approx(p["total_ms"])
        assert [ms for _, ms in p["top"]] == sorted((ms for _, ms in p["top"]), reverse=True)
    assert eager["profile"]["UNet step"]["kinds"]["attention"] > 0  # the tiny UNet has cross-attention
    from sdrt import bench_report

    assert "| eager | UNet step |" in bench_report.markdown(report)
    assert report["command"].endswith("--profile")


def test_bench_profile_comes_after_the_timed_rounds():
    # Sequential rows on a CPU: each is profiled after its own rounds (on CUDA only the last rows are, since Kineto
    # leaves CUPTI attached), and profiling changes none of the timed samples' count.
    report = bench.run_bench(bench.BenchConfig("tiny", ("diffusers",), steps=2, runs=1, sequential=True,
                                               profile=True), log=lambda m: None)
    for row in report["results"]:
        assert row["profile"]["UNet step"]["total_ms"] > 0 and row["rounds"] == 1


def test_on_cuda_only_the_rows_measured_last_are_profiled():
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert bench.profiles_now(True, cpu, last=False) and bench.profiles_now(True, cuda, last=True)
    assert not bench.profiles_now(True, cuda, last=False)  # it would slow every row after it
    assert not bench.profiles_now(False, cpu, last=True) and not bench.profiles_now(False, cuda, last=True)


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "conv"),  # cuDNN
    ("cutlass__5x_cudnn::Kernel<cutlass_tensorop_f16_s16816fprop_optimized_f16_128x128_32x4_nhwc>", "conv"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNN", "gemm"),  # cuBLASLt on Hopper
    ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_nn", "gemm"),
    ("_attention_kernel", "attention"), ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
    ("_group_norm_apply_kernel", "group_norm"), ("triton_red_fused_native_group_norm_1", "group_norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>", "other"),
    ("aten::mkldnn_convolution", "conv"), ("aten::addmm", "gemm"), ("aten::mm", "gemm"),
    ("aten::native_group_norm", "group_norm"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("_add_layer_norm_kernel", "layer_norm"), ("_geglu_kernel", "geglu"), ("aten::native_layer_norm", "layer_norm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>", "layer_norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl<c10::Half>>", "geglu"),
])
def test_profile_kinds_of_real_kernel_names(name, kind):
    from sdrt.bench_profile import kind_of

    assert kind_of(name) == kind


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(SdrtError, match="--runs"):
        bench.config_from_args(parse(["tiny", "--runs", "0"]))
    with pytest.raises(SdrtError, match="empty"):
        bench.config_from_args(parse(["tiny", "--backends", ","]))


@pytest.mark.parametrize("rows, message", [
    ("eager,foo", "unknown backend 'foo' in --backends \\(choose from eager, .*, diffusers, torch.compile\\)"),
    ("eager:fp8", "unknown precision 'fp8' in --backends 'eager:fp8' \\(choose from fp32, "),
    ("diffusers:int4", "unknown precision 'int4'"),
    ("diffusers:int8", "the diffusers peer runs fp32, fp16 or bf16"),  # it would run fp16 under an int8 label
    ("onnxruntime --height 63", "height must be a multiple of 8"),  # not after minutes of exports
    ("onnxruntime --steps 0", "steps must be an integer >= 1"),
    ("onnxruntime --batch 65", "batch must be an integer in \\[1, 64\\]"),
])
def test_a_typo_in_backends_fails_before_anything_runs(monkeypatch, rows, message):
    # A typo is an error, not a skipped row in a report that exits 0; run_bench checks the names before its
    # first step (the exports), so nothing runs. A known row that cannot run here is still skipped (test_bench_tiny).
    from sdrt import bench_rows

    monkeypatch.setattr(bench_rows, "prepare_exports", lambda *a: pytest.fail("the benchmark started"))
    with pytest.raises(SdrtError, match=message):
        bench.run(parse(["tiny", "--backends", *rows.split()]))


@pytest.mark.parametrize("flag, path, message", [
    ("--json", ".", "--json .*: is a directory"),
    ("--json", "/proc/x.json", "--json /proc/x.json: cannot write there"),  # mkdir passes, the file cannot be made
    ("--markdown", "a_file/r.md", "--markdown .*a_file/r.md: cannot make its folder"),
    ("--plot", "r.txt", "--plot .*r.txt: not an image format matplotlib writes \\(choose from .*png"),
])
def test_bad_output_paths_fail_before_anything_runs(tmp_path, monkeypatch, flag, path, message):
    # Found at the end they cost the whole benchmark (minutes on a GPU) and came out as internal errors.
    pytest.importorskip("matplotlib")
    (tmp_path / "a_file").write_text("")
    path = path if path.startswith("/") else str(tmp_path / path)
    monkeypatch.setattr(bench, "run_bench", lambda *a, **kw: pytest.fail("the benchmark started"))
    with pytest.raises(SdrtError, match=message):
        bench.run(parse(["tiny", flag, path]))


def test_output_folders_are_made_up_front(tmp_path):
    pytest.importorskip("matplotlib")
    bench.check_outputs(parse(["tiny", "--json", str(tmp_path / "new" / "r.json"), "--plot",
                               str(tmp_path / "new" / "r.SVG")]))
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "r.json").exists()
    bench.check_outputs(parse(["tiny", "--plot", str(tmp_path / "r")]))  # no suffix: matplotlib writes r.png
    with pytest.raises(SdrtError, match="not an image format"):  # refused before any folder is made
        bench.check_outputs(parse(["tiny", "--json", str(tmp_path / "other" / "r.json"), "--plot", "r.txt"]))
    assert not (tmp_path / "other").exists()


def test_a_failed_report_write_keeps_the_old_file(tmp_path, monkeypatch):
    import os

    from sdrt import bench_report

    path = tmp_path / "r.json"
    bench_report.write({"config": {"runs": 1}}, json_path=path)
    before = path.read_text()
    assert json.loads(before) == {"config": {"runs": 1}}

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SdrtError, match=f"^cannot write {path}: No space left on device$"):
        bench_report.write({"config": {"runs": 2}}, json_path=path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_command_line_reproduces_the_config():
    cfg = bench.BenchConfig("sd15", ("eager", "openvino:fp32"), height=256, width=256, steps=4, runs=3)
    argv = bench.command_line(cfg).split()[2:]
    assert argv[:3] == ["sd15", "--backends", "eager,openvino:fp32"]
    assert bench.config_from_args(parse(argv)) == cfg
    cfg = bench.BenchConfig("base.safetensors", ("eager",), arch="sd21-base", profile=True)  # a file and its preset
    assert bench.config_from_args(parse(bench.command_line(cfg).split()[2:])) == cfg
    # what a shell makes of it: quotes, $ and spaces in the prompt or the model's path survive
    cfg = bench.BenchConfig("my models/base.safetensors", ("eager",), prompt='it\'s a "cat" $HOME')
    assert bench.config_from_args(parse(shlex.split(bench.command_line(cfg))[2:])) == cfg


def test_peak_memory_sees_an_allocation():
    import torch

    from sdrt.bench_rows import PeakMemory

    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert 60 <= mem.rss_mb <= 200, mem.rss_mb


def test_gpu_peak_memory_is_the_rows_own_and_the_references_with_it(monkeypatch):
    # Interleaved rows keep the earlier rows' weights on the GPU: the absolute peak counted them all (2.5-3.5x
    # the row's own in the H100 run's fp16 rows).
    import torch

    from sdrt.bench_rows import PeakMemory

    mib = 2**20
    cuda = {"now": 3000 * mib, "peak": 0, "device": 3500 * mib}  # the earlier rows' 3000 MiB (3500 held)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: cuda.update(peak=cuda["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: cuda["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: cuda["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (80_000 * mib - cuda["device"], 80_000 * mib))
    with PeakMemory(torch.device("cuda")) as reference:
        cuda["now"] += 100 * mib  # the reference's weights, loaded before its row
        cuda["peak"] = cuda["now"]
        cuda["device"] += 100 * mib
    with PeakMemory(torch.device("cuda")) as row:
        cuda["peak"] = cuda["now"] + 512 * mib  # the row's activations, freed at its end
        cuda["device"] += 64 * mib  # kept in torch's cache
    assert (reference.cuda_mb, row.cuda_mb, row.device_mb, row.gpu_mb) == (100.0, 512.0, 64.0, 512.0)
    row.include(reference)
    assert (row.cuda_mb, row.device_mb, row.gpu_mb) == (612.0, 164.0, 612.0)


def test_gpu_memory_of_a_runtime_with_its_own_allocator(monkeypatch):
    # ONNX Runtime's CUDA arena and TensorRT's engine weights are invisible to torch's allocator: torch saw only
    # the I/O tensors (8 MiB), so such a row looked 100x cheaper than a PyTorch row of the same model.
    import torch

    from sdrt.bench_rows import PeakMemory

    mib = 2**20
    cuda = {"now": 0, "device": 500 * mib}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: cuda["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: cuda["now"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (80_000 * mib - cuda["device"], 80_000 * mib))
    with PeakMemory(torch.device("cuda")) as row:
        cuda["now"] += 8 * mib
        cuda["device"] += 8 * mib + 2100 * mib  # the arena: weights and activations
    assert (row.cuda_mb, row.device_mb, row.gpu_mb) == (8.0, 2108.0, 2108.0)


def test_an_exports_time_is_the_manifests_fresh_or_cached(monkeypatch, tmp_path):
    # A fresh export reported the child process's wall time (start-up, model build, a VAE encoder the bench never
    # runs): 19.5 s, where the cached re-run reported the manifest's 10.4 s for the same export.
    import time

    import torch
    from sdrt.export.onnx_manifest import FORMAT

    from sdrt import bench_rows

    monkeypatch.setenv("SDRT_CACHE", str(tmp_path))
    ctx = bench_rows.Context("tiny", torch.device("cpu"), source_hash="ab" * 32)

    def fake_export(argv, timeout):
        out = Path(argv[argv.index("-o") + 1])
        out.mkdir(parents=True)
        time.sleep(0.3)  # the child's start-up, which the manifest's times leave out
        manifest = {"format": FORMAT, "precision": "fp32", "model": {"source_hash": ctx.source_hash},
                    "components": {"unet": {"export_s": 0.05}, "text_encoder": {"export_s": 0.02}}}
        (out / "manifest.json").write_text(json.dumps(manifest))

    monkeypatch.setattr(bench_rows, "sdrt_cli", fake_export)
    _, fresh, cached = bench_rows.export_onnx(ctx, "fp32")
    assert not cached and fresh == pytest.approx(0.07)
    ctx.exports = {}
    assert bench_rows.export_onnx(ctx, "fp32")[1:] == (pytest.approx(0.07), True)


def test_gpu_suite_dry_run(tmp_path, cache):
    path = ROOT / "benchmarks" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", path)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    assert suite.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["suite"]["dry_run"] and report["config"]["model"] == "tiny"
    rows = {r["backend"]: r for r in report["results"]}
    assert list(rows) == [r for r in suite.ROWS if not r.startswith("torch.compile")]  # no CPU compile in CI
    check_row(rows["eager"], runs=1)
    assert rows["tensorrt:fp16"]["skipped"]  # no TensorRT on a CPU machine: a reason, not a crash
    assert isinstance(report["kernels"], list) and report["kernels"]
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "## sdrt GPU suite (dry run" in md and "### Kernels" in md
    targets = md.split("### Issue 6's targets")[1].split("###")[0]  # every target with a figure from this run
    assert "GroupNorm+SiLU >= 1.5x" in targets and "head size 40" in targets and ">= 2x eager diffusers" in targets
    assert "| torch:fp16 | UNet step |" in md  # every torch-run row is profiled
    torch_row = next(r for r in report["results"] if r["backend"] == "torch:fp16")
    assert 0 < torch_row["outside_loop_ms"] < torch_row["e2e_ms"]["p50"] and "outside the loop, ms" in md
    versus = md.split("| step in the loop, ms |")[1].split("\n\n")[0]  # the table against diffusers
    peer = next(line for line in versus.splitlines() if line.startswith("| diffusers:fp16 | "))
    assert peer.split(" | ")[2] == "-"  # no loop of ours to time: not its standalone UNet call under that name
    gn = [r for r in report["kernels"] if r["benchmark"] == "bench_group_norm"]
    assert gn and all(r["ms"] > 0 and r["gpp"] >= 1 for r in gn)
    assert (tmp_path / "gpu_suite.png").is_file()
    assert "**bench_group_norm**" in (tmp_path / "gpu_suite_kernels.md").read_text()  # written before the rows ran
    # past the kernels' share of the budget, no kernel benchmark starts: each says so
    late = suite.run_kernel_benchmarks(True, deadline=0.0)
    assert [r["benchmark"] for r in late] == [n.removesuffix(".py") for n in suite.KERNEL_BENCHMARKS]
    assert all(r["skipped"].startswith("not started") for r in late)


def test_rounds_stop_at_the_time_budget(monkeypatch):
    # A suite killed by its slot's timeout writes nothing; past the deadline it reports the rounds it has instead.
    from types import SimpleNamespace

    from sdrt import bench_rows
    from sdrt.bench_report import _runs

    stages = {"text_encoder_ms": 1.0, "unet_step_ms": 2.0, "vae_decode_ms": 3.0}
    monkeypatch.setattr(bench_rows, "time_stages", lambda *a: stages)
    calls = []

    def generate(request):
        calls.append(request)
        return SimpleNamespace(timings={"total_ms": 10.0, "unet_ms": [2.0], "denoise_ms": 7.5})

    samples = {k: [] for k in (*stages, "e2e_ms", "pipeline_unet_step_ms", "outside_loop_ms")}
    row = SimpleNamespace(backend=None, inputs=None, device=None, generate=generate, spec=SimpleNamespace(name="x"),
                          result={"backend": "x"}, samples=samples)
    request = SimpleNamespace(prompts=["a"], batch=1)
    bench.measure([row], request, runs=3, log=lambda m: None, deadline=0.0)  # already past: one round only
    assert len(calls) == 1 and row.result["rounds"] == 1 and row.result["e2e_ms"]["p50"] == 10.0
    assert row.result["outside_loop_ms"] == 2.5  # generate()'s time besides its loop
    assert _runs({"config": {"runs": 3}, "results": [row.result]}) == "1 of 3 (time budget)"  # the table's header


def test_exports_come_before_any_model_is_loaded(tmp_path, monkeypatch):
    # An sd15 int8 calibration next to live rows does not fit in 24 GB: every export runs (in a child process)
    # before the reference loads. A failed export is that row's reason, and the others still run.
    import sdrt.models
    from sdrt import bench_rows

    monkeypatch.setenv("SDRT_CACHE", str(tmp_path))  # nothing cached
    events, real_load = [], sdrt.models.load_model

    def fake_cli(argv, timeout):
        events.append(("export", argv[argv.index("--precision") + 1]))
        raise SdrtError("`sdrt export` failed: out of memory")

    monkeypatch.setattr(bench_rows, "sdrt_cli", fake_cli)
    monkeypatch.setattr(sdrt.models, "load_model", lambda *a, **kw: events.append(("load",)) or real_load(*a, **kw))
    report = bench.run_bench(bench.BenchConfig("tiny", ("onnxruntime", "onnxruntime:fp16"), steps=1, runs=1),
                             log=lambda m: None)
    assert events[:3] == [("export", "fp32"), ("export", "fp16"), ("load",)]
    rows = {r["backend"]: r for r in report["results"]}
    assert "out of memory" in rows["onnxruntime"]["skipped"] and "out of memory" in rows["onnxruntime:fp16"]["skipped"]
    check_row(rows["eager"], runs=1)


def test_tensorrt_int8_reads_an_export_of_its_own_recipe(tmp_path, monkeypatch):
    # TensorRT refuses the default int8 recipe's u8 activations (ONNX Runtime's): its rows export with
    # `--int8-recipe tensorrt` into a cache directory of their own, and reuse only an export of that recipe.
    from types import SimpleNamespace

    from sdrt.export.onnx_manifest import FORMAT, write_manifest

    from sdrt import bench_rows

    assert [bench_rows.onnx_precision(bench_rows.parse_row(n)) for n in
            ("tensorrt", "tensorrt:int8", "onnxruntime:int8", "openvino:int8")] == ["fp16", "int8-tensorrt", "int8",
                                                                                    "int8"]
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(bench_rows, "sdrt_cli", lambda argv, timeout: calls.append(argv))
    ctx = SimpleNamespace(exports={}, source_hash="ab" * 32, info=None, arch=None, model="tiny", seed=0,
                          time_left=lambda: None)
    out, _, cached = bench_rows.export_onnx(ctx, "int8-tensorrt")
    assert not cached and out.name.endswith("-int8-tensorrt")
    argv = calls[-1]
    assert argv[argv.index("--precision") + 1] == "int8" and argv[argv.index("--int8-recipe") + 1] == "tensorrt"
    out.mkdir(parents=True)
    for recipe, reused in (("ort-cpu", False), ("tensorrt", True)):
        write_manifest(out, {"format": FORMAT, "precision": "int8", "components": {},
                             "model": {"source_hash": ctx.source_hash},
                             "int8": {"settings": {"recipe": {"name": recipe}}}})
        assert bench_rows.export_onnx(ctx, "int8-tensorrt")[2] is reused
    ort_out, _, _ = bench_rows.export_onnx(ctx, "int8")  # onnxruntime's: the default recipe, its own directory
    assert "--int8-recipe" not in calls[-1] and ort_out.name.endswith("-int8") and ort_out != out
