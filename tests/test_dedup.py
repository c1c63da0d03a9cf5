"""dedup_labels and word_embeddings against plain loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sea_kernels import dedup_labels, word_embeddings


@pytest.mark.parametrize("n,distinct", [(0, 1), (1, 1), (17, 4), (200, 150), (64, 1)])
def test_dedup_keeps_smallest_priority_per_label(n, distinct):
    g = torch.Generator().manual_seed(n + distinct)
    labels = torch.randint(0, distinct, (n,), generator=g)
    valid = torch.rand(n, generator=g) > 0.3
    priority = torch.rand(n, generator=g)
    keep = dedup_labels(labels, valid=valid, priority=priority)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    want = torch.zeros(n, dtype=torch.bool)
    best = {}
    for i in range(n):
        if valid[i] and (labels[i].item() not in best or priority[i] < priority[best[labels[i].item()]]):
            best[labels[i].item()] = i
    for i in best.values():
        want[i] = True
    assert torch.equal(keep, want)


def test_dedup_ties_and_defaults():
    labels = torch.tensor([5, 5, 2, 5, 2, -1])
    keep = dedup_labels(labels, priority=torch.zeros(6))
    assert keep.tolist() == [True, False, True, False, False, True]  # equal priority: first index
    # Random priorities: exactly one per label, deterministic given the generator.
    a = dedup_labels(labels, generator=torch.Generator().manual_seed(0))
    b = dedup_labels(labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and int(a.sum()) == 3
    assert sorted(labels[a].tolist()) == [-1, 2, 5]
    none_valid = dedup_labels(labels, valid=torch.zeros(6, dtype=torch.bool))
    assert not none_valid.any()


def test_dedup_rejects_bad_input():
    with pytest.raises(TypeError, match="labels"):
        dedup_labels(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="labels"):
        dedup_labels(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="valid"):
        dedup_labels(torch.tensor([1, 2]), valid=torch.tensor([True]))
    with pytest.raises(TypeError, match="valid"):
        dedup_labels(torch.tensor([1, 2]), valid=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="priority"):
        dedup_labels(torch.tensor([1, 2]), priority=torch.rand(3))
    with pytest.raises(ValueError, match="priority"):
        dedup_labels(torch.tensor([1, 2]), priority=torch.tensor([0.0, float("nan")]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_word_embeddings_is_the_mean_of_token_rows(dtype):
    g = torch.Generator().manual_seed(1)
    q, length, vocab_size, dim = 11, 4, 37, 13
    token_ids = torch.randint(0, vocab_size, (q, length), generator=g)
    lengths = torch.randint(1, length + 1, (q,), generator=g)
    token_ids[torch.arange(length)[None, :] >= lengths[:, None]] = -1
    weight = torch.randn(vocab_size, dim, generator=g).to(dtype).requires_grad_()
    labels = torch.tensor([3, 0, 10, 3, 7])
    out = word_embeddings(labels, token_ids, weight)
    assert out.shape == (5, dim) and out.dtype == dtype
    for row, lab in enumerate(labels.tolist()):
        ids = [i for i in token_ids[lab].tolist() if i != -1]
        want = weight.detach().double()[ids].mean(0)
        tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
        torch.testing.assert_close(out[row].double(), want, atol=tol, rtol=tol)
    out.float().sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_word_embeddings_custom_pad_and_errors():
    weight = torch.randn(6, 3)
    token_ids = torch.tensor([[1, 2, 0], [4, 0, 0]])
    out = word_embeddings(torch.tensor([0, 1]), token_ids, weight, pad_id=0)
    torch.testing.assert_close(out, torch.stack([weight[[1, 2]].mean(0), weight[4]]))
    with pytest.raises(ValueError, match="labels"):
        word_embeddings(torch.tensor([2]), token_ids, weight, pad_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        word_embeddings(torch.tensor([0]), torch.tensor([[-1, -1]]), weight)
    with pytest.raises(ValueError, match="token_ids"):
        word_embeddings(torch.tensor([0]), torch.tensor([[7, -1]]), weight)
    with pytest.raises(TypeError, match="token_ids"):
        word_embeddings(torch.tensor([0]), torch.tensor([[1.0]]), weight)
    with pytest.raises(ValueError, match="weight"):
        word_embeddings(torch.tensor([0]), token_ids, torch.randn(6))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 6), st.booleans(), st.floats(0, 1, allow_nan=False)), max_size=40))
def test_dedup_properties(entries):
    """Kept entries are valid, their labels distinct, and every valid label is kept once at its best priority."""
    labels = torch.tensor([e[0] for e in entries], dtype=torch.int64)
    valid = torch.tensor([e[1] for e in entries], dtype=torch.bool)
    priority = torch.tensor([e[2] for e in entries], dtype=torch.float64)
    keep = dedup_labels(labels, valid=valid, priority=priority)
    kept = labels[keep].tolist()
    assert not (keep & ~valid).any()
    assert len(kept) == len(set(kept)) == len(set(labels[valid].tolist()))
    for i in keep.nonzero().flatten().tolist():
        rivals = (labels == labels[i]) & valid
        assert priority[i] == priority[rivals].min()
        assert i == int(((priority == priority[i]) & rivals).nonzero()[0])  # ties: the first index
