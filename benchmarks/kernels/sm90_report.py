"""Compile sdrt's Triton kernels for sm_90 (H100, H200) on any machine, GPU or not, and report what the compiler made
of each launch at SD's shapes: registers per thread, stack (local memory: spills), shared memory, the widths of its
global loads and stores, and its tensor-core instructions. Most questions about a kernel change are answered here,
without spending the rare device time (METHOD.md: "read what costs no device time").

    python benchmarks/kernels/sm90_report.py [--json PATH] [--only group_norm|attention|geglu|layer_norm]

Columns: `ld`/`st` count the PTX's global accesses as v4/v2/scalar instructions (fp16: v4 = 16 bytes a thread,
what coalesced code should use), `wgmma` the Hopper tensor-core instructions in the code (not executed counts).
Run it without TRITON_INTERPRET (the interpreter's kernels cannot be compiled). Arguments are specialised as
Triton's launcher specialises the same shapes' CUDA tensors: pointers 16-byte
aligned, ints divisible by 16 marked so, ints equal to 1 made constants, constexprs as given. The launches are the
kernels' own (group_norm.launches, attention.launch_args, geglu.launches, layer_norm.launches), so the report
follows the code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from bench_attention import SHAPES as ATTENTION_SHAPES
from bench_geglu import SHAPES as GEGLU_SHAPES
from bench_group_norm import FORMATS, GROUPS
from bench_group_norm import SHAPES as GROUP_NORM_SHAPES
from bench_layer_norm import SHAPES as LAYER_NORM_SHAPES
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_launch(kernel, args: tuple, kwargs: dict):
    """triton.compile of kernel(*args, **kwargs) for sm_90, specialised as a CUDA launch of the same values is."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    options.pop("launch_pdl", None)  # a launch attribute, not a compile option
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        v = values[name]
        if name in kwargs or isinstance(v, (bool, str)) or (isinstance(v, int) and v == 1):
            signature[name], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name], attrs[(i,)] = "*" + DTYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, int):
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options=options)


