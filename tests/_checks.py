"""Shared assertions: a fast path may err at most 2x the eager reference's error (FlashAttention's standard)."""

from __future__ import annotations

import torch


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (value.detach().double() - truth.detach().double()).abs().max().item() if value.numel() else 0.0


def assert_as_accurate_as_reference(
    fast: torch.Tensor,
    reference: torch.Tensor,
    truth: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-6,
    what: str = "",
) -> None:
    """``|fast - truth| <= factor * |reference - truth| + floor`` in the max norm (``truth`` in float64)."""
    assert fast.shape == truth.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(truth.shape)}"
    e_fast, e_ref = max_error(fast, truth), max_error(reference, truth)
    assert e_fast <= factor * e_ref + floor, (
        f"{what}: error {e_fast:.3g} > {factor} x reference error {e_ref:.3g} + {floor:g}"
    )
