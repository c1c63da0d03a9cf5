"""pytest-benchmark suites of the same cases as ``sea bench`` (:data:`sea_model.bench.CASE_SETS`), on CPU.

One group per op and size (``topk``, ``labels``, ``loss``, ``stage1``), every backend in it: the
reference (eager PyTorch; for ``stage1``, the training step with SEA off) is the baseline the
summary at the end compares with. Each case also records the extra peak RSS of one call, measured
in a fresh process (:func:`sea_model.bench.memory.extra_peak_bytes`)::

    pytest benchmarks/ --benchmark-only                   # the quick sizes
    pytest benchmarks/ --benchmark-only -k "labels"       # one op
    SEA_BENCH_SIZES=full pytest benchmarks/ --benchmark-only   # the paper's shapes (opt-in, long)
    SEA_BENCH_MEMORY=0 ...                                # no peak-memory subprocesses

``sea bench`` runs the same cases with the backends interleaved round by round (steadier on a
shared machine) and writes JSON, a table and plots. Times are never asserted.
"""

from __future__ import annotations

import os
import time

import pytest

from sea_model.bench import CASE_SETS
from sea_model.bench.memory import extra_peak_bytes

MODE = os.environ.get("SEA_BENCH_SIZES", "quick")
MEMORY = os.environ.get("SEA_BENCH_MEMORY", "1") not in ("", "0")
SLOW_CALL_S = 0.1  # slower calls: a fixed 5 rounds instead of pytest-benchmark's calibration

CASES = [
    pytest.param(op, size, backend, id=f"{op}-{size}-{backend}")
    for op, cases in CASE_SETS.items()
    for size in cases.size_names(op, "cpu", MODE)
    for backend in cases.backends(op, "cpu")
]


@pytest.mark.parametrize("op,size,backend", CASES)
def test_bench(benchmark, bench_rows, op, size, backend):
    cases = CASE_SETS[op]
    params = cases.size_params(op, size, "cpu")
    fn, inputs = cases.build(op, backend, "cpu", **params)
    shape = cases.describe(op, params)
    baseline = backend == cases.backends(op, "cpu")[0]
    benchmark.group = f"{op} {size}: {shape}"
    benchmark.extra_info.update(op=op, size=size, backend=backend, baseline=baseline, **params)
    t0 = time.perf_counter()
    fn(*inputs)  # full-size warm-up
    if time.perf_counter() - t0 > SLOW_CALL_S:
        benchmark.pedantic(fn, args=inputs, rounds=5, iterations=1, warmup_rounds=0)
    else:
        benchmark(fn, *inputs)
    if benchmark.stats is None:  # --benchmark-disable
        return
    peak = None
    if MEMORY:
        peak = extra_peak_bytes(cases.builder, {"op": op, "backend": backend, "device": "cpu", **params})
        benchmark.extra_info["extra_peak_bytes"] = peak
    st = benchmark.stats.stats
    bench_rows.append(
        {
            "op": op,
            "size": size,
            "shape": shape,
            "backend": backend,
            "baseline": baseline,
            "median_s": st.median,
            "iqr_s": st.iqr,
            "runs": st.rounds,
            "extra_peak_bytes": peak,
        }
    )
