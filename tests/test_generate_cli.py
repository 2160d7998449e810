"""`sdrt generate`: files written, parameters stored in the PNG and reproducible, every bad input a one-line error."""

import argparse

import numpy as np
import pytest
from PIL import Image

from sdrt import generate
from sdrt.backends import make_backend
from sdrt.cli import main
from sdrt.image import load_image, psnr, read_params, save_png
from sdrt.models import load_model
from sdrt.pipeline import GenerationRequest, Pipeline

FAST = ["--steps", "2", "--scheduler", "ddim"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def run_cli(capsys, *argv):
    try:
        rc = main(["generate", *argv])
    except SystemExit as e:  # argparse's errors exit from inside main, as `sdrt` then does
        rc = e.code
    return rc, capsys.readouterr().err


def test_eager_writes_pngs_that_reproduce_themselves(tmp_path, capsys):
    out = tmp_path / "out.png"
    rc, err = run_cli(capsys, "tiny", "a photo", "--backend", "eager", "--batch", "2", "--seed", "5",
                      "--height", "64", "--width", "96", "-n", "blurry", *FAST, "-o", str(out))
    assert rc == 0, err
    assert "wrote" in err and "unet" in err
    images = [np.asarray(Image.open(p)) for p in (out, tmp_path / "out-1.png")]
    assert images[0].shape == (64, 96, 3) and not (tmp_path / "out-2.png").exists()
    p = read_params(tmp_path / "out-1.png")
    assert p["prompt"] == "a photo" and p["negative_prompt"] == "blurry" and p["index"] == 1
    assert (p["seed"], p["steps"], p["scheduler"], p["height"], p["width"], p["backend"]) == \
        (5, 2, "ddim", 64, 96, "eager:fp32")
    assert p["model"] == "tiny" and p["model_hash"] == load_model("tiny").source_hash
    # the PNG alone is enough to make the same images again
    c = load_model(p["model"])
    again = Pipeline.from_components(c, make_backend("eager", components=c)).generate(GenerationRequest(
        p["prompt"], p["negative_prompt"], p["steps"], p["guidance"], p["scheduler"], p["seed"], p["height"],
        p["width"], p["batch"]))
    assert all(np.array_equal(a, b) for a, b in zip(again.images, images, strict=True))


def test_params_from_a_png_makes_it_again(tmp_path, capsys):
    first = tmp_path / "first.png"
    rc, err = run_cli(capsys, "tiny", "a red barn", "--backend", "eager", "--batch", "2", "--seed", "11",
                      "--height", "64", "--width", "80", "-n", "fog", *FAST, "-o", str(first))
    assert rc == 0, err
    # from the second image of the batch: the whole batch comes back, pixel for pixel
    rc, err = run_cli(capsys, "tiny", "--params-from", str(tmp_path / "first-1.png"), "--backend", "eager",
                      "-o", str(tmp_path / "again.png"))
    assert rc == 0 and "other weights" not in err, err
    def pixels(name):
        return np.asarray(Image.open(tmp_path / f"{name}.png"))

    assert np.array_equal(pixels("first"), pixels("again")) and np.array_equal(pixels("first-1"), pixels("again-1"))
    assert read_params(tmp_path / "again-1.png") == read_params(tmp_path / "first-1.png")
    # a flag given beside it wins over the PNG
    rc, err = run_cli(capsys, "tiny", "--params-from", str(first), "--backend", "eager", "--seed", "12",
                      "-o", str(tmp_path / "other.png"))
    assert rc == 0 and read_params(tmp_path / "other.png")["seed"] == 12
    assert not np.array_equal(pixels("first"), pixels("other"))
    # other weights than the PNG names (here another architecture) still run, with a warning
    rc, err = run_cli(capsys, "tiny-sd2", "--params-from", str(first), "--backend", "eager",
                      "-o", str(tmp_path / "sd2.png"))
    assert rc == 0 and f"warning: {first} was made with other weights (tiny, sha256 " in err, err
    # what cannot be used is one line, exit 1
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    for argv, match in (([], "PROMPT is missing"), (["--params-from", str(plain)], "holds no sdrt generation"),
                        (["--params-from", str(tmp_path / "absent.png")], "no such file")):
        rc, err = run_cli(capsys, "tiny", *argv, "-o", str(tmp_path / "x.png"))
        assert rc == 1 and err.count("\n") == 1 and match in err, err


def test_onnxruntime_exports_once_then_reuses_and_matches_eager(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    args = ["tiny", "a photo", "--seed", "3", *FAST]
    rc, err = run_cli(capsys, *args, "--backend", "onnxruntime", "-o", str(tmp_path / "a.png"))
    assert rc == 0, err
    assert "exporting tiny" in err and str(tmp_path / "cache" / "onnx") in err
    rc, err = run_cli(capsys, *args, "-o", str(tmp_path / "b.png"))  # auto = onnxruntime on CPU, cached
    assert rc == 0 and "exporting" not in err, err
    assert read_params(tmp_path / "b.png")["backend"] == "onnxruntime:fp32"
    rc, err = run_cli(capsys, *args, "--backend", "eager", "-o", str(tmp_path / "c.png"))
    a, b, c = (np.asarray(Image.open(tmp_path / f"{k}.png")) for k in "abc")
    # 8-bit images of the same float image up to ORT's reassociation (89 dB measured): a level flips here and there.
    assert np.array_equal(a, b) and psnr(a, c) >= 75


def test_img2img_takes_the_init_image_size(tmp_path, capsys, monkeypatch):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8)).save(init)
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli(capsys, "tiny", "a photo", "--backend", "eager", "--init-image", "init.png", "--strength",
                      "0.5", *FAST[:2], "-o", str(tmp_path / "o.png"))
    assert rc == 0, err
    assert Image.open(tmp_path / "o.png").size == (96, 72)  # rounded down to multiples of 8, as diffusers does
    p = read_params(tmp_path / "o.png")
    # absolute, though given relative: --params-from from another directory must find this file, not another
    assert p["strength"] == 0.5 and p["init_image"] == str(init)


