"""contrastive_loss, backend="triton" (CPU: the Triton interpreter), against the reference backend.

Loss and the gradients of x, t and scale must be as accurate as the reference, measured against the
reference run on float64 copies: error <= 2 x the reference's error + a floor of a few float32 ulps
of the largest true value (scalars returned in float32 cannot be closer than their own rounding).
float32 and float16 throughout; bfloat16 (the interpreter's tl.dot has none) in one test that
patches the interpreter to compute as the GPU does (see ``bfloat16_dots``).
"""

from __future__ import annotations

import pytest
import torch

from sea_kernels import available_backends, contrastive_loss
from tests._checks import assert_as_accurate_as_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in available_backends("contrastive_loss", DEVICE),
    reason="triton backend unavailable (no triton, or CPU without TRITON_INTERPRET=1)",
)

ULPS = 2.0**-22  # floor: 2 float32 ulps of the largest true value


def _inputs(n, d, dtype, seed, duplicates=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    t = torch.randn(n, d, generator=g)
    if duplicates:
        x[1::3] = x[0]  # several x rows equal (ties in every column)
        t[2::3] = t[0]
        x[n - 1], t[n - 1] = x[0], t[0]  # an exact duplicate pair
    return x.to(dtype), t.to(dtype)


def _run(x, t, scale, backend, grad_out, cast=None):
    """Loss and gradients (None where no grad was asked) of ``grad_out * loss``."""
    x = (x.to(cast) if cast else x).detach().to(DEVICE).requires_grad_(x.requires_grad)
    t = (t.to(cast) if cast else t).detach().to(DEVICE).requires_grad_(t.requires_grad)
    if isinstance(scale, torch.Tensor):
        scale = (scale.to(cast) if cast else scale).detach().to(DEVICE).requires_grad_(scale.requires_grad)
    loss = contrastive_loss(x, t, scale, backend=backend)
    (loss * grad_out).backward()
    grads = [v.grad if isinstance(v, torch.Tensor) and v.requires_grad else None for v in (x, t, scale)]
    return [loss.detach()] + grads


def _check(x, t, scale, grad_out=3.0):
    fast = _run(x, t, scale, "triton", grad_out)
    ref = _run(x, t, scale, "reference", grad_out)
    truth = _run(x, t, scale, "reference", grad_out, cast=torch.float64)
    assert fast[0].dtype == torch.float32 and fast[0].dim() == 0
    for what, f, r, w in zip(("loss", "dx", "dt", "dscale"), fast, ref, truth):
        assert (f is None) == (w is None), what
        if w is None:
            continue
        assert f.dtype == r.dtype and f.shape == r.shape, what
        assert torch.isfinite(f).all(), what
        floor = ULPS * w.abs().max().item() + 1e-30
        assert_as_accurate_as_reference(f.cpu(), r.cpu(), w.cpu(), floor=floor, what=what)
    return fast


CASES = {
    # name: (n, d, scale, duplicates)
    "ragged": (37, 40, 14.3, False),  # N, D not multiples of any tile
    "single_row": (1, 5, 1.0, False),  # loss 0, zero gradients
    "below_tile": (5, 8, 0.5, False),  # N < every block size, small scale
    "scale_100": (50, 33, 100.0, False),  # logits in [-100, 100]: the online max must hold
    "duplicates": (30, 24, 100.0, True),  # tied rows and columns, large scale
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    n, d, scale, dup = CASES[case]
    x, t = _inputs(n, d, dtype, seed=n * 7 + d, duplicates=dup)
    x.requires_grad_()
    t.requires_grad_()
    fast = _check(x, t, torch.tensor(scale, requires_grad=True), grad_out=3.0)
    if n == 1:
        assert fast[0].item() == 0.0 and not fast[1].any() and not fast[2].any() and fast[3].item() == 0.0


def test_python_float_scale_and_unit_grad():
    x, t = _inputs(23, 16, torch.float32, seed=1)
    x.requires_grad_()
    t.requires_grad_()
    _check(x, t, 7.0, grad_out=1.0)


@pytest.mark.parametrize("need", ["t", "scale", "x_scale"])
def test_partial_requires_grad(need):
    x, t = _inputs(21, 12, torch.float32, seed=2)
    x.requires_grad_("x" in need)
    t.requires_grad_(need == "t")
    _check(x, t, torch.tensor(3.0, requires_grad="scale" in need), grad_out=-0.5)


def test_several_chunks_and_splits(monkeypatch):
    """Force 16-row forward chunks, 3 column splits and 32-row backward chunks (dT accumulated)."""
    from sea_kernels.triton import contrastive as tc

    x, t = _inputs(70, 20, torch.float32, seed=3)
    x.requires_grad_()
    t.requires_grad_()
    scale = torch.tensor(20.0, requires_grad=True)
    whole = _check(x, t, scale)
    monkeypatch.setattr(tc, "FWD_PARTIAL_BUDGET", 70)
    monkeypatch.setattr(tc, "FWD_SPLITS", 3)
    monkeypatch.setattr(tc, "BWD_CHUNK_BUDGET", 70 * 32)
    monkeypatch.setattr(tc, "BWD_MIN_ROWS", 32)
    chunked = _check(x, t, scale)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_zero_and_tiny_rows():
    """Norms below F.normalize's eps: the clamp path (no projection), as the reference."""
    x, t = _inputs(19, 10, torch.float32, seed=4)
    x[0] = 0.0
    x[5] *= 1e-14
    t[3] *= 1e-14
    x.requires_grad_()
    t.requires_grad_()
    _check(x, t, torch.tensor(5.0, requires_grad=True))


def test_deterministic():
    x, t = _inputs(40, 16, torch.float32, seed=5)
    x.requires_grad_()
    t.requires_grad_()
    a = _run(x, t, torch.tensor(9.0, requires_grad=True), "triton", 1.0)
    b = _run(x, t, torch.tensor(9.0, requires_grad=True), "triton", 1.0)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_mixed_dtypes_and_strided_input():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(12, 17, generator=g).to(torch.float16).T  # (17, 12), not contiguous
    t = torch.randn(17, 12, generator=g)
    x.requires_grad_()
    t.requires_grad_()
    fast = _check(x, t, torch.tensor(4.0, requires_grad=True))
    assert fast[1].dtype == torch.float16 and fast[2].dtype == torch.float32


def test_float64_runs_the_reference():
    x, t = _inputs(9, 6, torch.float64, seed=7)
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
    n, d, scale, dup = CASES[case]
    x, t = _inputs(n, d, torch.bfloat16, seed=n * 7 + d, duplicates=dup)
    x.requires_grad_()
    t.requires_grad_()
    _check(x, t, torch.tensor(scale, requires_grad=True), grad_out=3.0)
