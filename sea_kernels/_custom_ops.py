"""Every ``torch.library`` registration of sea_kernels: the fused backends (C++, Triton) as custom ops.

``torch.compile`` cannot trace into a C++ extension or a Triton launch, so under it the fused backends
run inside custom ops whose fake implementations give only the output shapes (flash-attention's
layout: custom ops with fake implementations, an ``autograd.Function`` over them for the
differentiable one). One rule, here only: eager calls run a fused backend directly (its own backward,
no recomputation); traced calls run it inside its op. The ``reference`` backend never comes here:
plain PyTorch traces as it is.

* ``sea::patch_labels``: the labels (no gradient).
* ``sea::contrastive_loss_masked`` and ``sea::contrastive_loss_masked_backward`` under
  :class:`MaskedContrastiveLoss`: the loss over the kept rows, whose backward recomputes the forward
  under autograd inside its own op.
"""

from __future__ import annotations

import torch

from .dispatch import resolve
from .reference import PatchLabels, connected_zero

# ----------------------------------------------------------------------------- patch_labels


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


def patch_labels(patches, vocab, grid, top_n, window, negate, uniforms, backend: str) -> PatchLabels:
    """A fused backend's ``patch_labels`` on canonical inputs (see :mod:`sea_kernels.labels`).

    Arguments: as ``patch_labels_reference``, plus ``backend`` (``auto``, ``cpu`` or ``triton``).
    Returns :class:`~sea_kernels.reference.PatchLabels`: from the backend itself in eager calls, from
    the custom op ``sea::patch_labels`` in traced ones.
    """
    if torch.compiler.is_compiling():
        return PatchLabels(*torch.ops.sea.patch_labels(patches, vocab, *grid, top_n, window, negate, uniforms, backend))
    impl = resolve("patch_labels", backend, patches.device)
    return PatchLabels(*impl(patches, vocab, grid, top_n, window, negate, uniforms))


# ----------------------------------------------------------------------------- masked contrastive loss


def kept_loss(x, t, keep, scale, backend: str) -> torch.Tensor:
    """The fused ``contrastive_loss`` of the kept rows ``x[keep]``, ``t[keep]`` (one host sync on GPUs);
    :func:`~sea_kernels.reference.connected_zero` when no row is kept."""
    kept = keep.nonzero().squeeze(1)
    if kept.numel() == 0:
        return connected_zero(x, t, scale)
    return resolve("contrastive_loss", backend, x.device)(x[kept], t[kept], scale)


def _autograd_inside_op():
    """Autograd back on inside a custom op's body (the custom-op machinery turns it off there)."""
    include = torch._C._dispatch_tls_local_include_set()
    return torch._C._ForceDispatchKeyGuard(include, torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined))


@torch.library.custom_op("sea::contrastive_loss_masked", mutates_args=())
def _masked_op(x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, backend: str) -> torch.Tensor:
    with torch.no_grad():
        return kept_loss(x, t, keep, scale, backend).detach().clone()


@_masked_op.register_fake
def _(x, t, keep, scale, backend):
    return scale.new_empty(())


@torch.library.custom_op("sea::contrastive_loss_masked_backward", mutates_args=())
def _masked_backward_op(
    grad: torch.Tensor, x: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _autograd_inside_op(), torch.enable_grad():
        leaves = [v.detach().requires_grad_() for v in (x, t, scale)]
        loss = kept_loss(*leaves[:2], keep, leaves[2], backend)
        grads = torch.autograd.grad(loss, leaves, grad, allow_unused=True)
    return tuple(torch.zeros_like(v) if g is None else g.detach() for v, g in zip(leaves, grads))


@_masked_backward_op.register_fake
def _(grad, x, t, keep, scale, backend):
    return torch.empty_like(x), torch.empty_like(t), torch.empty_like(scale)


class MaskedContrastiveLoss(torch.autograd.Function):
    """``sea::contrastive_loss_masked`` forward, ``sea::contrastive_loss_masked_backward`` backward."""

    @staticmethod
    def forward(ctx, x, t, keep, scale, backend: str):
        ctx.save_for_backward(x, t, keep, scale)
        ctx.backend = backend
        return torch.ops.sea.contrastive_loss_masked(x, t, keep, scale, backend)

    @staticmethod
    def backward(ctx, grad):
        x, t, keep, scale = ctx.saved_tensors
        gx, gt, gs = torch.ops.sea.contrastive_loss_masked_backward(grad, x, t, keep, scale, ctx.backend)
        return gx, gt, None, gs, None


def masked_contrastive_loss(x, t, keep, scale, backend: str) -> torch.Tensor:
    """A fused backend's loss over the rows where ``keep`` is True (see
    :func:`~sea_kernels.reference.masked_contrastive_loss_reference` for the arguments and the result).

    Eager calls: :func:`kept_loss`, with the backend's own backward. Traced calls:
    :class:`MaskedContrastiveLoss`, fixed shapes for the tracer (the kept rows are taken inside the op).
    """
    if torch.compiler.is_compiling():
        return MaskedContrastiveLoss.apply(x, t, keep, scale, backend)
    return kept_loss(x, t, keep, scale, backend)
