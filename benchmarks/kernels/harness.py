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


def cold_copies(x: torch.Tensor, on_cuda: bool) -> list[torch.Tensor]:
    """x and enough clones of it that cycling through them overflows L2 twice over, so each call reads from HBM.

    A graph replaying one call over one 5 MB input measures L2, not memory: H100's L2 is 50 MB and H200's 60 MB.
    Capped at 256 copies (2 x 2560 x 8^2 fp16 is 0.66 MB)."""
    if not on_cuda:
        return [x]
    l2 = getattr(torch.cuda.get_device_properties(x.device), "L2_cache_size", 0) or 64 << 20
    n = min(256, -(-2 * l2 // (x.numel() * x.element_size())))
    return [x] + [x.clone() for _ in range(n - 1)]


def time_cold_ms(fn, inputs: list, on_cuda: bool) -> float:
    """GPU ms per call of fn(input) with inputs from cold_copies: one graph replays the calls over every copy in turn,
    so the time is HBM-bound, as for data no kernel touched just before. On a CPU: one call's wall time."""
    if not on_cuda:
        return time_ms(lambda: fn(inputs[0]), on_cuda)[0]
    import triton.testing

    return triton.testing.do_bench_cudagraph(lambda: [fn(x) for x in inputs], rep=100, return_mode="median") / len(
        inputs)


def versus_eager(ours, eager, inputs: list, nbytes: int, on_cuda: bool, copy: float | None) -> dict:
    """The columns every elementwise-kernel row shares: ours(input) and eager(input) timed cold over `inputs`
    (cold_copies), ours warm on inputs[0] and launched, GB/s counting `nbytes` (what any implementation must move)
    for both, pct_copy against copy_gbps."""
    ms = time_cold_ms(ours, inputs, on_cuda)
    warm_ms, launch_ms = time_ms(lambda: ours(inputs[0]), on_cuda)
    torch_ms = time_cold_ms(eager, inputs, on_cuda)
    gbps = nbytes / ms * 1e-6
    return {"ms": ms, "gbps": gbps, "pct_copy": 100 * gbps / copy if copy else None, "warm_ms": warm_ms,
            "torch_ms": torch_ms, "torch_gbps": nbytes / torch_ms * 1e-6, "speedup": torch_ms / ms,
            "launch_ms": launch_ms}


def copy_gbps(on_cuda: bool, nbytes: int = 1 << 30) -> float | None:
    """The memory ceiling measured now, on this device: a device-to-device copy of nbytes, counting bytes read plus
    bytes written (what METHOD.md calls the copy bandwidth). None on a CPU."""
    if not on_cuda:
        return None
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / ms * 1e-6


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
