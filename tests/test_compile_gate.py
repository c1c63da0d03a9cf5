"""Compile gate (CPU, no GPU): the Triton kernels compile for sm_90 and sm_80, spill no registers and
fit shared memory, in the configs the package launches.

CI runs the representative subset of ``sea_kernels.triton.aot.cases()`` (every kernel, bf16 and fp32,
each labels config at its largest ``K_PAD`` and the float32 one at ``K_PAD`` 4, the fixed configs and
the first tuned one of each list, the bf16 gradient GEMM's fixed config in each of its modes; 49
compiles (45 before those modes: about 5.5 minutes from a cold Triton cache on 2 cores shared with
other jobs, load average above 8, 20-35 s from a warm one). The full matrix (every
config, dtype, ``K_PAD`` and window) is ``python -m sea_kernels.triton.aot --full`` or
``benchmarks/compile_report.py``.
The kernels are compiled in subprocesses without ``TRITON_INTERPRET`` (interpreted kernels cannot
be compiled), with the ptxas that ships with triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton ships no ptxas here")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "aot.json"
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "sea_kernels.triton.aot", "--jobs", jobs, "--json", str(out), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    return proc, (json.loads(out.read_text()) if out.exists() else {})


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_sm80_without_spills(tmp_path):
    from sea_kernels.triton import aot

    proc, report = _aot(tmp_path)
    assert report, f"aot wrote no report:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    results = report["results"]
    bad = [f"sm_{r['arch']} {r['case']}: {'; '.join(aot.problems(r))}" for r in results if aot.problems(r)]
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stdout[-2000:]
    archs = {(r["case"].split("[")[0], r["arch"]) for r in results}
    for kernel in ("labels", "contrastive.fwd", "contrastive.probs", "contrastive.gemm"):
        assert {(kernel, 90), (kernel, 80)} <= archs, kernel
    hopper = [r for r in results if r["arch"] == 90 and r["case"].startswith("labels") and ",bf16," in r["case"]]
    assert any("HGMMA" in r["sass"]["all"] for r in hopper), "no wgmma in the bf16 labels kernel on sm_90"


def test_problems_flags_spills_and_shared_memory():
    """The gate's rule can fail: spills, too much shared memory and compile errors are reported."""
    from sea_kernels.triton import aot

    ok = dict(ok=True, spill_stores=0, spill_loads=0, local=0, shared=1024, static_shared=0, shared_limit=232448)
    assert aot.problems(ok) == []
    assert aot.problems({**ok, "spill_stores": 8})
    assert aot.problems({**ok, "shared": 240000})
    assert aot.problems(dict(ok=False, error="ptxas failed"))


def test_sass_loops_finds_nested_loops():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;
.L_x_1:
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/                   SEL R4, R5, R6, P0 ;
        /*0050*/               @P1 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""
    loops = aot_sass(sass)
    assert [(lp["start"], lp["end"]) for lp in loops["loops"]] == [(0x20, 0x30), (0x10, 0x50)]
    assert loops["loops"][0]["ops"] == {"HGMMA": 1, "BRA": 1}
    assert loops["loops"][1]["ops"] == {"ISETP": 1, "SEL": 1, "BRA": 1}
    assert loops["all"]["MOV"] == 1 and loops["all"]["EXIT"] == 1


def aot_sass(text):
    from sea_kernels.triton import aot

    return aot.sass_loops(text)
