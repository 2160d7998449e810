"""The kernels' sm_90 (H100/H200) code, compiled here without a GPU by benchmarks/kernels/sm90_report.py.

CI has no GPU, but it has Triton's ptxas: what the compiler makes of a launch (vector widths, spills) is checked on
every run. A subprocess, because this directory's conftest imports the kernels under Triton's interpreter, whose
functions cannot be compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPORT_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels"
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no bundled ptxas")

SCRIPT = """
import importlib, json, torch, sm90_report as r
gn = importlib.import_module("sdrt.kernels.group_norm")
att = importlib.import_module("sdrt.kernels.attention")
out = {}
x = torch.empty(2, 320, 16, 16, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
w = torch.empty(320, dtype=torch.float16)
plan = gn._plan(2, 320, 256, 32, 2, True, 4 * 132)  # 12 groups a program, 8 programs a chunk: finalize
out["group_norm"] = [[k.__name__, r.resources(r.compile_launch(k, a, kw))]
                     for k, _, a, kw in gn.launches(x, torch.empty_like(x), 32, w, w, 1e-5, True, plan, pdl=True)]
q = torch.empty(2, 8, 256, 40, dtype=torch.float16)
args, constexprs = att.launch_args(q, q, q, torch.empty_like(q))
cfg = att._CONFIGS[0]
kw = constexprs | cfg.kwargs | {"EVEN_N": True, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
out["attention"] = r.resources(r.compile_launch(att._attention_kernel, args, kw))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPORT_DIR, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def _widths(field: str) -> tuple[int, int, int]:
    return tuple(int(n) for n in field.split("/"))


def test_group_norm_channels_last_uses_16_byte_accesses(compiled):
    # 10 channels a group, channels-last: one group a program compiled to scalar 2-byte loads and stores (f665b40);
    # chunks of 12 groups must stay 16-byte (v4) in the tile loops of the stats and apply kernels, and nothing spills.
    kernels = dict(compiled["group_norm"])
    assert set(kernels) == {"_group_norm_stats_kernel", "_group_norm_finalize_kernel", "_group_norm_apply_kernel"}
    assert _widths(kernels["_group_norm_stats_kernel"]["ld"])[0] >= 2
    assert _widths(kernels["_group_norm_apply_kernel"]["ld"])[0] >= 2
    assert _widths(kernels["_group_norm_apply_kernel"]["st"])[0] >= 2
    assert all(k["stack"] == 0 and k["gdc"] for k in kernels.values())  # no spills; PDL's griddepcontrol is there


def test_attention_two_tile_head_dim_uses_tensor_cores(compiled):
    # d = 40 as 32 + 16 columns, the autotuner's first config: wgmma, 16-byte loads, no spills, 48 KB of shared memory
    # (a padded 64-column tile takes 64 KB).
    a = compiled["attention"]
    assert a["wgmma"] > 0 and _widths(a["ld"])[0] > 0 and a["stack"] == 0
    assert a["smem"] <= 48 * 1024
