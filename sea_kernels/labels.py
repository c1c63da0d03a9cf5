"""Token-level labels: patch-vs-vocabulary cosine top-k (Eq. 4-6) and window label sampling (Eq. 7).

The public functions validate their inputs and dispatch to a backend. The ``*_reference``
functions are the eager PyTorch definitions every other backend must reproduce. Backends
receive canonical inputs:

* ``cosine_topk(patches (M, d), vocab (q, d), k, negate) -> (values f32 (M, k), indices i64 (M, k))``
* ``patch_labels(patches (B, P, d), vocab (q, d), grid (H, W), top_n, window, negate,
  uniforms f32 (B, n_windows, 2)) -> (patch, label, score, valid)``, each ``(B, n_windows)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._common import compute_dtype
from .dispatch import resolve
from .validation import check_feature_dims, check_finite, check_int, check_same_device, check_tensor, resolve_grid


class TopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


class PatchLabels(NamedTuple):
    patch: torch.Tensor
    label: torch.Tensor
    score: torch.Tensor
    valid: torch.Tensor


def num_windows(grid: tuple[int, int], window: int) -> int:
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


# ----------------------------------------------------------------------------- cosine_topk


def cosine_topk(patches, vocab, k=10, *, negate=False, backend="auto", validate=True) -> TopK:
    """The ``k`` largest cosine similarities of each patch against the vocabulary.

    ``patches`` ``(..., d)`` and ``vocab`` ``(q, d)``, any float dtype; neither need be normalized.
    Returns ``TopK(values, indices)``, each ``(..., k)``: scores ``s_j = cos(patch, vocab_j)``
    (``-cos`` when ``negate``) as float32 sorted descending, and their int64 vocabulary indices.
    """
    check_tensor("patches", patches, min_ndim=1)
    check_tensor("vocab", vocab, ndim=2)
    device = check_same_device(patches=patches, vocab=vocab)
    check_feature_dims("patches", patches, "vocab", vocab)
    k = check_int("k", k, 1, vocab.shape[0])
    if not isinstance(negate, bool):
        raise TypeError(f"negate must be a bool; got {type(negate).__name__}")
    if validate:
        check_finite("patches", patches)
        check_finite("vocab", vocab)
    impl = resolve("cosine_topk", backend, device)
    lead = patches.shape[:-1]
    values, indices = impl(patches.reshape(-1, patches.shape[-1]), vocab, k, negate)
    return TopK(values.reshape(*lead, k), indices.reshape(*lead, k))


def cosine_topk_reference(patches: torch.Tensor, vocab: torch.Tensor, k: int, negate: bool) -> TopK:
    dtype = compute_dtype(patches.dtype)
    scores = F.normalize(patches.to(dtype), dim=-1) @ F.normalize(vocab.to(dtype), dim=-1).T
    if negate:
        scores = -scores
    values, indices = scores.topk(k, dim=-1, sorted=True)
    return TopK(values.float(), indices)


# ----------------------------------------------------------------------------- patch_labels


def patch_labels(
    patches,
    vocab,
    *,
    grid=None,
    top_n=10,
    window=2,
    negate=False,
    uniforms=None,
    generator=None,
    backend="auto",
    validate=True,
) -> PatchLabels:
    """One (patch, label) pair per ``window x window`` tile of the patch grid (Eq. 4-7).

    ``patches`` ``(B, P, d)`` (patch tokens only), ``vocab`` ``(q, d)``. Each patch's candidates
    are its ``top_n`` scores (as :func:`cosine_topk`) that are ``> 0``. Per window, with uniforms
    ``(u0, u1)``: the patch is the ``min(floor(u0 * |E|), |E| - 1)``-th of the window's eligible
    patches ``E`` in row-major order, and its label is the first candidate ``j`` whose normalized
    cumulative score exceeds ``u1``. Windows without an eligible patch are invalid
    (``patch = label = -1``, ``score = 0``). Returns ``PatchLabels(patch, label, score, valid)``,
    each ``(B, n_windows)``: int64, int64, float32, bool.

    ``grid`` ``(H, W)`` with ``H * W == P`` (None: square); windows tile it row-major, partial
    at the right and bottom edges, ``n_windows = ceil(H / window) * ceil(W / window)``.
    ``uniforms`` ``(B, n_windows, 2)`` in ``[0, 1)``, else drawn with ``torch.rand`` from
    ``generator`` (None: the device's global generator). ``negate`` defaults to False here (the
    plain cosine); :class:`~sea_kernels.SEAAlignmentLoss` defaults to True, the paper's choice
    for CLIP patch tokens, and passes it. Any float dtype: scores are computed in float32
    (float64 for float64 inputs with the ``reference`` and ``cpu`` backends).
    """
    check_tensor("patches", patches, ndim=3)
    check_tensor("vocab", vocab, ndim=2)
    device = check_same_device(patches=patches, vocab=vocab)
    check_feature_dims("patches", patches, "vocab", vocab)
    hw = resolve_grid(grid, patches.shape[1])
    top_n = check_int("top_n", top_n, 1, vocab.shape[0])
    window = check_int("window", window, 1)
    if not isinstance(negate, bool):
        raise TypeError(f"negate must be a bool; got {type(negate).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    shape = (patches.shape[0], num_windows(hw, window), 2)
    if uniforms is None:
        uniforms = torch.rand(shape, generator=generator, device=device)
    else:
        check_tensor("uniforms", uniforms)
        if tuple(uniforms.shape) != shape:
            raise ValueError(f"uniforms must have shape (B, n_windows, 2) = {shape}; got {tuple(uniforms.shape)}")
        check_same_device(patches=patches, uniforms=uniforms)
        if validate and not bool(((uniforms >= 0) & (uniforms < 1)).all()):
            raise ValueError("uniforms must lie in [0, 1)")
        uniforms = uniforms.float()
    if validate:
        check_finite("patches", patches)
        check_finite("vocab", vocab)
    if backend == "reference":  # plain PyTorch: traced as it is by torch.compile
        return patch_labels_reference(patches, vocab, hw, top_n, window, negate, uniforms)
    if torch.compiler.is_compiling():
        return PatchLabels(*torch.ops.sea.patch_labels(patches, vocab, *hw, top_n, window, negate, uniforms, backend))
    impl = resolve("patch_labels", backend, device)
    return PatchLabels(*impl(patches, vocab, hw, top_n, window, negate, uniforms))


def sample_windows(
    values: torch.Tensor,
    indices: torch.Tensor,
    grid: tuple[int, int],
    window: int,
    uniforms: torch.Tensor,
) -> PatchLabels:
    """Steps 2-4 of the contract from each patch's sorted top scores ``(B, P, n)`` (vectorized)."""
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


