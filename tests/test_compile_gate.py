"""Compile gate (CPU, no GPU): the Triton kernels compile for sm_90 and sm_80, spill no registers and
fit shared memory, in the configs the package launches; the loss's logits kernels keep their promoted
16-bit dots (each from a zero accumulator, not folded back into one long accumulator) and, on D and
strides that are multiples of 16, load their bfloat16 tiles 16 bytes at a time.

CI runs the representative subset of ``sea_kernels.triton.aot.cases()`` (every kernel, bf16 and fp32,
each labels config at its largest ``K_PAD`` and the float32 one at ``K_PAD`` 4, the fixed configs and
the first tuned one of each list, the bf16 gradient GEMM's fixed config in each of its modes, the
logits kernels' fixed configs also on any D (the generic kernels specialize D and the strides); 57
compiles (45 before those modes and variants: about 5.5 minutes from a cold Triton cache on 2 cores
shared with other jobs, load average above 8, 20-35 s from a warm one). The full matrix (every
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
    _assert_promoted_and_vector_loads(results)


def _assert_promoted_and_vector_loads(results: list[dict]) -> None:
    """The 16-bit logits kernels (forward, probs): every dot starts from a zero accumulator or continues
    one that did (a ``BK`` chunk split along k), never a loop-carried one (the promotion's
    round-to-nearest add was not folded back into the dot), and, on sm_90 with D and strides
    that are multiples of 16, the bfloat16 tiles load by ``cp.async`` 16 bytes at a time, never one
    element (``ld.global.b16``); on any D they may (so the check can tell)."""
    logits = [r for r in results if r["case"].startswith(("contrastive.fwd[", "contrastive.probs["))]
    single = [r for r in logits if "[fp32," in r["case"]]
    half = [r for r in logits if r not in single and ",promote=False" not in r["case"]]
    assert {r["arch"] for r in half} == {90, 80}, "no 16-bit logits kernel compiled"
    for r in half:
        ok = "zero" in r["dot_acc"] and set(r["dot_acc"]) <= {"zero", "dot"}
        assert ok, f"sm_{r['arch']} {r['case']}: dot accumulators {r['dot_acc']}"
    for r in single:
        assert "carried" in r["dot_acc"], f"float32 operands need no promotion: {r['case']} {r['dot_acc']}"
    fixed = [r for r in half if r["arch"] == 90 and "[bf16," in r["case"] and ",fixed" in r["case"]]
    assert len(fixed) == 4, [r["case"] for r in fixed]  # forward and probs, on aligned and on any D
    for r in fixed:
        if ",unaligned" in r["case"]:
            assert r["ld_global_16"] > 0, f"{r['case']}: the unaligned kernel loads 16 bytes?"
        else:
            assert r["ld_global_16"] == 0 and r["cp_async_16"] > 0, f"{r['case']}: {r['ld_global_16']} b16 loads"


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


def test_ir_facts_reads_loads_and_dot_accumulators():
    from sea_kernels.triton import aot

    ttgir = """
    %cst_9 = arith.constant dense<0.000000e+00> : tensor<128x64xf32, #mma> loc(#loc1)
    %cst_1 = arith.constant dense<1.000000e+00> : tensor<128x64xf32, #mma> loc(#loc1)
      %acc = ttng.warp_group_dot %a_1, %b_2, %cst_9 {inputPrecision = 0 : i32} : !a * !b -> tensor<128x64xf32>
      %acc_2 = ttng.warp_group_dot %a_1, %b_2, %arg22 {inputPrecision = 0 : i32} : !a * !b -> tensor<128x64xf32>
      %t:2 = scf.for %k0 = %c0_i32 to %D step %c16_i32 iter_args(%acc_3 = %cst_4, %xp = %xp_47) -> (tensor<16x64xf32>)
      %f = tt.dot %a_1, %b_2, %acc_3 : tensor<16x16xf32> * tensor<16x64xf32> -> tensor<16x64xf32>
      %d = tt.dot %a_1, %b_2, %cst_1, inputPrecision = tf32 : tensor<16x16xbf16> * tensor<16x64xbf16> -> tensor
      %e = tt.dot %a_1, %b_2, %acc, inputPrecision = tf32 : tensor<16x16xbf16> * tensor<16x64xbf16> -> tensor
"""
    ptx = """
	@%p5 ld.global.b16 { %rs1 }, [ %rd60 + 0 ];
	ld.global.b32 { %r1 }, [ %rd61 + 0 ];
	cp.async.cg.shared.global [ %r154 + 0 ], [ %rd34 + 0 ], 0x10, %r155;
	cp.async.ca.shared.global [ %r156 + 0 ], [ %rd35 + 0 ], 0x8, %r157;
	cp.async.commit_group;
"""
    facts = aot.ir_facts(ttgir, ptx)
    dots = ["zero", "carried", "carried", "other", "dot"]
    assert facts == dict(ld_global_16=1, cp_async=2, cp_async_16=1, dot_acc=dots)


def aot_sass(text):
    from sea_kernels.triton import aot

    return aot.sass_loops(text)
