"""``sea bench``: time and peak memory of every op and backend against the reference, and the
cost of SEA in a Stage-1 training step.

* :mod:`sea_model.bench.cases`: the cases (sizes, backends, builders), shared with the
  pytest-benchmark suites in ``benchmarks/``.
* :mod:`sea_model.bench.stage1`: the Stage-1 training step (SEA off / reference / fused).
* :mod:`sea_model.bench.memory`: extra peak memory of one call (a fresh process on CPU).
* :mod:`sea_model.bench.runner`: the timing loop and :func:`run` (what ``sea bench`` calls).
* :mod:`sea_model.bench.report`: environment, table, JSON and plots.
"""

from .runner import run

__all__ = ["run"]
