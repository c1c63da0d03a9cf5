"""Triton ``cosine_topk`` / ``patch_labels`` details (interpreter on CPU, or a GPU).

The contract tests against the reference, for every backend, are in ``test_labels.py`` (the checks
in ``_checks.py``); this file keeps what only the Triton backend has.
"""

from __future__ import annotations

import pytest
import torch

import sea_kernels
from sea_kernels.triton import labels as triton_labels
from tests._checks import DEVICE, backends_here, check_topk

pytestmark = pytest.mark.skipif(
    "triton" not in backends_here("cosine_topk"),
    reason="triton backend unavailable (no triton, or CPU without TRITON_INTERPRET=1)",
)


def test_cosine_topk_large_k_fallback():
    """``k`` past the registers of the kernel (``MAX_K_PAD``): the bounded-memory chunked path."""
    k = 200
    assert k > triton_labels.MAX_K_PAD
    g = torch.Generator().manual_seed(2)
    patches = torch.randn(9, 16, generator=g).to(DEVICE)
    vocab = torch.randn(300, 16, generator=g).to(DEVICE)
    fast = sea_kernels.cosine_topk(patches, vocab, k, backend="triton")
    ref = sea_kernels.cosine_topk(patches, vocab, k, backend="reference")
    check_topk(fast, ref, patches, vocab, k, False)


def test_nan_scores_rank_first_like_torch_topk():
    """validate=False with NaN input: NaN scores come first (torch.topk's order), every index inside the
    vocabulary; the same on a GPU, whose float maximum drops NaN, as in the interpreter, which keeps it."""
    g = torch.Generator().manual_seed(9)
    patches = torch.randn(20, 24, generator=g)
    vocab = torch.randn(200, 24, generator=g)
    vocab[37, 3] = float("nan")  # column 37 is NaN for every patch
    patches[4, 0] = float("nan")  # row 4 is NaN everywhere
    for k in (1, 6):
        got = sea_kernels.cosine_topk(
            patches.to(DEVICE), vocab.to(DEVICE), k, negate=True, backend="triton", validate=False
        )
        ref = sea_kernels.cosine_topk(patches, vocab, k, negate=True, backend="reference", validate=False)
        values, indices = got.values.cpu(), got.indices.cpu()
        rows = torch.arange(20) != 4
        assert (indices[rows, 0] == 37).all() and values[rows, 0].isnan().all()
        assert torch.equal(indices[rows, 1:], ref.indices[rows, 1:])
        assert values[4].isnan().all() and indices[4].unique().numel() == k
        assert ((indices >= 0) & (indices < 200)).all()
