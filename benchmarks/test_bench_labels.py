"""Benchmarks of cosine_topk / patch_labels on CPU: reference (eager normalize + matmul + topk, the
baseline) vs the cpu backend (C++ extension) and its chunked PyTorch fallback.

pytest-benchmark, one group per op and size; every case also records the extra peak RSS of one call
(``benchmarks._peak``, patch_labels only: cosine_topk does the same work) and a summary with the
ratios to the reference is printed at the end::

    .venv/bin/pytest benchmarks/test_bench_labels.py --benchmark-only [-k full]

A steadier report for a shared machine (the backends interleaved round by round, min and median)::

    .venv/bin/python -m benchmarks.test_bench_labels [--sizes small,medium,full] [--rounds 7] [--no-peak] [--threads 1]

(process CPU time is reported too: with --threads 1 it is the least load-sensitive comparison.)

Times are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import lru_cache

import pytest

from benchmarks.cases import LABELS_BACKENDS, LABELS_OPS, LABELS_SIZES, labels_fn, labels_inputs

CASE = "benchmarks.cases:labels_case"
MB = 2**20


@lru_cache(maxsize=1)
def _inputs(size: str):
    return labels_inputs(*LABELS_SIZES[size])


def _warm_fn(op: str, backend: str):
    fn = labels_fn(op, backend)
    fn(*labels_inputs(1, 16, 64, 32))  # imports, extension build/load
    return fn


def _peak_mb(op: str, size: str, backend: str) -> float:
    """``extra_peak_bytes`` of the case, called from a small intermediate Python process.

    ``ru_maxrss`` survives fork + exec on Linux: a measuring child starts with its parent's peak RSS,
    so a parent that holds large tensors (this benchmark process) would hide the call's peak (0 MB).
    """
    b, p, q, d = LABELS_SIZES[size]
    kwargs = dict(backend=backend, b=b, p=p, q=q, d=d, op=op)
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

_SUMMARY: dict[tuple[str, str], dict[str, tuple[float, float | None]]] = {}


@pytest.fixture(scope="module")
def summary(request):
    yield _SUMMARY
    if not _SUMMARY:
        return
    lines = ["", f"labels summary (load average {os.getloadavg()[0]:.2f}): median time (ratio to reference), extra peak RSS"]
    for (op, size), row in sorted(_SUMMARY.items()):
        ref = row.get("reference", (None, None))[0]
        parts = []
        for backend in LABELS_BACKENDS:
            if backend not in row:
                continue
            t, peak = row[backend]
            ratio = f"{t / ref:.3f}x ref" if ref else "-"
            parts.append(f"{backend}: {t * 1e3:.1f} ms ({ratio})" + (f", +{peak:.1f} MB" if peak is not None else ""))
        lines.append(f"  {op:12s} {size:6s} " + " | ".join(parts))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n".join(lines), flush=True)


@pytest.mark.parametrize("backend", LABELS_BACKENDS)
@pytest.mark.parametrize("op", LABELS_OPS)
@pytest.mark.parametrize("size", list(LABELS_SIZES))
def test_labels(benchmark, summary, size, op, backend):
    b, p, q, d = LABELS_SIZES[size]
    inputs = _inputs(size)
    fn = _warm_fn(op, backend)
    benchmark.group = f"{op} {size}: b={b} p={p} q={q} d={d} fp32 k=10"
    benchmark.extra_info.update(op=op, backend=backend, b=b, p=p, q=q, d=d, k=10, dtype="float32")
    if size == "full":
        benchmark.pedantic(fn, args=inputs, rounds=5, iterations=1, warmup_rounds=1)
    else:
        benchmark(fn, *inputs)
    peak = None
    if op == "patch_labels":
        peak = _peak_mb(op, size, backend)
        benchmark.extra_info["extra_peak_MB"] = round(peak, 2)
    summary[(op, size)] = {**summary.get((op, size), {}), backend: (benchmark.stats.stats.median, peak)}


# ----------------------------------------------------------------------------- interleaved report


def report(sizes, rounds: int, peak: bool, ops=("patch_labels",), threads: int | None = None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    print(f"threads {torch.get_num_threads()}, load average at start {os.getloadavg()}")
    for size in sizes:
        b, p, q, d = LABELS_SIZES[size]
        inputs = _inputs(size)
        for op in ops:
            fns = {backend: _warm_fn(op, backend) for backend in LABELS_BACKENDS}
            for fn in fns.values():
                fn(*inputs)
            times = {backend: [] for backend in fns}
            cpu = {backend: [] for backend in fns}
            for r in range(rounds):
                order = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
                for backend in order:
                    c0, t0 = time.process_time(), time.perf_counter()
                    fns[backend](*inputs)
                    times[backend].append(time.perf_counter() - t0)
                    cpu[backend].append(time.process_time() - c0)
            ref_min, ref_med = min(times["reference"]), statistics.median(times["reference"])
            ref_cpu = min(cpu["reference"])
            print(f"{op} {size} (b={b} p={p} q={q} d={d} fp32, k=10):")
            for backend, ts in times.items():
                line = (
                    f"  {backend:13s} min {min(ts) * 1e3:8.1f} ms ({min(ts) / ref_min:.3f}x ref)"
                    f"  median {statistics.median(ts) * 1e3:8.1f} ms ({statistics.median(ts) / ref_med:.3f}x ref)"
                    f"  cpu time min {min(cpu[backend]) * 1e3:8.1f} ms ({min(cpu[backend]) / ref_cpu:.3f}x ref)"
                )
                if peak:
                    line += f"  extra peak RSS {_peak_mb(op, size, backend):7.1f} MB"
                print(line, flush=True)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,medium,full")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", default="patch_labels")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the timings (peak: default)")
    parser.add_argument("--no-peak", action="store_true")
    args = parser.parse_args()
    report(args.sizes.split(","), args.rounds, not args.no_peak, tuple(args.ops.split(",")), args.threads)
