"""`sdrt` command line: one subcommand per module, each with `HELP`, `add_arguments(parser)` and `run(args)`.

Subcommand modules import torch and friends inside `run`, so `sdrt --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sdrt import __version__
from sdrt.errors import SdrtError

COMMANDS = {
    "info": "sdrt.info",
    "bench": "sdrt.bench",
    "export": "sdrt.export.cli",
    "generate": "sdrt.generate",
    "build": "sdrt.export.build_cli",
}


class _Parser(argparse.ArgumentParser):
    """argparse answers a bad flag with its usage block and exit 2; sdrt's protocol for bad input is one line and
    exit 1 (2 is an internal error). Subcommand parsers are made of the same class."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdrt", description="Stable Diffusion inference runtime and compiler.")
    parser.add_argument("--version", action="version", version=f"sdrt {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an internal error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def quiet_libraries() -> None:
    """diffusers/transformers print loading bars and advice on every load; the CLI shows its own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def parse(argv: list[str] | None) -> argparse.Namespace:
    """argparse, except that generate's PROMPT may also follow the options (`generate MODEL --steps 4 "a cat"`, or
    `-- "-a cat"`): an optional positional is taken, empty, as soon as an option follows MODEL."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "prompt", "") is None:
        after_dashes = extra[0] == "--"
        rest = extra[1:] if after_dashes else extra
        if len(rest) == 1 and (after_dashes or not rest[0].startswith("-")):
            args.prompt, extra = rest[0], []
    if extra:
        print(f"sdrt {args.command}: error: unrecognized arguments: {' '.join(extra)} (see sdrt {args.command} "
              "--help)", file=sys.stderr)
        raise SystemExit(1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        quiet_libraries()
        rc = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe (`| head`) shows here, where it is caught, rather than at exit
        return rc
    except SdrtError as e:  # the message may quote a library's multi-line one: kept whole, on one line
        print(f"sdrt {args.command}: error: {'; '.join(_lines(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sdrt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sdrt info | head`: the reader has gone; nothing left to say, and nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not raise again
        return 1
    except Exception as e:  # a bug, not bad input: one line unless asked for the traceback
        if _interrupted(e):  # Ctrl-C inside an import that then failed on its half-initialised module
            print(f"sdrt {args.command}: interrupted", file=sys.stderr)
            return 130
        if args.traceback:
            raise
        first = (_lines(e) or [""])[0]  # torch's and onnxruntime's messages run to many lines; the trace has them
        print(f"sdrt {args.command}: internal error: {type(e).__name__}: {first} (rerun with --traceback)",
              file=sys.stderr)
        return 2


def _interrupted(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _lines(e: BaseException) -> list[str]:
    return [line.strip() for line in str(e).splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