def test_the_prompt_may_follow_the_options(tmp_path, capsys):
    for argv, prompt in [(["--backend", "eager", "a red barn"], "a red barn"), (["--backend", "eager", "--",
                                                                                "-a dash"], "-a dash")]:
        rc, err = run_cli(capsys, "tiny", *FAST, "-o", str(tmp_path / "p.png"), *argv)
        assert rc == 0, err
        assert read_params(tmp_path / "p.png")["prompt"] == prompt
    rc, err = run_cli(capsys, "tiny", "a", "b", "-o", str(tmp_path / "q.png"))
    assert rc == 1 and err == "sdrt generate: error: unrecognized arguments: b (see sdrt generate --help)\n"
    rc, err = run_cli(capsys, "tiny", "--steps", "1", "--bogus", "-o", str(tmp_path / "q.png"))
    assert rc == 1 and "unrecognized arguments: --bogus" in err


def test_a_failed_write_keeps_the_old_image_and_leaves_no_part(tmp_path, capsys, monkeypatch):
    from PIL import PngImagePlugin

    out = tmp_path / "o.png"
    rc, _ = run_cli(capsys, "tiny", "a photo", "--backend", "eager", *FAST, "-o", str(out))
    before = out.read_bytes()
    real = PngImagePlugin._save

    def disk_full(im, fp, filename, *a, **kw):  # half a PNG, then ENOSPC
        real(im, fp, filename, *a, **kw)
        fp.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PngImagePlugin, "_save", disk_full)
    monkeypatch.setitem(Image.SAVE, "PNG", disk_full)
    rc, err = run_cli(capsys, "tiny", "a photo", "--backend", "eager", *FAST, "--seed", "9", "-o", str(out))
    assert rc == 1 and err.endswith(f"cannot write {out}: No space left on device\n"), err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def test_every_batch_path_is_checked_before_the_work(tmp_path, capsys):
    (tmp_path / "o-1.png").mkdir()
    rc, err = run_cli(capsys, "tiny", "a photo", "--backend", "eager", *FAST, "--batch", "2", "-o",
                      str(tmp_path / "o.png"))
    assert rc == 1 and err == f"sdrt generate: error: output {tmp_path / 'o-1.png'} is a directory\n"
    assert not (tmp_path / "o.png").exists()


