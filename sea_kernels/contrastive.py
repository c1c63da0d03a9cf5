"""Eq. 9: symmetric InfoNCE between visual tokens and their label embeddings, learnable temperature.

Backends receive ``x`` ``(N, D)``, ``t`` ``(N, D)`` (the global rows when a process group is
given) and ``scale`` as a 0-d tensor in the accumulation dtype that may require grad, and return
the 0-d loss, differentiable with respect to all three. The definitions (``*_reference``) live in
:mod:`sea_kernels.reference` and are importable from here too.
"""

from __future__ import annotations

import torch

from . import _custom_ops, _distributed
from ._common import compute_dtype
from .dispatch import resolve
from .reference import connected_zero, contrastive_loss_reference, masked_contrastive_loss_reference
from .validation import check_finite, check_same_device, check_tensor

__all__ = [
    "contrastive_loss",
    "masked_contrastive_loss",
    "contrastive_loss_reference",
    "masked_contrastive_loss_reference",
    "connected_zero",
]


def contrastive_loss(x, t, scale, *, group=None, backend="auto", validate=True) -> torch.Tensor:
    """``0.5 * (CE(l, arange(N)) + CE(l^T, arange(N)))`` with ``l_ij = scale * cos(x_i, t_j)``.

    ``x``, ``t`` ``(N, D)``: row ``i`` of ``x`` is paired with row ``i`` of ``t``. ``scale`` is a
    positive float or 0-d tensor (``1 / tau``, may require grad). With ``group``, each rank passes
    its own rows (``N`` may differ, even be 0 on some ranks) and gets the loss over all ranks' rows;
    each rank's ``x`` and ``t`` receive ``world_size`` times that loss's gradient (open_clip's
    ``gather_with_grad=True``), so DDP's gradient averaging yields exactly the global gradient.
    Returns a 0-d float32 tensor (float64 for float64 inputs).
    """
    check_tensor("x", x, ndim=2)
    check_tensor("t", t, ndim=2)
    device = check_same_device(x=x, t=t)
    if x.shape != t.shape:
        raise ValueError(f"x and t must have the same shape (N, D); got {tuple(x.shape)} and {tuple(t.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"x and t must have a feature dimension D of at least 1; got shape {tuple(x.shape)}")
    dtype = compute_dtype(torch.promote_types(x.dtype, t.dtype))
    scale = _as_scale(scale, dtype, device, validate)
    if validate:
        check_finite("x", x)
        check_finite("t", t)
    impl = resolve("contrastive_loss", backend, device)
    if group is not None:
        _distributed.check_same_across_ranks("the feature dimension D of x and t", (x.shape[1],), group, device)
        sizes = _distributed.gather_sizes(x.shape[0], group, device)  # x and t have the same rows
        x = _distributed.gather_rows(x, group, sizes=sizes)
        t = _distributed.gather_rows(t, group, sizes=sizes)
    if x.shape[0] == 0:
        where = "on any rank" if group is not None else ""
        raise ValueError(f"x and t must have at least one row {where}".rstrip())
    return impl(x, t, scale)


def masked_contrastive_loss(x, t, keep, scale, *, backend="auto") -> torch.Tensor:
    """:func:`contrastive_loss` over the rows where ``keep`` is True, on fixed shapes.

    ``x``, ``t`` ``(N, D)``, ``keep`` bool ``(N,)``, ``scale`` a 0-d tensor in the accumulation
    dtype. Rows that are not kept take no part (not as pairs, not as negatives) and get zero
    gradients; no kept row gives a zero loss, still connected to the graph. Returns the 0-d loss.
    No host sync and no data-dependent shape with the ``reference`` backend, which masks the
    ``N x N`` logits. The fused backends get the kept rows (``x[keep]``: one host sync on GPUs, and
    their memory stays O(kept rows)); under ``torch.compile`` they run inside a custom op
    (``sea::contrastive_loss_masked``, whose backward recomputes the forward: see
    :mod:`sea_kernels._custom_ops`), so the function traces with ``fullgraph=True``. No validation
    (an internal step of ``SEAAlignmentLoss``).
    """
    if backend == "reference":
        return masked_contrastive_loss_reference(x, t, keep, scale)
    return _custom_ops.masked_contrastive_loss(x, t, keep, scale, backend)


def _as_scale(scale, dtype, device, validate: bool) -> torch.Tensor:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"scale must be a positive float or a 0-d tensor; got {type(scale).__name__}")
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise ValueError(f"scale must be a 0-d tensor; got shape {tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a floating-point tensor; got {scale.dtype}")
        if scale.device != device and scale.device.type != "cpu":
            raise ValueError(f"scale must be on the device of x ({device}) or a CPU scalar; got {scale.device}")
        value = float(scale.detach()) if validate else 1.0
        scale = scale.to(device=device, dtype=dtype)
    else:
        value = float(scale)
        scale = torch.tensor(value, dtype=dtype, device=device)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"scale must be positive and finite; got {value}")
    return scale
