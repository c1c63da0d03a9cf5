"""``sea bench`` and ``sea selfcheck``: the op microbenchmarks and the cost of SEA in a Stage-1 training
step, on one timing engine. Tools, not part of ``sea_kernels``: they time its ops from outside.

* :mod:`sea_model.bench.runner`: the timing engine and :func:`~sea_model.bench.runner.run`.
* :mod:`sea_model.bench.op_cases`: the op cases (sizes, backends, builders) and
  :class:`~sea_model.bench.op_cases.CaseSet`, what the engine needs of a family of cases.
* :mod:`sea_model.bench.stage1_cases`: the Stage-1 training step (:mod:`sea_model.bench.stage1`:
  SEA off / reference / fused) as a second family.
* :mod:`sea_model.bench.memory`: extra peak memory of one call (a fresh process on CPU).
* :mod:`sea_model.bench.report`: environment, the table formatter, JSON and plots
  (``python -m sea_model.bench.report BENCH_JSON`` redraws a table and its plots).
* :mod:`sea_model.bench.selfcheck`: every op with every backend available here, on the op cases'
  inputs, error against the reference and time (``sea selfcheck``).

``benchmarks/`` holds the pytest-benchmark wrapper over the same cases, the GPU script and the results.
"""

from __future__ import annotations

from .op_cases import OP_CASES
from .stage1_cases import STAGE1_CASES

# op -> its family of cases: what ``sea bench`` and ``benchmarks/`` measure.
CASE_SETS = {**{op: OP_CASES for op in OP_CASES.ops}, "stage1": STAGE1_CASES}
OPS = tuple(CASE_SETS)


def run(ops=None, sizes="quick", device: str = "cpu", out="sea-bench", **kwargs) -> dict:
    """:func:`sea_model.bench.runner.run` over the ops and the Stage-1 step (what ``sea bench`` calls).

    Arguments: ``ops`` (default: all of :data:`OPS`), ``sizes``, ``device``, ``out`` and the keyword
    arguments of :func:`~sea_model.bench.runner.run`. Returns the result dict it writes to ``OUT/bench.json``.
    """
    from . import runner  # not at import: ``python -m sea_model.bench.report`` runs a module runner imports

    return runner.run(ops, sizes, device, out, case_sets=CASE_SETS, **kwargs)


__all__ = ["run", "CASE_SETS", "OPS"]
