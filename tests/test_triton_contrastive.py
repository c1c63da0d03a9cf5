"""contrastive_loss, backend="triton": what only the Triton backend has (interpreter on CPU, or a GPU).

The contract tests against the reference, for every backend, are in ``test_contrastive.py`` (the
harness in ``_checks.py``). Here: forced chunking and column splits, float64 (runs the reference),
scale 0 (``validate=False``), and bfloat16 on CPU, where the interpreter's tl.dot has none: those
tests patch the interpreter to compute bfloat16 with IEEE float32 accumulation
(``tests/_gpu_dots.py``), in each mode of the gradient GEMMs (``BF16_GRAD_MODES``). The tensor cores'
own rounding, and the promotion of the logits it needs: ``test_tensor_cores.py``.
"""

from __future__ import annotations

import pytest
import torch

from sea_kernels import contrastive_loss
from tests import _gpu_dots as gpu_dots
from tests._checks import (
    DEVICE,
    assert_as_accurate_as_reference,
    backends_here,
    check_contrastive,
    loss_and_grads,
    pairs,
)

pytestmark = pytest.mark.skipif(
    "triton" not in backends_here("contrastive_loss"),
    reason="triton backend unavailable (no triton, or CPU without TRITON_INTERPRET=1)",
)


@pytest.fixture
def three_chunks(monkeypatch):
    """Backward chunks of the backend's own largest row block (``_MAX_BM``: 32 under the interpreter, 128 on
    a GPU) over ``n = 2 * _MAX_BM + 6`` rows: three chunks, the last one partial. Returns ``n`` and the
    first rows of the chunks the triton backend computed (to check after the call)."""
    from sea_kernels.triton import contrastive as tc

    bm = tc._MAX_BM
    monkeypatch.setattr(tc, "BWD_CHUNK_BUDGET", (2 * bm + 6) * bm)
    monkeypatch.setattr(tc, "BWD_MIN_ROWS", bm)
    starts, probs = [], tc._probs
    monkeypatch.setattr(tc, "_probs", lambda *a: starts.append(a[7]) or probs(*a))
    return 2 * bm + 6, starts


