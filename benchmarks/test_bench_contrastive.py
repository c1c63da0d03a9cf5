"""Benchmarks of contrastive_loss (forward + backward) on CPU: reference (eager, the baseline) vs
the cpu backend (C++ extension) and its blocked PyTorch fallback.

pytest-benchmark, one group per size (float32; N from 1k to 8k at D = 512, and D = 4096 at smaller
N); every case also records the extra peak RSS of one call (``benchmarks._peak``, a fresh process)
and a summary with the ratios to the reference is printed at the end::

    .venv/bin/pytest benchmarks/test_bench_contrastive.py --benchmark-only [-k 8k]

``SEA_BENCH_LARGE=1`` adds N = 16k (the reference needs ~4.5 GB). A steadier report for a shared
machine (the backends interleaved round by round, min and median)::

    .venv/bin/python -m benchmarks.test_bench_contrastive [--sizes 1k,8k] [--rounds 5] [--no-peak]

Times are never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from functools import lru_cache

import pytest

from benchmarks.cases_contrastive import (
    CONTRASTIVE_BACKENDS,
    CONTRASTIVE_LARGE_SIZES,
    CONTRASTIVE_SIZES,
    contrastive_fn,
    contrastive_inputs,
)

CASE = "benchmarks.cases_contrastive:contrastive_case"
MB = 2**20
SIZES = {**CONTRASTIVE_SIZES, **(CONTRASTIVE_LARGE_SIZES if os.environ.get("SEA_BENCH_LARGE") == "1" else {})}


@lru_cache(maxsize=1)
def _inputs(size: str):
    return contrastive_inputs(*SIZES[size])


def _warm_fn(backend: str):
    fn = contrastive_fn(backend)
    fn(*contrastive_inputs(64, 16))  # imports, extension build/load
    return fn


def _peak_mb(size: str, backend: str) -> float:
    """``extra_peak_bytes`` of the case, called from a small intermediate Python process.

    ``ru_maxrss`` survives fork + exec on Linux: a measuring child starts with its parent's peak RSS,
    so a parent that holds large tensors (this benchmark process) would hide the call's peak.
    """
    n, dim = SIZES[size]
    kwargs = dict(backend=backend, n=n, dim=dim)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import json, sys; from benchmarks._peak import extra_peak_bytes; "
        "print(extra_peak_bytes(sys.argv[1], json.loads(sys.argv[2])))"
    )
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", code, CASE, json.dumps(kwargs)], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1]) / MB


# ----------------------------------------------------------------------------- pytest-benchmark

_SUMMARY: dict[str, dict[str, tuple[float, float]]] = {}


@pytest.fixture(scope="module")
def summary(request):
    yield _SUMMARY
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or not _SUMMARY:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        _write_summary(tr)


def _write_summary(tr) -> None:
    tr.write_line("")
    tr.write_line(
        f"contrastive_loss summary (load average {os.getloadavg()[0]:.2f}): median time of forward + backward "
        "/ reference, extra peak RSS (/ reference)"
    )
    for size, row in _SUMMARY.items():
        ref_t, ref_peak = row.get("reference", (None, None))
        parts = []
        for backend in CONTRASTIVE_BACKENDS:
            if backend not in row:
                continue
            t, peak = row[backend]
            ratio = f"{t / ref_t:.3f}x" if ref_t else "-"
            peak_ratio = f" ({peak / ref_peak:.3f}x)" if ref_peak else ""
            parts.append(f"{backend}: {t * 1e3:.0f} ms ({ratio}), +{peak:.1f} MB{peak_ratio}")
        tr.write_line(f"  {size:9s} " + " | ".join(parts))


@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS)
@pytest.mark.parametrize("size", list(SIZES))
def test_contrastive(benchmark, summary, size, backend):
    n, dim = SIZES[size]
    inputs = _inputs(size)
    fn = _warm_fn(backend)
    benchmark.group = f"contrastive_loss fwd+bwd {size}: N={n} D={dim} fp32"
    benchmark.extra_info.update(backend=backend, n=n, dim=dim, dtype="float32")
    if n * n * dim >= 2**33:  # the big ones: a few rounds
        benchmark.pedantic(fn, args=inputs, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(fn, args=inputs, rounds=5, iterations=1, warmup_rounds=1)
    peak = _peak_mb(size, backend)
    benchmark.extra_info["extra_peak_MB"] = round(peak, 2)
    _SUMMARY.setdefault(size, {})[backend] = (benchmark.stats.stats.median, peak)


# ----------------------------------------------------------------------------- interleaved report


def report(sizes, rounds: int, peak: bool) -> None:
    import torch

    print(f"threads {torch.get_num_threads()}, load average at start {os.getloadavg()}")
    fns = {backend: _warm_fn(backend) for backend in CONTRASTIVE_BACKENDS}
    for size in sizes:
        n, dim = SIZES[size]
        inputs = _inputs(size)
        for fn in fns.values():
            fn(*inputs)
        times = {backend: [] for backend in fns}
        for r in range(rounds):
            order = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
            for backend in order:
                t0 = time.perf_counter()
                fns[backend](*inputs)
                times[backend].append(time.perf_counter() - t0)
        ref_min, ref_med = min(times["reference"]), statistics.median(times["reference"])
        ref_peak = _peak_mb(size, "reference") if peak else None
        print(f"contrastive_loss fwd+bwd {size} (N={n} D={dim} fp32), load average {os.getloadavg()[0]:.2f}:")
        for backend, ts in times.items():
            line = (
                f"  {backend:13s} min {min(ts) * 1e3:8.1f} ms ({min(ts) / ref_min:.3f}x ref)"
                f"  median {statistics.median(ts) * 1e3:8.1f} ms ({statistics.median(ts) / ref_med:.3f}x ref)"
            )
            if peak:
                p = ref_peak if backend == "reference" else _peak_mb(size, backend)
                line += f"  extra peak RSS {p:7.1f} MB ({p / ref_peak:.3f}x ref)"
            print(line, flush=True)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-peak", action="store_true")
    args = parser.parse_args()
    report(args.sizes.split(","), args.rounds, not args.no_peak)
