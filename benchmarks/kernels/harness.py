"""What the kernel benchmarks share: importing sdrt.kernels (under Triton's interpreter on a CPU), timing, the CLI.

A benchmark file defines `run(dry_run) -> list[dict]` and `print_table(rows)`, and ends with
`sys.exit(harness.main(__doc__, run, print_table))`. The GPU suite imports the files by path with this folder on
sys.path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def import_kernels():
    """sdrt.kernels, under Triton's interpreter when there is no GPU (the env var must precede the first import)."""
    if not torch.cuda.is_available():
        if "sdrt.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("sdrt.kernels was imported without TRITON_INTERPRET=1; a CPU dry run needs it set first")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import sdrt.kernels

    return sdrt.kernels


def time_ms(fn, on_cuda: bool) -> tuple[float, float]:
    """(GPU ms, launched ms). GPU: the median of calls replayed from a CUDA graph, i.e. kernel time alone, which is
    what sdrt's captured denoising loop pays. Launched: the median of plain calls (do_bench), host launch cost
    included, which is what an uncaptured caller pays; on a slow host it hides the kernel for small shapes.
    On a CPU (a dry run) both are one call's wall time: a smoke test, not a measurement."""
    if on_cuda:
        import triton.testing

        graph = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return graph, triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return ms, ms


def device_name(on_cuda: bool) -> str:
    return torch.cuda.get_device_name() if on_cuda else "cpu (triton interpreter)"


def main(doc: str, run, print_table, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list to PATH")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; runs on CPU through Triton's interpreter")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print(f"{parser.prog}: CUDA is needed (try --dry-run for a CPU smoke test)", file=sys.stderr)
        return 2
    rows = run(dry_run=args.dry_run)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