def test_several_chunks_and_splits(three_chunks, monkeypatch):
    """Forward chunks of one row block, 3 column splits and three backward chunks (dT accumulated), at the
    block sizes of the device that runs them: within the rule, and the same results as one chunk."""
    from sea_kernels.triton import contrastive as tc

    n, starts = three_chunks
    bm = tc._MAX_BM
    x, t = pairs(n, 20, seed=3)
    chunked = check_contrastive(x, t, 20.0, "triton", grad_out=3.0)
    assert starts == [0, bm, 2 * bm], starts
    monkeypatch.setattr(tc, "BWD_CHUNK_BUDGET", 1 << 26)
    monkeypatch.setattr(tc, "FWD_PARTIAL_BUDGET", n)
    monkeypatch.setattr(tc, "FWD_SPLITS", 3)
    starts.clear()
    split = check_contrastive(x, t, 20.0, "triton", grad_out=3.0)
    assert starts == [0], starts
    for a, b in zip(chunked, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_float64_runs_the_reference():
    x, t = pairs(9, 6, torch.float64, seed=7)
    got = contrastive_loss(x.to(DEVICE), t.to(DEVICE), 2.0, backend="triton")
    want = contrastive_loss(x.to(DEVICE), t.to(DEVICE), 2.0, backend="reference")
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_dscale_finite_at_scale_zero():
    """With ``validate=False`` scale 0 gets through (a learnable temperature may reach it): every logit
    is 0, ``P = 1 / N``, and dscale = ``c * sum(H * cos)`` is finite and as accurate as the reference's
    (its analytic value: ``(mean_ij cos_ij - mean_i cos_ii) * grad``); dx and dt are 0."""
    x, t = pairs(37, 40, seed=2)
    kw = dict(grad_out=3.0, validate=False)
    fast = loss_and_grads(x, t, 0.0, "triton", **kw)
    ref = loss_and_grads(x, t, 0.0, "reference", **kw)
    truth = loss_and_grads(x, t, 0.0, "reference", cast=torch.float64, **kw)
    assert all(torch.isfinite(v).all() for v in fast), fast[3]
    assert fast[1].abs().max() == 0 and fast[2].abs().max() == 0
    cos = torch.nn.functional.normalize(x.double(), dim=-1) @ torch.nn.functional.normalize(t.double(), dim=-1).T
    analytic = 3.0 * (cos.mean() - cos.diagonal().mean())
    torch.testing.assert_close(truth[3].cpu(), analytic, rtol=1e-12, atol=1e-15)
    for what, i in (("loss", 0), ("dscale", 3)):
        assert_as_accurate_as_reference(fast[i].cpu(), ref[i].cpu(), truth[i].cpu(), scale=1.0, what=what)


@pytest.fixture
def bfloat16_dots():
    """On CPU, the interpreter computes bfloat16 dots and casts as the GPU does (``tests/_gpu_dots.py``);
    skips if its internals moved."""
    with gpu_dots.or_skip(gpu_dots.bfloat16_dots()):
        yield


@pytest.fixture
def bf16_modes(monkeypatch):
    """Set ``BF16_GRAD_MODES`` for one test: ``bf16_modes(("bf16", "bf16"))``."""
    from sea_kernels.triton import contrastive as tc

    return lambda modes: monkeypatch.setattr(tc, "BF16_GRAD_MODES", modes)


BF16_CASES = {"ragged": (37, 40, 14.3, False), "duplicates": (30, 24, 100.0, True)}


@pytest.mark.parametrize("mode", ["f16x1", "bf16x2", "bf16"])
@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bfloat16(case, mode, bfloat16_dots, bf16_modes):
    """The bfloat16 backward in each mode of the gradient GEMMs, on the GPU's arithmetic."""
    n, d, scale, dup = BF16_CASES[case]
    bf16_modes((mode, mode))
    x, t = pairs(n, d, torch.bfloat16, seed=n * 7 + d, duplicates=dup)
    check_contrastive(x, t, scale, "triton", grad_out=3.0)


def test_bfloat16_chunks_and_row_norms(bfloat16_dots, three_chunks):
    """The default mode (float16 copies with a scale per row, a scale per chunk) in three chunks, with rows
    whose norms spread over 1e-6 .. 1e6, a zero row and one below the norm's eps."""
    n, starts = three_chunks
    x, t = pairs(n, 20, torch.bfloat16, seed=9, align=1.0)
    g = torch.Generator().manual_seed(9)
    x = (x.float() * torch.pow(10.0, torch.rand(n, 1, generator=g) * 12 - 6)).bfloat16()
    t = (t.float() * torch.pow(10.0, torch.rand(n, 1, generator=g) * 12 - 6)).bfloat16()
    x[40], t[3] = 0.0, t[3] * 1e-14
    check_contrastive(x, t, 30.0, "triton", grad_out=3.0)
    assert len(starts) == 3, starts


@pytest.mark.parametrize("gemm", ["dx", "dt"])
@pytest.mark.parametrize("mode", ["bf16x2", "bf16", "f16x1"])
def test_bfloat16_gemm_modes(gemm, mode, bfloat16_dots, monkeypatch):
    """Each bfloat16 mode of a gradient GEMM against a float64 model of what it computes, in both
    orientations (dx: ``a`` the chunk of ``H``, its diagonal at column ``r0 + i``; dt: ``a = H^T``, its
    diagonal at row ``r0 + k``), on a chunk whose largest entry is small (the float16 mode's scale):
    hi + lo is ``a`` to about 16 bits; one product is ``a`` rounded to bfloat16 (float16) except the
    diagonal entries, exact. Without the correction the diagonal is off."""
    from sea_kernels.triton import contrastive as tc

    g = torch.Generator().manual_seed(5)
    rows, n, d, r0 = 20, 45, 24, 16
    h = torch.randn(rows, n, generator=g) * 1e-9
    h[torch.arange(rows), r0 + torch.arange(rows)] = (-1.7 + 0.1 * torch.rand(rows, generator=g)) * 1e-6
    v = torch.randn(rows if gemm == "dt" else n, d, generator=g).to(torch.bfloat16)
    inv_norm = torch.rand(v.shape[0], generator=g) + 0.5
    op = tc._Operand(v.to(DEVICE), inv_norm.to(DEVICE), mode)
    if gemm == "dx":  # U = (H * q) @ t
        a, strides, m, k, off, op = h, (h.stride(0), 1), rows, n, r0, op.rows(0, n, h.abs().max())
    else:  # V = (H * r)^T @ x[r0:r1] (here x has just the chunk's rows)
        a, strides, m, k, off, op = h.T, (1, h.stride(0)), n, rows, -r0, op.rows(0, rows, h.abs().max())
    scaled = a * op.kv.cpu()  # float32, as the kernel computes it
    rounded = scaled.to(op.b.dtype).float() if mode != "bf16x2" else scaled
    diag = torch.arange(m)[:, None] + off == torch.arange(k)[None, :]
    b = op.b.cpu().double() * op.c_scale.cpu().double()
    want = torch.where(diag, scaled, rounded).double() @ b
    tol = 1e-5 * want.abs().max().item()  # float32 accumulation, not bfloat16 (~4e-3) or float16 (~5e-4) rounding

    def run(exact_diagonal=True):
        monkeypatch.setattr(tc, "BF16_EXACT_DIAGONAL", exact_diagonal)
        c = torch.empty(m, d, device=DEVICE)
        tc._gemm(h.to(DEVICE), *strides, op, c, m, k, off, False, False)
        return c.cpu().double()

    assert (run() - want).abs().max().item() <= tol
    if mode != "bf16x2":
        plain = run(exact_diagonal=False)
        assert (plain - want).abs().max().item() > 10 * tol
        torch.testing.assert_close(plain, rounded.double() @ b, rtol=0, atol=tol)


def test_bfloat16_default_is_one_float16_product(bfloat16_dots, bf16_modes):
    """The default bfloat16 backward is one float16 product per gradient GEMM (the fastest mode within
    the rule in every case of the error study, benchmarks/results/2026-11-30-loss-bf16-precision): its
    gradients equal that mode's bitwise and differ from the hi + lo split's."""
    x, t = pairs(37, 40, torch.bfloat16, seed=11)
    default = loss_and_grads(x, t, 14.3, "triton")
    bf16_modes(("f16x1", "f16x1"))
    one = loss_and_grads(x, t, 14.3, "triton")
    bf16_modes(("bf16x2", "bf16x2"))
    split = loss_and_grads(x, t, 14.3, "triton")
    for what, p, q, r in zip(("loss", "dx", "dt", "dscale"), default, one, split):
        assert torch.equal(p, q), what
        assert torch.equal(p, r) == (what in ("loss", "dscale")), what
