"""contrastive_loss, backend="triton": what only the Triton backend has (interpreter on CPU, or a GPU).

The contract tests against the reference, for every backend, are in ``test_contrastive.py`` (the
harness in ``_checks.py``). Here: forced chunking and column splits, float64 (runs the reference),
and bfloat16 on CPU, where the interpreter's tl.dot has none: one test patches the interpreter to
compute as the GPU does (see ``bfloat16_dots``).
"""

from __future__ import annotations

import pytest
import torch

from sea_kernels import contrastive_loss
from tests._checks import DEVICE, backends_here, check_contrastive, pairs

pytestmark = pytest.mark.skipif(
    "triton" not in backends_here("contrastive_loss"),
    reason="triton backend unavailable (no triton, or CPU without TRITON_INTERPRET=1)",
)


def test_several_chunks_and_splits(monkeypatch):
    """Force 16-row forward chunks, 3 column splits and 32-row backward chunks (dT accumulated)."""
    from sea_kernels.triton import contrastive as tc

    x, t = pairs(70, 20, seed=3)
    whole = check_contrastive(x, t, 20.0, "triton", grad_out=3.0)
    monkeypatch.setattr(tc, "FWD_PARTIAL_BUDGET", 70)
    monkeypatch.setattr(tc, "FWD_SPLITS", 3)
    monkeypatch.setattr(tc, "BWD_CHUNK_BUDGET", 70 * 32)
    monkeypatch.setattr(tc, "BWD_MIN_ROWS", 32)
    chunked = check_contrastive(x, t, 20.0, "triton", grad_out=3.0)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_float64_runs_the_reference():
    x, t = pairs(9, 6, torch.float64, seed=7)
    got = contrastive_loss(x.to(DEVICE), t.to(DEVICE), 2.0, backend="triton")
    want = contrastive_loss(x.to(DEVICE), t.to(DEVICE), 2.0, backend="reference")
    assert got.dtype == torch.float64 and torch.equal(got, want)


@pytest.fixture
def bfloat16_dots(monkeypatch):
    """On CPU, let the interpreter do what the GPU does with bfloat16: dots with exact products in
    float32 (the interpreter multiplies the raw uint16 storage) and float32 -> bfloat16 casts rounded
    to nearest even (the interpreter truncates). Skips if its internals moved."""
    if DEVICE == "cuda":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or not all(hasattr(builder, m) for m in ("create_dot", "cast_impl")):
        pytest.skip("the Triton interpreter's internals changed")
    dot, cast = builder.create_dot, builder.cast_impl

    def as_f32(h):
        return (h.data.astype(np.uint32) << 16).view(np.float32) if h.dtype.scalar == tl.bfloat16 else h.data

    def create_dot(self, a, b, d, *args):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return dot(self, a, b, d, *args)
        return handle(np.matmul(as_f32(a), as_f32(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return handle(data.numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)


@pytest.mark.parametrize("case", ["ragged", "duplicates"])
def test_bfloat16(case, bfloat16_dots):
    """The bfloat16 path (hi + lo split of the gradient products) on the GPU's arithmetic."""
    n, d, scale, dup = {"ragged": (37, 40, 14.3, False), "duplicates": (30, 24, 100.0, True)}[case]
    x, t = pairs(n, d, torch.bfloat16, seed=n * 7 + d, duplicates=dup)
    check_contrastive(x, t, scale, "triton", grad_out=3.0)
