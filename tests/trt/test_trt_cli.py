"""`sdrt build`: its errors are one line and exit != 0; with a fake builder it runs end to end."""

import argparse
import json
import subprocess
import sys

import pytest
from sdrt.export import build_cli

from sdrt.backends.tensorrt import tensorrt_available
from sdrt.errors import SdrtError

HAVE_TRT = tensorrt_available()[0]


def parse(argv):
    p = argparse.ArgumentParser(prog="sdrt build")
    build_cli.add_arguments(p)
    return p.parse_args(argv)


def sdrt(capsys, *argv):
    """`sdrt build ...` through the real entry point: exit code, stdout and stderr as a user sees them."""
    from sdrt.cli import main

    code = main(["build", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_the_profile_syntax(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "HxW[@B]" in out and "768x1024@1-4" in out and "--opt-level" in out and "engines.json" in out


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/missing"], "is not a directory: pass the output of `sdrt export MODEL -o DIR`"),
    (["{tmp}"], "has no manifest.json: not an `sdrt export` directory"),
    (["{tmp}", "--profile", "512by512"], "--profile '512by512': expected HxW"),
    (["{tmp}", "--profile", "500x512@1"], "multiples of 8"),
])
def test_bad_input_is_a_one_line_error(tmp_path, argv, message):
    with pytest.raises(SdrtError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        build_cli.run(parse([a.format(tmp=tmp_path) for a in argv]))
    assert "\n" not in str(e.value)


def test_bad_manifest(tmp_path, onnx_dir):
    (onnx_dir / "unet.onnx").unlink()
    with pytest.raises(SdrtError, match=r"unet.onnx \(unet\) is missing; re-export"):
        build_cli.run(parse([str(onnx_dir)]))
    (onnx_dir / "manifest.json").write_text("{")
    with pytest.raises(SdrtError, match="is not valid JSON"):
        build_cli.run(parse([str(onnx_dir)]))


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is importable here")
def test_without_tensorrt_one_line_says_how_to_install(onnx_dir, capsys):
    code, out, err = sdrt(capsys, str(onnx_dir))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("sdrt build: error: TensorRT is not installed: `pip install "
                                                   "tensorrt`")
    assert "nvcr.io/nvidia/tensorrt" in err
    assert not (onnx_dir / "tensorrt").exists()  # no empty engine directory left to look like a build


def test_a_builder_that_cannot_start_leaves_no_directories(tmp_path, onnx_dir):
    def no_builder(options):
        raise SdrtError("TensorRT is not installed")

    out = tmp_path / "out"
    (out / "kept").mkdir(parents=True)
    for engines in (out / "new" / "deeper" / "engines", out / "kept" / "engines"):
        with pytest.raises(SdrtError, match="not installed"):
            build_cli.run(parse([str(onnx_dir), "-o", str(engines)]), make_builder=no_builder)
    assert [p.name for p in out.iterdir()] == ["kept"] and not any((out / "kept").iterdir())


def test_missing_dir_through_the_entry_point(tmp_path, capsys):
    code, _, err = sdrt(capsys, str(tmp_path / "nope"), "--profile", "512x512@1")
    assert code == 1 and err.count("\n") == 1 and "is not a directory" in err


def test_run_end_to_end_with_a_fake_builder(onnx_dir, fake_builder, capsys):
    fb = fake_builder()
    args = parse([str(onnx_dir), "--profile", "64x64@1-2", "--profile", "128x96", "--opt-level", "4",
                  "--components", "unet,vae_decoder"])
    assert build_cli.run(args, make_builder=lambda options: fb) == 0
    out = capsys.readouterr().out
    assert "TensorRT 10.0.1, Fake GPU, compute capability 8.9; profiles 64x64@1-2, 128x96@1" in out
    assert "[1/2] unet: build (new): fp16, 2 profile(s) [64x64@1-2, 128x96@1], opt level 4" in out
    assert out.strip().splitlines()[-1].startswith("vae_decoder")  # the summary table comes last
    m = json.loads((onnx_dir / "tensorrt" / "engines.json").read_text())  # default ENGINE_DIR
    assert sorted(m["engines"]) == ["unet", "vae_decoder"]
    assert m["engines"]["unet"]["key"]["build_options"] == "opt_level=4 refit=0"
    assert build_cli.run(args, make_builder=lambda options: fake_builder()) == 0
    assert "unet: up to date" in capsys.readouterr().out


def test_lock_contention_between_processes(tmp_path, onnx_dir, fake_builder):
    engines = tmp_path / "engines"
    code = ("import sys, time; from sdrt.export.engine_cache import BuildLock\n"
            "with BuildLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(engines)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        args = parse([str(onnx_dir), "-o", str(engines), "--lock-timeout", "0.3"])
        with pytest.raises(SdrtError, match=rf"another `sdrt build` \(pid {proc.pid}\) is writing .*waited 0.3 s"):
            build_cli.run(args, make_builder=lambda options: fake_builder())
    finally:
        proc.kill()
        proc.wait()