def test_images_too_large_or_crafted_are_one_line_errors(tmp_path, capsys, monkeypatch):
    big = tmp_path / "big.png"
    save_png(np.zeros((64, 64, 3)), big, {"prompt": "a", "seed": 1})
    deep = tmp_path / "deep.png"  # a chunk of 100000 nested arrays: json's recursion limit
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("sdrt", "[" * 100000 + "]" * 100000)
    Image.new("RGB", (8, 8)).save(deep, pnginfo=info)
    rc, err = run_cli(capsys, "tiny", "--params-from", str(deep), "-o", str(tmp_path / "x.png"))
    assert rc == 1 and err.count("\n") == 1 and "cannot read generation parameters (RecursionError)" in err, err
    for limit in (3000, 1000):  # 4096 pixels: past PIL's warning (the limit), then past its error (twice it)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        rc, err = run_cli(capsys, "tiny", "a", "--init-image", str(big), "-o", str(tmp_path / "x.png"))
        assert rc == 1 and err == f"sdrt generate: error: init image {big}: too many pixels to open (sdrt takes up " \
            "to 4096 per side)\n", err
        rc, err = run_cli(capsys, "tiny", "--params-from", str(big), "-o", str(tmp_path / "x.png"))
        assert rc == 1 and err.count("\n") == 1 and "cannot read generation parameters (Decompression" in err, err


