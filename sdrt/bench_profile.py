"""Where a stage's time goes: one call under torch.profiler, its time summed by kind of kernel.

On CUDA the unit is the kernel (CUPTI's device time, by kernel name: cuDNN, cuBLAS, Triton and PyTorch's own); on a
CPU, where there are no kernels, the self time of each aten op. Self times partition the call, so the kinds add up
to the total. `sdrt bench --profile` records this for one UNet step and one VAE decode of every row: the map of
what to optimise next, e.g. how much of a captured UNet step is convolutions that sdrt does not own.
"""

from __future__ import annotations

import re

import torch

# First match wins, on the lower-cased kernel or op name. cuDNN's convolutions are CUTLASS "fprop" kernels, so
# conv is tried before gemm; nvjet kernels are cuBLASLt's GEMMs on Hopper.
KINDS = (
    ("attention", re.compile(r"attention|flash|fmha|sdpa|softmax")),
    ("group_norm", re.compile(r"group_norm|groupnorm")),
    ("layer_norm", re.compile(r"layer_norm|layernorm")),  # sdrt's add+LayerNorm, torch's LayerNorm
    ("geglu", re.compile(r"geglu|gelu")),  # sdrt's fused GEGLU; eager's GELU (its product counts as other)
    ("conv", re.compile(r"conv|fprop|implicit")),
    ("gemm", re.compile(r"gemm|matmul|addmm|\bmm\b|bmm|linear|nvjet")),
)
TOP = 8


def kind_of(name: str) -> str:
    name = name.lower()
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def breakdown(fn, device: torch.device) -> dict:
    """Run fn once under the profiler: {"total_ms", "kinds": {kind: ms}, "top": [[name, ms], ...]}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    want = DeviceType.CUDA if cuda else DeviceType.CPU
    times: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != want:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        times[e.name] = times.get(e.name, 0.0) + us / 1e3
    kinds: dict[str, float] = {}
    for name, ms in times.items():
        kind = kind_of(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    top = sorted(times.items(), key=lambda kv: -kv[1])[:TOP]
    return {"total_ms": sum(times.values()), "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [[name[:120], ms] for name, ms in top]}


def markdown(results: list[dict]) -> str:
    """One line per (row, stage) that has a profile: ms by kind, with its share of the stage."""
    rows = [(r["backend"], stage, p) for r in results if r.get("profile") for stage, p in r["profile"].items()]
    if not rows:
        return ""
    kinds = [k for k, _ in KINDS] + ["other"]
    lines = ["Where the time goes (one call under torch.profiler; GPU kernel time, or CPU self time of aten ops; "
             "ms and share):", "", "| backend | stage | total ms | " + " | ".join(kinds) + " |",
             "|" + "---|" * (3 + len(kinds))]
    for backend, stage, p in rows:
        total = p["total_ms"]
        cells = [f"{p['kinds'][k]:.2f} ({100 * p['kinds'][k] / total:.0f}%)" if total and p["kinds"].get(k) else "-"
                 for k in kinds]
        lines.append(f"| {backend} | {stage} | {total:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_stages(backend, x, device: torch.device) -> dict:
    """One UNet step at the CFG batch and one VAE decode of a set-up bench row (x: bench_rows.StageInputs)."""
    return {
        "UNet step": breakdown(lambda: backend.unet(x.sample, x.timestep, x.encoder_hidden_states, x.text_embeds,
                                                    x.time_ids), device),
        "VAE decode": breakdown(lambda: backend.vae_decoder(x.latent), device),
    }