def resources(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    ptx = compiled.asm["ptx"]

    def widths(op: str) -> str:
        v4 = len(re.findall(rf"{op}\.global\S*\.v4", ptx))
        v2 = len(re.findall(rf"{op}\.global\S*\.v2", ptx))
        return f"{v4}/{v2}/{len(re.findall(rf'{op}.global', ptx)) - v4 - v2}"

    def field(name: str) -> int:
        return int(re.search(rf"{name}:(\d+)", usage).group(1))

    return {"regs": field("REG"), "stack": field("STACK"), "smem": compiled.metadata.shared,
            "ld": widths("ld"), "st": widths("st"), "wgmma": ptx.count("wgmma.mma_async"),
            "gdc": "griddepcontrol" in ptx}


def group_norm_rows(shapes=GROUP_NORM_SHAPES, layouts=tuple(FORMATS), adds=(False, True),
                    one_pass: bool | None = None) -> list[dict]:
    """adds: without and with the fused per-channel add (the resnets' norm2 takes the time embedding); the add is
    compiled in channels-last only, the layout the torch backend runs. one_pass: GroupNormTuning's (None: the
    default plan, one kernel at SD's 8^2 and 16^2 levels)."""
    gn = importlib.import_module("sdrt.kernels.group_norm")
    rows = []
    for N, C, H, W in shapes:
        for layout in layouts:
            memory_format = FORMATS[layout]
            x = torch.empty(N, C, H, W, dtype=torch.float16).contiguous(memory_format=memory_format)
            w = torch.empty(C, dtype=torch.float16)
            # the plan as on an H100 (132 SMs), not this CPU's
            plan = gn.plan_for(x, GROUPS, gn.GroupNormTuning(one_pass=one_pass), sms=132)
            for add in adds if layout == "nhwc" else (False,):
                a = torch.empty(N, C, dtype=torch.float16) if add else None
                for kernel, grid, args, kwargs in gn.launches(x, torch.empty_like(x), GROUPS, w, w, 1e-5, True, plan,
                                                              pdl=True, add=a):
                    rows.append({"kernel": kernel.__name__.strip("_"), "shape": f"{N}x{C}x{H}x{W}",
                                 "layout": layout, "add": add, "grid": "x".join(map(str, grid)), "gpp": plan.gpp,
                                 **resources(compile_launch(kernel, args, kwargs))})
    return rows


def geglu_rows(shapes=GEGLU_SHAPES) -> list[dict]:
    gg = importlib.import_module("sdrt.kernels.geglu")
    rows, seen = [], set()
    for name, M, F in shapes:
        if F in seen:  # the row count only changes the grid
            continue
        seen.add(F)
        h, y = torch.empty(M, 2 * F, dtype=torch.float16), torch.empty(M, F, dtype=torch.float16)
        for kernel, grid, args, kwargs in gg.launches(h, y):
            rows.append({"kernel": "geglu", "shape": name, "F": F, "grid": "x".join(map(str, grid)),
                         **resources(compile_launch(kernel, args, kwargs))})
    return rows


def layer_norm_rows(shapes=LAYER_NORM_SHAPES) -> list[dict]:
    ln = importlib.import_module("sdrt.kernels.layer_norm")
    rows, seen = [], set()
    for name, M, C in shapes:
        if C in seen:
            continue
        seen.add(C)
        x = torch.empty(M, C, dtype=torch.float16)
        w = torch.empty(C, dtype=torch.float16)
        for s_bias in (None, w):  # norm2's launch, and norm3's (the feed-forward's bias carried into s)
            for kernel, grid, args, kwargs in ln.launches(x, x, torch.empty_like(x), torch.empty_like(x), w, w, 1e-5,
                                                          s_bias):
                rows.append({"kernel": "add_layer_norm", "shape": name, "C": C, "grid": "x".join(map(str, grid)),
                             "block": f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_C']} w{kwargs['num_warps']}",
                             "s_bias": s_bias is not None, **resources(compile_launch(kernel, args, kwargs))})
    return rows


def attention_rows(shapes=ATTENTION_SHAPES, configs=None) -> list[dict]:
    """configs: the autotuner's (default) or a subset of them."""
    att = importlib.import_module("sdrt.kernels.attention")
    rows, seen = [], set()
    for _, B, H, n_q, n_k, d in shapes:
        if (n_k > 154, d) in seen:  # self-attention shapes with the same d compile alike
            continue
        seen.add((n_k > 154, d))
        q = torch.empty(B, H, n_q, d, dtype=torch.float16)
        k = v = torch.empty(B, H, n_k, d, dtype=torch.float16)
        for split in sorted({False, True} if att.head_dim_tiles(d)[1] else {False}):
            args, constexprs = att.launch_args(q, k, v, torch.empty_like(q), None, split)
            for cfg in configs or att._CONFIGS:
                kwargs = constexprs | cfg.kwargs | {"EVEN_N": n_k % cfg.kwargs["BLOCK_N"] == 0,
                                                    "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                row = {"kernel": "attention", "Nk": n_k, "d": d,
                       "tiles": "+".join(str(t) for t in att.head_dim_tiles(d, split) if t),
                       "config": f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"}
                try:
                    row |= resources(compile_launch(att._attention_kernel, args, kwargs))
                except Exception as e:  # noqa: BLE001  (e.g. out of shared memory: what the autotuner skips)
                    row["error"] = str(e).splitlines()[0][:120]
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH")
    sections = {"group_norm": group_norm_rows, "attention": attention_rows, "geglu": geglu_rows,
                "layer_norm": layer_norm_rows}
    p.add_argument("--only", choices=tuple(sections))
    args = p.parse_args(argv)
    report = {name: rows() for name, rows in sections.items() if args.only in (None, name)}
    print(f"sdrt kernels compiled for sm_90 by triton {triton.__version__} (no GPU needed)\n")
    for name, rows in report.items():
        print(f"**{name}**\n\n{markdown(rows)}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report | {"triton": triton.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
