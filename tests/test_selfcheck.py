"""``sea selfcheck`` (:mod:`sea_model.bench.selfcheck`) on tiny inputs: every op with every backend available
here, errors against the reference, one table."""

from __future__ import annotations

import pytest
import torch

from sea_kernels import available_backends
from sea_model.bench import op_cases as cases
from sea_model.bench import selfcheck


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(cases.LABELS_SIZES, "tiny", dict(b=1, p=16, q=64, d=16))
    monkeypatch.setitem(cases.LOSS_SIZES, "tiny", dict(n=24, dim=8))
    monkeypatch.setitem(selfcheck.SIZES, "tiny", ("tiny", "tiny"))


def test_every_op_and_backend_runs_and_matches_the_reference(tiny):
    rows = selfcheck.run("cpu", torch.float32, "tiny")
    want = [
        (op, b)
        for op, name in selfcheck.OPS.items()
        for b in ("reference", "cpu", "triton")
        if b in available_backends(name, "cpu")
    ]
    assert [(r.op.split()[0], r.backend) for r in rows] == [
        ({"topk": "cosine_topk", "labels": "patch_labels", "loss": "contrastive_loss"}[op], b) for op, b in want
    ]
    for r in rows:
        assert r.ms > 0 and r.dtype == "float32"
        if r.op == "patch_labels":
            assert r.error == "100.0% pairs equal"
        else:
            assert float(r.error.split()[0]) < 1e-5, r
    table = selfcheck.format_table(rows).splitlines()
    assert table[0] == "| op | backend | dtype | max error vs reference | time (ms) |" and len(table) == len(rows) + 2
