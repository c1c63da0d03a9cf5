"""Token-level labels: patch-vs-vocabulary cosine top-k (Eq. 4-6) and window label sampling (Eq. 7).

The public functions validate their inputs and dispatch to a backend; the definitions (``*_reference``,
the result types ``TopK`` and ``PatchLabels``) live in :mod:`sea_kernels.reference` and are importable
from here too. Backends receive canonical inputs:

* ``cosine_topk(patches (M, d), vocab (q, d), k, negate) -> (values f32 (M, k), indices i64 (M, k))``
* ``patch_labels(patches (B, P, d), vocab (q, d), grid (H, W), top_n, window, negate,
  uniforms f32 (B, n_windows, 2)) -> (patch, label, score, valid)``, each ``(B, n_windows)``.
"""

from __future__ import annotations

import torch

from . import _custom_ops
from .dispatch import resolve
from .reference import (
    PatchLabels,
    TopK,
    cosine_topk_reference,
    num_windows,
    patch_labels_reference,
    sample_windows,
    window_patches,
)
from .validation import check_feature_dims, check_finite, check_int, check_same_device, check_tensor, resolve_grid

__all__ = [
    "cosine_topk",
    "patch_labels",
    "TopK",
    "PatchLabels",
    "cosine_topk_reference",
    "patch_labels_reference",
    "sample_windows",
    "num_windows",
    "window_patches",
]

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
    check_same_device(patches=patches, vocab=vocab)
    check_feature_dims("patches", patches, "vocab", vocab)
    hw = resolve_grid(grid, patches.shape[1])
    top_n = check_int("top_n", top_n, 1, vocab.shape[0])
    window = check_int("window", window, 1)
    if not isinstance(negate, bool):
        raise TypeError(f"negate must be a bool; got {type(negate).__name__}")
    shape = (patches.shape[0], num_windows(hw, window), 2)
    uniforms = _uniforms(uniforms, shape, generator, patches, validate)
    if validate:
        check_finite("patches", patches)
        check_finite("vocab", vocab)
    if backend == "reference":  # plain PyTorch: traced as it is by torch.compile
        return patch_labels_reference(patches, vocab, hw, top_n, window, negate, uniforms)
    return _custom_ops.patch_labels(patches, vocab, hw, top_n, window, negate, uniforms, backend)


def _uniforms(uniforms, shape: tuple[int, int, int], generator, patches: torch.Tensor, validate: bool) -> torch.Tensor:
    """The float32 uniforms ``(B, n_windows, 2)`` of :func:`patch_labels`: checked when given, else drawn."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if uniforms is None:
        return torch.rand(shape, generator=generator, device=patches.device)
    check_tensor("uniforms", uniforms)
    if tuple(uniforms.shape) != shape:
        raise ValueError(f"uniforms must have shape (B, n_windows, 2) = {shape}; got {tuple(uniforms.shape)}")
    check_same_device(patches=patches, uniforms=uniforms)
    if validate and not bool(((uniforms >= 0) & (uniforms < 1)).all()):
        raise ValueError("uniforms must lie in [0, 1)")
    return uniforms.float()
