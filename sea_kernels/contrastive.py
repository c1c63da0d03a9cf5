"""Eq. 9: symmetric InfoNCE between visual tokens and their label embeddings, learnable temperature.

Backends receive ``x`` ``(N, D)``, ``t`` ``(N, D)`` (the global rows when a process group is
given) and ``scale`` as a 0-d tensor in the accumulation dtype that may require grad, and return
the 0-d loss, differentiable with respect to all three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _distributed
from ._common import compute_dtype
from .dispatch import resolve
from .validation import check_finite, check_same_device, check_tensor


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
    gradients; no kept row gives a zero loss, still connected to the graph. No host sync and no
    data-dependent shape with the ``reference`` backend, which masks the ``N x N`` logits. The
    fused backends get the kept rows (``x[keep]``: one host sync on GPUs, and their memory stays
    O(kept rows)); under ``torch.compile`` they run inside a custom op
    (``sea::contrastive_loss_masked``, whose backward recomputes the forward), so the function
    traces with ``fullgraph=True``. No validation (an internal step of ``SEAAlignmentLoss``).
    """
    if backend == "reference":
        return masked_contrastive_loss_reference(x, t, keep, scale)
    if not torch.compiler.is_compiling():
        return _kept_loss(x, t, keep, scale, backend)  # eager: the backend's own backward, no recompute
    return torch.ops.sea.contrastive_loss_masked(x, t, keep, scale, backend)


def masked_contrastive_loss_reference(x, t, keep, scale) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- custom ops
# The fused backends (C++, Triton) are opaque to torch.compile: they run inside custom ops with
# fake (shape-only) implementations. The masked loss's backward recomputes the forward under
# autograd inside its own op (the custom-op machinery turns autograd off in an op's body).


def _autograd_inside_op():
    include = torch._C._dispatch_tls_local_include_set()
    return torch._C._ForceDispatchKeyGuard(include, torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined))


def connected_zero(x, t, scale) -> torch.Tensor:
    """A zero loss in the accumulation dtype, connected to ``x``, ``t`` and ``scale`` (zero gradients):
    the loss when no pair is kept."""
    dtype = compute_dtype(torch.promote_types(x.dtype, t.dtype))
    return (x.sum() + t.sum()).to(dtype) * 0.0 + scale.to(dtype) * 0.0


def _kept_loss(x, t, keep, scale, backend):
    kept = keep.nonzero().squeeze(1)
    if kept.numel() == 0:
        return connected_zero(x, t, scale)
    return resolve("contrastive_loss", backend, x.device)(x[kept], t[kept], scale)


@torch.library.custom_op("sea::contrastive_loss_masked", mutates_args=())
def _masked_op(x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, backend: str) -> torch.Tensor:
    with torch.no_grad():
        return _kept_loss(x, t, keep, scale, backend).detach().clone()


@_masked_op.register_fake
def _(x, t, keep, scale, backend):
    return scale.new_empty(())


@torch.library.custom_op("sea::contrastive_loss_masked_backward", mutates_args=())
def _masked_backward_op(
    grad: torch.Tensor, x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _autograd_inside_op(), torch.enable_grad():
        leaves = [v.detach().requires_grad_() for v in (x, t, scale)]
        loss = _kept_loss(*leaves[:2], keep, leaves[2], backend)
        grads = torch.autograd.grad(loss, leaves, grad, allow_unused=True)
    return tuple(torch.zeros_like(v) if g is None else g.detach() for v, g in zip(leaves, grads))


@_masked_backward_op.register_fake
def _(grad, x, t, keep, scale, backend):
    return torch.empty_like(x), torch.empty_like(t), torch.empty_like(scale)


def _masked_setup(ctx, inputs, output):
    x, t, keep, scale, backend = inputs
    ctx.save_for_backward(x, t, keep, scale)
    ctx.backend = backend


def _masked_backward(ctx, grad):
    x, t, keep, scale = ctx.saved_tensors
    gx, gt, gs = torch.ops.sea.contrastive_loss_masked_backward(grad, x, t, keep, scale, ctx.backend)
    return gx, gt, None, gs, None


_masked_op.register_autograd(_masked_backward, setup_context=_masked_setup)


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


def contrastive_loss_reference(x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    dtype = scale.dtype
    logits = scale * (F.normalize(x.to(dtype), dim=-1) @ F.normalize(t.to(dtype), dim=-1).T)
    target = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
