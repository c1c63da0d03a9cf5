"""The test harness's machine-independent float32 products (``tests/_exact_dots.py``) are in effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests._checks import DEVICE
from tests._exact_dots import exact_matmuls, exact_product


def cancelling(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` whose rows sum to 2 only when no partial sum is rounded (2**24 + 1 is not a float32), ``b`` ones."""
    a = torch.zeros(n, n)
    a[:, :4] = torch.tensor([2.0**24, 1.0, -(2.0**24), 1.0])
    return a, torch.ones(n, n)


def test_exact_product():
    a, b = cancelling()
    assert (exact_product(a.numpy(), b.numpy(), np.zeros((16, 16), np.float32)) == 2.0).all()
    with exact_matmuls():
        assert (a @ b == 2.0).all()
        assert (torch.addmm(torch.ones(16, 16), a, b, beta=0.5) == 2.5).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's dots (a GPU computes its own)")
def test_interpreter_dots_are_exact():
    """tests/conftest.py installs the exact float32 ``tl.dot`` for every interpreted kernel."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        idx = offs[:, None] * N + offs[None, :]
        c = tl.dot(tl.load(a_ptr + idx), tl.load(b_ptr + idx), input_precision="ieee")
        tl.store(c_ptr + idx, c)

    a, b = cancelling()
    c = torch.empty(16, 16)
    dot_kernel[(1,)](a, b, c, N=16)
    assert (c == 2.0).all()
