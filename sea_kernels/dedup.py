"""Label bookkeeping between labeling and the loss: batch-level deduplication and Eq. 8 embeddings."""

from __future__ import annotations

import torch

from .validation import check_finite, check_int_tensor, check_same_device, check_tensor


def dedup_labels(labels, *, valid=None, priority=None, generator=None) -> torch.Tensor:
    """Keep exactly one entry per distinct label among the valid entries.

    ``labels`` int64 ``(N,)``; ``valid`` bool ``(N,)`` (all valid when ``None``); ``priority``
    float ``(N,)``, drawn uniformly from ``generator`` when ``None``. Of the valid entries sharing
    a label, the one with the smallest priority is kept (ties go to the smaller index).
    Returns a bool mask ``(N,)``; invalid entries are never kept.
    """
    check_int_tensor("labels", labels, 1)
    n = labels.shape[0]
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=labels.device)
    elif not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor or None; got {getattr(valid, 'dtype', type(valid).__name__)}")
    elif tuple(valid.shape) != (n,):
        raise ValueError(f"valid must have the shape of labels, ({n},); got {tuple(valid.shape)}")
    if priority is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        priority = torch.rand(n, generator=generator, device=labels.device)
    else:
        check_tensor("priority", priority, ndim=1)
        if priority.shape[0] != n:
            raise ValueError(f"priority must have the shape of labels, ({n},); got {tuple(priority.shape)}")
        check_finite("priority", priority)
    check_same_device(labels=labels, valid=valid, priority=priority)

    return dedup_mask(labels, valid, priority)


def dedup_mask(labels: torch.Tensor, valid: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """:func:`dedup_labels` without validation, on fixed shapes (no host sync, traceable)."""
    # Stable sorts: by priority (ties keep index order), then by label with the invalid entries
    # last (keeps priority order); the first of each run of equal labels is kept.
    order = torch.argsort(priority, stable=True)
    key = torch.where(valid, labels, torch.iinfo(torch.int64).max)[order]
    by_label = torch.argsort(key, stable=True)
    order, key = order[by_label], key[by_label]
    first = torch.cat([torch.ones_like(key[:1], dtype=torch.bool), key[1:] != key[:-1]]) & valid[order]
    return torch.zeros_like(valid).scatter(0, order, first)


def word_embeddings(labels, token_ids, weight, *, pad_id=-1) -> torch.Tensor:
    """Eq. 8: each label's embedding is the mean of the LLM input-embedding rows of its tokens.

    ``labels`` int64 ``(N,)`` in ``[0, q)``; ``token_ids`` int64 ``(q, L)`` padded with ``pad_id``,
    at least one token per word; ``weight`` ``(V, D)``, or an FSDP2-sharded parameter (a
    ``DTensor``: gathered, see :func:`full_table`). Returns ``(N, D)`` in ``weight``'s dtype
    (accumulated in float32), differentiable with respect to ``weight``.
    """
    check_int_tensor("labels", labels, 1)
    check_int_tensor("token_ids", token_ids, 2)
    check_tensor("weight", weight, ndim=2)
    check_same_device(labels=labels, token_ids=token_ids, weight=weight)
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise TypeError(f"pad_id must be an int; got {type(pad_id).__name__}")
    q, vocab_size = token_ids.shape[0], weight.shape[0]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= q):
        raise ValueError(
            f"labels must lie in [0, q) = [0, {q}); got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    check_token_ids(token_ids[labels], vocab_size, pad_id)
    weight = full_table(weight)
    return mean_embeddings(labels, token_ids, weight, pad_id)


def check_token_ids(ids: torch.Tensor, vocab_size: int, pad_id: int = -1) -> None:
    """Every row of ``ids`` ``(n, L)`` has a token, and every token lies in ``[0, vocab_size)`` (syncs)."""
    present = ids != pad_id
    if ids.numel() and not bool(present.any(-1).all()):
        raise ValueError(f"token_ids: every word must have at least one token that is not pad_id = {pad_id}")
    if bool(present.any()):
        used = ids[present]
        if int(used.min()) < 0 or int(used.max()) >= vocab_size:
            raise ValueError(
                f"token_ids must lie in [0, V) = [0, {vocab_size}) except for pad_id; "
                f"got values in [{int(used.min())}, {int(used.max())}]"
            )


def full_table(weight: torch.Tensor) -> torch.Tensor:
    """The whole embedding table from a sharded one (an FSDP2 ``DTensor`` parameter), else ``weight``.

    The gather is differentiable: its backward averages each rank's gradient into that rank's
    shard (``Partial("avg")``), as FSDP does for the gradients of its forward.
    """
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(weight, DTensor):
        return weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
    return weight


def mean_embeddings(labels, token_ids, weight, pad_id: int = -1) -> torch.Tensor:
    """:func:`word_embeddings` without validation (no host sync, traceable)."""
    ids = token_ids[labels]  # (N, L)
    present = ids != pad_id
    acc = torch.promote_types(weight.dtype, torch.float32)
    rows = weight[torch.where(present, ids, torch.zeros_like(ids))].to(acc)  # (N, L, D)
    total = (rows * present[..., None]).sum(1)
    return (total / present.sum(1, keepdim=True).clamp(min=1)).to(weight.dtype)
