"""Benchmarks of the ops: one set of cases, one timing engine, one report.

* :mod:`sea_kernels.bench.cases`: the op cases (sizes, backends, builders) and :class:`CaseSet`, what
  the engine needs of a family of cases (``sea_model.bench`` adds the Stage-1 training step).
* :mod:`sea_kernels.bench.runner`: the timing engine and :func:`run` (behind ``sea bench``;
  ``sea selfcheck`` times with :func:`~sea_kernels.bench.runner.time_calls`).
* :mod:`sea_kernels.bench.memory`: extra peak memory of one call (a fresh process on CPU).
* :mod:`sea_kernels.bench.report`: environment, the table formatter, JSON and plots
  (``python -m sea_kernels.bench.report BENCH_JSON`` redraws a table and its plots).

``benchmarks/`` holds the pytest-benchmark wrapper over the same cases, the GPU script and the
results.
"""
