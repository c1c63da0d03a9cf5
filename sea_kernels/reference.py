"""The definitions: the ops' result types and their eager PyTorch reference implementations.

Every backend (``triton``, ``cpu``) reproduces these functions on the same canonical inputs (validated
by the op fronts ``labels``, ``contrastive``) and returns these types. This module imports no op front,
no dispatcher and no backend, so that any of them can import it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._common import compute_dtype


class TopK(NamedTuple):
    """What ``cosine_topk`` returns: float32 ``values`` sorted descending and their int64 vocabulary ``indices``."""

    values: torch.Tensor
    indices: torch.Tensor


class PatchLabels(NamedTuple):
    """What ``patch_labels`` returns, each ``(B, n_windows)``: the chosen ``patch`` (int64), its ``label``
    (int64), the label's ``score`` (float32) and ``valid`` (bool; invalid windows hold -1, -1, 0)."""

    patch: torch.Tensor
    label: torch.Tensor
    score: torch.Tensor
    valid: torch.Tensor


# ----------------------------------------------------------------------------- windows


def num_windows(grid: tuple[int, int], window: int) -> int:
    """The number of ``window x window`` tiles of the ``(H, W)`` grid, partial ones at the edges included."""
    h, w = grid
    return -(-h // window) * -(-w // window)


def window_patches(grid: tuple[int, int], window: int, device=None) -> torch.Tensor:
    """``(n_windows, window * window)`` patch indices of each window in row-major order, -1 past the grid."""
    h, w = grid
    wy = torch.arange(-(-h // window), device=device)
    wx = torch.arange(-(-w // window), device=device)
    oy = torch.arange(window, device=device)
    y = wy[:, None] * window + oy[None, :]  # (n_wy, window)
    x = wx[:, None] * window + oy[None, :]  # (n_wx, window)
    yy = y[:, None, :, None].expand(-1, len(wx), -1, window)
    xx = x[None, :, None, :].expand(len(wy), -1, window, -1)
    idx = torch.where((yy < h) & (xx < w), yy * w + xx, torch.full_like(yy, -1))
    return idx.reshape(len(wy) * len(wx), window * window)


def sample_windows(
    values: torch.Tensor,
    indices: torch.Tensor,
    grid: tuple[int, int],
    window: int,
    uniforms: torch.Tensor,
) -> PatchLabels:
    """The window sampling of ``patch_labels`` (Eq. 7, vectorized) from each patch's sorted top scores.

    Arguments: ``values`` float ``(B, P, n)`` sorted descending and ``indices`` int64 ``(B, P, n)``
    (:func:`cosine_topk_reference` of every patch), ``grid`` ``(H, W)`` with ``H * W == P``, ``window``,
    ``uniforms`` float32 ``(B, n_windows, 2)`` in ``[0, 1)``.
    Returns :class:`PatchLabels`, each ``(B, n_windows)`` (the contract of ``sea_kernels.patch_labels``).
    """
    batch = values.shape[0]
    cand = values > 0  # sorted descending, so candidates are a prefix
    eligible = cand[..., 0]  # (B, P)
    slots = window_patches(grid, window, values.device)  # (nw, w*w)
    in_grid = slots >= 0
    slot_eligible = eligible[:, slots.clamp(min=0)] & in_grid  # (B, nw, w*w)
    count = slot_eligible.sum(-1)  # (B, nw)
    valid = count > 0
    rank = torch.minimum((uniforms[..., 0] * count).floor().long(), count - 1)  # (B, nw)
    chosen = (slot_eligible & (slot_eligible.cumsum(-1) == (rank + 1)[..., None])).int().argmax(-1)
    patch = slots[torch.arange(slots.shape[0], device=values.device), chosen]  # (B, nw)
    patch = patch.clamp(min=0)

    rows = torch.arange(batch, device=values.device)[:, None]
    s = torch.where(cand[rows, patch], values[rows, patch], 0.0)  # (B, nw, n), zeros past the candidates
    cum = s.cumsum(-1)
    cdf = cum / cum[..., -1:]
    hit = (uniforms[..., 1:2] < cdf) & (s > 0)
    last = cand[rows, patch].sum(-1) - 1
    j = torch.where(hit.any(-1), hit.int().argmax(-1), last).clamp(min=0)
    label = indices[rows, patch].gather(-1, j[..., None]).squeeze(-1)
    score = s.gather(-1, j[..., None]).squeeze(-1)

    minus_one = torch.full_like(patch, -1)
    return PatchLabels(
        torch.where(valid, patch, minus_one),
        torch.where(valid, label, minus_one),
        torch.where(valid, score, torch.zeros_like(score)).float(),
        valid,
    )


# ----------------------------------------------------------------------------- labels


def cosine_topk_reference(patches: torch.Tensor, vocab: torch.Tensor, k: int, negate: bool) -> TopK:
    """The definition of ``cosine_topk`` on canonical inputs.

    Arguments: ``patches`` ``(M, d)``, ``vocab`` ``(q, d)``, any float dtype; ``k`` in ``1..q``; ``negate``.
    Returns :class:`TopK`, each ``(M, k)``: the ``k`` largest cosines (``-cos`` when ``negate``) as
    float32, sorted descending, computed in float32 (float64 for float64 patches), and their indices.
    """
    dtype = compute_dtype(patches.dtype)
    scores = F.normalize(patches.to(dtype), dim=-1) @ F.normalize(vocab.to(dtype), dim=-1).T
    if negate:
        scores = -scores
    values, indices = scores.topk(k, dim=-1, sorted=True)
    return TopK(values.float(), indices)


def patch_labels_reference(patches, vocab, grid, top_n, window, negate, uniforms) -> PatchLabels:
    """The definition of ``patch_labels`` on canonical inputs: :func:`cosine_topk_reference` of every patch,
    then :func:`sample_windows`.

    Arguments: ``patches`` ``(B, P, d)``, ``vocab`` ``(q, d)``, ``grid`` ``(H, W)``, ``top_n``, ``window``,
    ``negate``, ``uniforms`` float32 ``(B, n_windows, 2)``. Returns :class:`PatchLabels`.
    """
    values, indices = cosine_topk_reference(patches, vocab, top_n, negate)
    return sample_windows(values, indices, grid, window, uniforms)


# ----------------------------------------------------------------------------- loss


def contrastive_loss_reference(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The definition of ``contrastive_loss`` (Eq. 9) on canonical inputs.

    Arguments: ``x``, ``t`` ``(N, D)`` with ``N >= 1``; ``scale`` a 0-d tensor in the accumulation dtype
    (it may require grad). Returns the 0-d loss ``0.5 * (CE(l, arange(N)) + CE(l^T, arange(N)))`` with
    ``l_ij = scale * cos(x_i, t_j)``, in ``scale``'s dtype, differentiable with respect to all three.
    """
    dtype = scale.dtype
    logits = scale * (F.normalize(x.to(dtype), dim=-1) @ F.normalize(t.to(dtype), dim=-1).T)
    target = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def masked_contrastive_loss_reference(x, t, keep, scale) -> torch.Tensor:
    """:func:`contrastive_loss_reference` over the rows where ``keep`` is True, on fixed shapes.

    Arguments: ``x``, ``t`` ``(N, D)``, ``keep`` bool ``(N,)``, ``scale`` 0-d in the accumulation dtype.
    Returns the 0-d loss; rows that are not kept take no part (not as pairs, not as negatives) and get
    zero gradients; no kept row gives a zero loss, still connected to the graph. No host sync: the
    ``N x N`` logits are masked.
    """
    dtype = scale.dtype
    logits = scale * (F.normalize(x.to(dtype), dim=-1) @ F.normalize(t.to(dtype), dim=-1).T)
    # Masked entries get the smallest finite value: exp() of it minus any real logit is exactly 0.
    hidden = torch.finfo(dtype).min
    rows = torch.where(keep[None, :], logits, hidden)  # row i's softmax over kept columns
    cols = torch.where(keep[:, None], logits, hidden)  # column j's softmax over kept rows
    diag = logits.diagonal()
    ce = (rows.logsumexp(1) - diag) + (cols.logsumexp(0) - diag)
    ce = torch.where(keep, ce, torch.zeros_like(ce))  # (not a product: masked rows may be -inf)
    return 0.5 * ce.sum() / keep.sum().clamp(min=1).to(dtype)


def connected_zero(x, t, scale) -> torch.Tensor:
    """A zero loss in the accumulation dtype, connected to ``x``, ``t`` and ``scale`` (zero gradients):
    the loss when no pair is kept."""
    dtype = compute_dtype(torch.promote_types(x.dtype, t.dtype))
    return (x.sum() + t.sum()).to(dtype) * 0.0 + scale.to(dtype) * 0.0