def test_a_closed_stdout_is_a_quiet_exit(tmp_path):
    import subprocess
    import sys

    # `sdrt info tiny | head`: the reader has left (`true` before the model is built) by the time sdrt prints; no
    # BrokenPipeError traceback or "internal error"
    p = subprocess.run(f"{sys.executable} -m sdrt.cli info tiny | true", shell=True, capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert p.stderr == ""


def test_empty_prompt_is_unconditional_and_long_prompts_warn(tmp_path, capsys):
    rc, err = run_cli(capsys, "tiny", "", "--backend", "eager", "--seed", "5", *FAST, "-o", str(tmp_path / "e.png"))
    assert rc == 0, err
    assert read_params(tmp_path / "e.png")["prompt"] == ""
    # With an empty prompt (and no negative) both CFG halves are the same text, so guidance changes nothing: the
    # image is guidance 1's, which runs the prompt alone (batch 1 against 2: float reassociation at most).
    rc, err = run_cli(capsys, "tiny", "", "--backend", "eager", "--seed", "5", *FAST, "--guidance", "1",
                      "-o", str(tmp_path / "g1.png"))
    assert rc == 0, err
    assert psnr(np.asarray(Image.open(tmp_path / "e.png")), np.asarray(Image.open(tmp_path / "g1.png"))) >= 75
    long = " ".join(["photo"] * 80) + " purple elephant"
    rc, err = run_cli(capsys, "tiny", long, "--backend", "eager", *FAST, "-o", str(tmp_path / "l.png"))
    assert rc == 0 and "truncated" in err and "purple elephant" in err


@pytest.mark.parametrize("argv,match", [
    (["--steps", "0"], "steps must be"),
    (["--guidance", "nan"], "guidance must be a finite"),
    (["--guidance", "inf"], "guidance must be a finite"),
    (["--scheduler", "heun"], "unknown scheduler 'heun'"),
    (["--height", "65"], "height must be a multiple of 8"),
    (["--width", "8192"], "width must be a multiple of 8"),
    (["--height", "0"], "height must be"),
    (["--batch", "0"], "batch must be"),
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--init-image", "INIT", "--strength", "1.5"], r"strength must be in \(0, 1\]"),
    (["--init-image", "INIT", "--strength", "0"], r"strength must be in \(0, 1\]"),
    (["--init-image", "NOT_AN_IMAGE"], "cannot open as an image"),
    (["--init-image", "MISSING"], "no such file"),
    (["--backend", "tensorflow"], "unknown backend"),
    (["--backend", "eager:fp8"], "unknown precision"),
    (["-o", "out.jpg"], "PNG"),
    (["--width", "32", "--backend", "eager"], "width must be a multiple of 8 in \\[64"),  # after loading: eager's limit
    (["--width", "64.5"], "argument --width: invalid int value"),  # argparse's own errors: one line, exit 1 too
    (["--batch", "65"], r"batch must be an integer in \[1, 64\]"),
    (["--device", "foo"], "unknown device 'foo'"),
    (["--device", "cuda:9"], "device 'cuda:9': "),  # no CUDA here, or fewer GPUs
    (["-n", "\udcff"], "negative prompt .* is not valid UTF-8"),  # a byte the terminal could not decode
    (["--init-image", "ONE_PIXEL", "--backend", "eager"], "the init image is 1x1 pixels"),  # eager: no export
    (["--params-from", "ILL_TYPED"], "its seed is True \\(bool, not int\\)"),
    (["-o", "A_DIR.png"], "is a directory"),
    (["-o", "A_FILE/x.png"], "is not a directory"),
    (["-o", ""], "the output path is empty"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, argv, match):
    init, bad = tmp_path / "init.png", tmp_path / "bad.png"
    Image.new("RGB", (64, 64)).save(init)
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    save_png(np.zeros((8, 8, 3)), tmp_path / "ill.png", {"prompt": "a", "seed": True})
    bad.write_text("not a png")
    (tmp_path / "d.png").mkdir()
    subst = {"INIT": str(init), "NOT_AN_IMAGE": str(bad), "MISSING": str(tmp_path / "missing.png"),
             "ONE_PIXEL": str(tmp_path / "one.png"), "ILL_TYPED": str(tmp_path / "ill.png"),
             "A_DIR.png": str(tmp_path / "d.png"), "A_FILE/x.png": str(bad / "x.png")}
    argv = [subst.get(a, a) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "x.png")]
    rc, err = run_cli(capsys, "tiny", "a photo", "--steps", "1", *argv)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdrt generate: error: "), err
    assert "Traceback" not in err
    import re

    assert re.search(match, lines[0]), lines[0]


def test_a_nonfinite_image_is_an_error_and_not_written(tmp_path, capsys):
    # Guidance this large overflows fp32 in the guidance combine: NaN latents, which once became a garbage PNG.
    out = tmp_path / "nan.png"
    rc, err = run_cli(capsys, "tiny", "a", "--backend", "eager", *FAST, "--guidance", "1e308", "-o", str(out))
    assert rc == 1 and "came out NaN/inf" in err.splitlines()[-1] and not out.exists()


def test_a_16_bit_grey_init_image_keeps_its_levels(tmp_path):
    # PIL's convert("RGB") clips 16-bit values at 255: mid-grey 32768 would come back white.
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "g16.png")
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.shape == (8, 8, 3) and (rgb == 128).all()  # 32768 / 257, rounded


def test_an_init_image_is_turned_upright_by_its_exif_orientation(tmp_path):
    # A phone photo stored landscape with Orientation 6 (rotate 90 degrees clockwise to view): as diffusers loads it.
    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:, :8] = 255  # a white band on the stored image's left edge: the viewed image's top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    rgb = np.asarray(load_image(tmp_path / "phone.jpg"))
    assert rgb.shape == (96, 64, 3)
    assert rgb[:6].mean() > 200 and rgb[-80:].mean() < 30


def test_run_through_its_own_parser(tmp_path):
    # the module works without the top-level CLI: HELP, add_arguments, run
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    args = parser.parse_args(["tiny", "a cat", "--backend", "eager", *FAST, "--seed", "1", "-o",
                              str(tmp_path / "p.png")])
    assert generate.run(args) == 0 and read_params(tmp_path / "p.png")["prompt"] == "a cat"
    assert isinstance(generate.HELP, str)
