"""contrastive_loss: the reference against an independent float64 computation and gradcheck, and the
contract tests of every available backend against the reference (``tests._checks``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sea_kernels import contrastive_loss
from tests._checks import DEVICE, backends_here, check_contrastive, loss_and_grads, pairs


def loss64(x: torch.Tensor, t: torch.Tensor, scale: float) -> float:
    xn = x.double().numpy()
    tn = t.double().numpy()
    xn = xn / np.maximum(np.linalg.norm(xn, axis=1, keepdims=True), 1e-12)
    tn = tn / np.maximum(np.linalg.norm(tn, axis=1, keepdims=True), 1e-12)
    logits = scale * xn @ tn.T

    def ce(m):
        mx = m.max(axis=1, keepdims=True)
        lse = (mx + np.log(np.exp(m - mx).sum(axis=1, keepdims=True)))[:, 0]
        return float(np.mean(lse - np.diag(m)))

    return 0.5 * (ce(logits) + ce(logits.T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,dim,scale", [(1, 5, 1.0), (13, 7, 0.5), (37, 64, 100.0), (50, 3, 14.3)])
def test_loss_matches_float64(dtype, n, dim, scale):
    g = torch.Generator().manual_seed(n * 1000 + dim)
    x = torch.randn(n, dim, generator=g).to(dtype)
    t = torch.randn(n, dim, generator=g).to(dtype)
    got = contrastive_loss(x, t, scale, backend="reference")
    assert got.dim() == 0 and got.dtype == torch.float32
    want = loss64(x, t, scale)
    assert abs(got.item() - want) <= 1e-5 * max(1.0, abs(want)) * (scale if scale > 1 else 1)


def test_loss_is_zero_dim_and_symmetric():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    a = contrastive_loss(x, t, 3.0, backend="reference")
    b = contrastive_loss(t, x, 3.0, backend="reference")
    torch.testing.assert_close(a, b)
    assert contrastive_loss(x, x, 100.0).item() < 1e-3  # perfectly aligned pairs
    dup = torch.randn(1, 4, generator=g).expand(6, 4)
    torch.testing.assert_close(contrastive_loss(dup, dup, 5.0), torch.tensor(math.log(6.0)))


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: contrastive_loss(a, b, s, backend="reference"), (x, t, scale))


def test_scale_gradient_and_types():
    x, t = torch.randn(5, 3), torch.randn(5, 3)
    log_scale = torch.tensor(1.0, requires_grad=True)
    contrastive_loss(x, t, log_scale.exp()).backward()
    assert log_scale.grad is not None and torch.isfinite(log_scale.grad)
    assert contrastive_loss(x.double(), t.double(), 2).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(4, 3), t=torch.randn(4, 2), scale=1.0), ValueError, "same shape"),
        (dict(x=torch.randn(4, 3), t=torch.randn(5, 3), scale=1.0), ValueError, "same shape"),
        (dict(x=torch.randn(4), t=torch.randn(4), scale=1.0), ValueError, "x must have 2 dimensions"),
        (dict(x=torch.randn(0, 3), t=torch.randn(0, 3), scale=1.0), ValueError, "at least one row"),
        (dict(x=torch.randn(4, 3), t=torch.randn(4, 3), scale=0.0), ValueError, "scale must be positive"),
        (dict(x=torch.randn(4, 3), t=torch.randn(4, 3), scale=-1.0), ValueError, "scale must be positive"),
        (dict(x=torch.randn(4, 3), t=torch.randn(4, 3), scale=float("inf")), ValueError, "scale"),
        (dict(x=torch.randn(4, 3), t=torch.randn(4, 3), scale=torch.ones(1)), ValueError, "0-d"),
        (dict(x=torch.randn(4, 3), t=torch.randn(4, 3), scale="1"), TypeError, "scale"),
        (dict(x=torch.randn(4, 3), t=torch.randn(4, 3), scale=True), TypeError, "scale"),
        (dict(x=torch.randint(0, 3, (4, 3)), t=torch.randn(4, 3), scale=1.0), TypeError, "x must be float"),
        (dict(x=[[1.0]], t=torch.randn(1, 1), scale=1.0), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.tensor([[float("nan"), 1.0]]), t=torch.randn(1, 2), scale=1.0), ValueError, "x must be finite"),
        (
            dict(x=torch.randn(2, 2), t=torch.tensor([[1.0, float("inf")]] * 2), scale=1.0),
            ValueError,
            "t must be finite",
        ),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        contrastive_loss(**kwargs)


def test_validate_false_skips_finiteness_and_backend_errors():
    x = torch.tensor([[float("nan"), 1.0]])
    assert torch.isnan(contrastive_loss(x, x, 1.0, validate=False))
    with pytest.raises(ValueError, match="backend"):
        contrastive_loss(torch.randn(2, 2), torch.randn(2, 2), 1.0, backend="cuda")
    with pytest.raises(TypeError, match="backend"):
        contrastive_loss(torch.randn(2, 2), torch.randn(2, 2), 1.0, backend=None)


# ----------------------------------------------------------------------------- contract: every backend


CASES = {
    # name: (n, d, scale, align, duplicates)
    "ragged": (37, 40, 14.3, 0.0, False),  # N, D not multiples of any tile
    "single_row": (1, 5, 1.0, 0.0, False),  # loss 0, zero gradients
    "below_tile": (5, 8, 0.5, 0.0, False),  # N < every block size, small scale
    "scale_100": (50, 33, 100.0, 0.0, False),  # logits in [-100, 100]: the online max must hold
    "duplicates": (30, 24, 100.0, 0.0, True),  # tied rows and columns, large scale
    "aligned": (96, 48, 30.0, 1.0, False),  # t_i correlated with x_i, as in training
}


def skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the interpreter's tl.dot has no bfloat16 (test_triton_contrastive patches it)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", backends_here("contrastive_loss"))
def test_contract(backend, case, dtype):
    skip_unsupported(backend, dtype)
    n, d, scale, align, dup = CASES[case]
    x, t = pairs(n, d, dtype, seed=n * 7 + d, align=align, duplicates=dup)
    fast = check_contrastive(x, t, scale, backend, grad_out=3.0)
    if n == 1:
        assert fast[0].item() == 0.0 and not fast[1].any() and not fast[2].any() and fast[3].item() == 0.0


@pytest.mark.parametrize("backend", backends_here("contrastive_loss"))
@pytest.mark.parametrize("need", ["xt", "t", "s", "xs"])
def test_contract_partial_gradients_and_float_scale(backend, need):
    """Only some inputs require grad; "xt": a Python float scale (no scale gradient), unit grad_out."""
    x, t = pairs(21, 12, seed=2)
    check_contrastive(x, t, 3.0, backend, grad_out=-0.5 if need != "xt" else 1.0, need=need)


@pytest.mark.parametrize("backend", backends_here("contrastive_loss"))
def test_contract_zero_and_tiny_rows(backend):
    """Norms below F.normalize's eps: the clamp path (no projection), as the reference."""
    x, t = pairs(19, 10, seed=4)
    x[0] = 0.0
    x[5] *= 1e-14
    t[3] *= 1e-14
    check_contrastive(x, t, 5.0, backend)


@pytest.mark.parametrize("backend", backends_here("contrastive_loss"))
def test_contract_mixed_dtypes_and_strided_input(backend):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(12, 17, generator=g).to(torch.float16).T  # (17, 12), not contiguous
    t = torch.randn(17, 12, generator=g)
    fast = check_contrastive(x, t, 4.0, backend)
    assert fast[1].dtype == torch.float16 and fast[2].dtype == torch.float32


@pytest.mark.parametrize("backend", backends_here("contrastive_loss"))
def test_contract_deterministic(backend):
    """Repeated calls agree bitwise (sums in an order fixed by the blocks, not by thread timing)."""
    x, t = pairs(64, 24, seed=12, align=1.0)
    first = loss_and_grads(x, t, 30.0, backend)
    for _ in range(2):
        for p, q in zip(first, loss_and_grads(x, t, 30.0, backend)):
            assert torch.equal(p, q)
