"""``sea bench``: the op microbenchmarks (:mod:`sea_kernels.bench`) and the cost of SEA in a
Stage-1 training step, on one timing engine.

* :mod:`sea_model.bench.stage1`: the Stage-1 training step (SEA off / reference / fused).
* :mod:`sea_model.bench.cases`: that step as a family of cases for the engine.
"""

from __future__ import annotations

from sea_kernels.bench import runner
from sea_kernels.bench.cases import OP_CASES

from .cases import STAGE1_CASES

# op -> its family of cases: what ``sea bench`` and ``benchmarks/`` measure.
CASE_SETS = {**{op: OP_CASES for op in OP_CASES.ops}, "stage1": STAGE1_CASES}
OPS = tuple(CASE_SETS)


def run(ops=None, sizes="quick", device: str = "cpu", out="sea-bench", **kwargs) -> dict:
    """:func:`sea_kernels.bench.runner.run` over the ops and the Stage-1 step (what ``sea bench`` calls)."""
    return runner.run(ops, sizes, device, out, case_sets=CASE_SETS, **kwargs)


__all__ = ["run", "CASE_SETS", "OPS"]
