"""Input validation of the ops.

Each helper raises TypeError for a wrong type and ValueError for a wrong value, naming the
argument and what was expected.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndim: int | None = None, *, min_ndim: int | None = None, floating: bool = True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64; got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s); got shape {tuple(x.shape)}")
    return x


def check_int_tensor(name: str, x, ndim: int):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor; got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s); got shape {tuple(x.shape)}")
    return x


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device; got {listing}")
    return first


def check_finite(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())  # NaN propagates; one pass, no boolean temporary
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} must be finite; it contains NaN or Inf (pass validate=False to skip this check)")


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        expected = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {expected}; got {value}")
    return value


def check_feature_dims(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same feature dimension; got {a.shape[-1]} and {b.shape[-1]}"
        )
    if a.shape[-1] < 1:
        raise ValueError(f"{a_name} must have a feature dimension of at least 1; got shape {tuple(a.shape)}")


def resolve_grid(grid, num_patches: int) -> tuple[int, int]:
    """``grid`` as ``(H, W)`` with ``H * W == num_patches``; a perfect square when ``None``."""
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            cls = math.isqrt(num_patches - 1) ** 2 == num_patches - 1 and num_patches > 1
            hint = (
                f"P - 1 = {num_patches - 1} is a square: the tokens seem to include CLS; drop it (tokens[:, 1:])"
                if cls
                else "pass grid=(H, W) for a non-square grid"
            )
            raise ValueError(
                f"grid is None, so the number of patches P must be a perfect square; got P = {num_patches} ({hint})"
            )
        return side, side
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be a pair (H, W) of ints; got {grid!r}")
    h = check_int("grid[0] (H)", grid[0], 1)
    w = check_int("grid[1] (W)", grid[1], 1)
    if h * w != num_patches:
        raise ValueError(f"grid (H, W) = ({h}, {w}) does not match P = {num_patches}: H * W must equal P")
    return h, w