def patch_labels_reference(patches, vocab, grid, top_n, window, negate, uniforms) -> PatchLabels:
    values, indices = cosine_topk_reference(patches, vocab, top_n, negate)
    return sample_windows(values, indices, grid, window, uniforms)


# ----------------------------------------------------------------------------- custom op
# Under torch.compile the fused backends (C++, Triton) run inside this op: opaque to the tracer,
# with a fake implementation that gives only the output shapes. Eager calls go straight to them.


@torch.library.custom_op("sea::patch_labels", mutates_args=())
def _patch_labels_op(
    patches: torch.Tensor,
    vocab: torch.Tensor,
    h: int,
    w: int,
    top_n: int,
    window: int,
    negate: bool,
    uniforms: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = resolve("patch_labels", backend, patches.device)
    return tuple(v.clone() for v in impl(patches, vocab, (h, w), top_n, window, negate, uniforms))


@_patch_labels_op.register_fake
def _(patches, vocab, h, w, top_n, window, negate, uniforms, backend):
    shape = uniforms.shape[:2]
    return (
        patches.new_empty(shape, dtype=torch.long),
        patches.new_empty(shape, dtype=torch.long),
        patches.new_empty(shape, dtype=torch.float32),
        patches.new_empty(shape, dtype=torch.bool),
    )
