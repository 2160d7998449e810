"""`sdrt export`: bad input is one line on stderr and exit 1; a good run prints its summary and manifest."""

import argparse

import pytest
from sdrt.export import cli

from sdrt.errors import SdrtError


def parse(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


def sdrt_main(argv):
    from sdrt.cli import COMMANDS, main

    if "export" not in COMMANDS:
        pytest.skip("sdrt.export.cli is not registered in sdrt.cli.COMMANDS")
    return main(argv)


@pytest.mark.parametrize("argv, message", [
    (["no-such-model"], "neither a preset"),
    (["tiny", "--components", "unet", "bogus"], "unknown component 'bogus'"),
    (["tiny", "--components", "text_encoder_2"], "model tiny has no text_encoder_2"),
    (["tiny", "--precision", "int4"], "precision 'int4'"),
    (["tiny", "--opset", "9"], "opset 9"),
    (["tiny", "--precision", "int8", "--calibration-size", "0"], "calibration size must be a multiple of 8"),
    (["tiny", "--precision", "int8", "--calibration-size", "16"], "for tiny, got 16"),  # tiny's export starts at 32
    (["tiny", "--precision", "int8", "--calibration-size", "100"], "calibration size must be a multiple of 8"),
    (["tiny", "--precision", "int8", "--calibration-steps", "0"], "calibration steps must be an integer >= 1"),
])
def test_bad_input_is_one_line_exit_1(tmp_path, capsys, argv, message):
    argv = ["export", *argv, "-o", str(tmp_path / "o")]
    assert sdrt_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdrt export: error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(SdrtError, match=message):  # the same through the module's own parser
        cli.run(parse(argv[1:]))


def test_output_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert sdrt_main(["export", "tiny", "-o", str(f)]) == 1
    err = capsys.readouterr().err
    assert "is not a directory" in err and err.count("\n") == 1


def test_an_empty_output_is_refused(capsys):
    assert sdrt_main(["export", "tiny", "-o", ""]) == 1  # not "export into the current directory"
    assert capsys.readouterr().err == "sdrt export: error: the output directory (-o) is empty\n"


def test_cli_exports_and_reruns(tmp_path, capsys):
    out = tmp_path / "o"
    args = ["export", "tiny", "-o", str(out), "--components", "text_encoder", "text_encoder", "--opset", "17"]
    assert sdrt_main(args) == 0
    cap = capsys.readouterr()
    assert "text_encoder" in cap.err and "max_rel" in cap.err and "peak RSS" in cap.err and " MB " in cap.err
    assert "text_encoder (fp32, opset 17)" in cap.out and "32..128 px in steps of 8" in cap.out
    assert (out / "text_encoder.onnx").is_file() and (out / "manifest.json").is_file()
    assert sdrt_main(args) == 0
    assert "up to date (text_encoder: same weights" in capsys.readouterr().err  # named twice, listed once
