"""sdrt's exit protocol (sdrt/cli.py): one stderr line and exit 1 for bad input, 2 for a bug, 130 on Ctrl-C."""

import pytest

from sdrt.cli import main
from sdrt.errors import SdrtError


def _raising(exc):
    def run(args):
        raise exc
    return run


@pytest.mark.parametrize("exc, rc, line", [
    (SdrtError("x.onnx is not a model: onnxruntime says\n  INVALID_PROTOBUF\n"), 1,
     "sdrt info: error: x.onnx is not a model: onnxruntime says; INVALID_PROTOBUF"),
    (RuntimeError("CUDA error: an illegal memory access\nCUDA kernel errors might be reported later\n"), 2,
     "sdrt info: internal error: RuntimeError: CUDA error: an illegal memory access (rerun with --traceback)"),
    (RuntimeError(), 2, "sdrt info: internal error: RuntimeError:  (rerun with --traceback)"),
    (KeyboardInterrupt(), 130, "sdrt info: interrupted"),
], ids=["user-error", "internal-error", "internal-error-no-message", "interrupt"])
def test_every_failure_is_one_line_with_its_exit_code(monkeypatch, capsys, exc, rc, line):
    monkeypatch.setattr("sdrt.info.run", _raising(exc))  # the parser binds each command's run when main builds it
    assert main(["info", "tiny"]) == rc
    assert capsys.readouterr().err.splitlines() == [line]


def _import_failed_after_ctrl_c():
    try:
        raise KeyboardInterrupt  # Ctrl-C inside numpy's import...
    except KeyboardInterrupt:
        raise ImportError("cannot load module more than once per process")  # noqa: B904  (implicit __context__, as there)


def test_ctrl_c_during_an_import_is_an_interrupt_not_an_internal_error(monkeypatch, capsys):
    monkeypatch.setattr("sdrt.info.run", lambda args: _import_failed_after_ctrl_c())
    assert main(["info", "tiny"]) == 130
    assert capsys.readouterr().err.splitlines() == ["sdrt info: interrupted"]


def test_traceback_flag_shows_the_internal_error_itself(monkeypatch):
    monkeypatch.setattr("sdrt.info.run", _raising(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        main(["--traceback", "info", "tiny"])
