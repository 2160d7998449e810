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
import importlib, json, sm90_report as r
att = importlib.import_module("sdrt.kernels.attention")
# 2 x 320 x 16^2 channels-last in the split plan: 12 groups a program, 8 programs a chunk, so all three kernels
# (finalize too), with and without the fused add. 2 x 1280 x 16^2 in the default plan: one kernel.
print(json.dumps({"group_norm": r.group_norm_rows([(2, 320, 16, 16)], ["nhwc"], one_pass=False),
                  "group_norm_one_pass": r.group_norm_rows([(2, 1280, 16, 16)], ["nchw", "nhwc"]),
                  "attention": r.attention_rows([("d40", 2, 8, 256, 256, 40)], att._CONFIGS[:1]),
                  "geglu": r.geglu_rows([("sd15-64x64", 8192, 1280)]),
                  "layer_norm": r.layer_norm_rows([("sd15-64x64", 8192, 320), ("sd15-16x16", 512, 1280)])}))
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
    for add in (False, True):  # with the fused add (norm2 of every resnet) too
        kernels = {r["kernel"]: r for r in compiled["group_norm"] if r["add"] is add}
        assert set(kernels) == {"group_norm_stats_kernel", "group_norm_finalize_kernel", "group_norm_apply_kernel"}
        assert _widths(kernels["group_norm_stats_kernel"]["ld"])[0] >= 2
        assert _widths(kernels["group_norm_apply_kernel"]["ld"])[0] >= 2
        assert _widths(kernels["group_norm_apply_kernel"]["st"])[0] >= 2
        assert all(k["stack"] == 0 and k["gdc"] for k in kernels.values())  # no spills; PDL's griddepcontrol there


def test_group_norm_one_pass_uses_16_byte_accesses(compiled):
    # SD's 16^2 level at 1280 channels (40 a group, 80 bytes a pixel in channels-last): the whole group in one
    # program's registers (256 x 64 lanes over 16 warps), still 16-byte loads and stores of x and y, no spills.
    rows = compiled["group_norm_one_pass"]
    assert {(r["layout"], r["add"]) for r in rows} == {("nchw", False), ("nhwc", False), ("nhwc", True)}
    for r in rows:
        assert r["kernel"] == "group_norm_one_pass_kernel" and r["grid"] == "64" and r["stack"] == 0
        assert _widths(r["ld"])[0] >= 4 and _widths(r["st"]) == (4, 0, 0)


def test_attention_two_tile_head_dim_uses_tensor_cores(compiled):
    # d = 40 as 32 + 16 columns (and, beside it, one padded 64-column tile), the autotuner's first config: wgmma,
    # 16-byte loads, no spills; the two tiles take 48 KB of shared memory against the padded tile's 64 KB.
    rows = {r["tiles"]: r for r in compiled["attention"]}
    assert set(rows) == {"32+16", "64"}
    for a in rows.values():
        assert "error" not in a and a["wgmma"] > 0 and _widths(a["ld"])[0] > 0 and a["stack"] == 0
    assert rows["32+16"]["smem"] <= 48 * 1024 < rows["64"]["smem"]


def test_elementwise_kernels_use_only_16_byte_accesses(compiled):
    # geglu at F = 1280 and add_layer_norm at C = 320 (5/8 of its 512 lanes used) and 1280: every access to the
    # activations a 16-byte v4 (the narrower ones left are layer_norm's weight, bias and s_bias vectors), no spills.
    (g,) = compiled["geglu"]
    assert _widths(g["ld"])[1:] == (0, 0) and _widths(g["st"])[1:] == (0, 0) and g["stack"] == 0
    for r in compiled["layer_norm"]:
        assert _widths(r["ld"])[0] >= 4 and _widths(r["st"])[1:] == (0, 0) and r["stack"] == 0
