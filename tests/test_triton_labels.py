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
