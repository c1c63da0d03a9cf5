"""All-gather of rows whose count differs between ranks (sizes first, pad, gather, unpad).

``gather_rows(x, group, with_grad=True)`` follows open_clip's ``gather_with_grad=True``
convention: the backward pass sums the gradient of the concatenation over all ranks and hands
each rank its own slice, so a loss that is computed identically on every rank gives each rank
``world_size`` times that loss's gradient, and DDP's averaging recovers the exact gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_sizes(n: int, group, device) -> list[int]:
    world = dist.get_world_size(group)
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_padded(x.detach(), sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad[start : start + ctx.sizes[rank]], None, None


def gather_rows(x: torch.Tensor, group, *, with_grad: bool = True, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order); ``x.shape[1:]`` must agree.

    ``sizes``: every rank's row count when the caller already has it (``gather_sizes``)."""
    if sizes is None:
        sizes = gather_sizes(x.shape[0], group, x.device)
    if with_grad and x.requires_grad:
        return _GatherRows.apply(x, sizes, group)
    return _gather_padded(x.detach(), sizes, group)


def check_same_across_ranks(name: str, values: tuple[int, ...], group, device) -> None:
    """Raise ``ValueError`` on every rank when ``values`` (e.g. a feature dim) differ between ranks."""
    local = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    seen = sorted({tuple(int(v) for v in p) for p in parts})
    if len(seen) > 1:
        raise ValueError(f"{name} must be the same on every rank; got {seen}")
