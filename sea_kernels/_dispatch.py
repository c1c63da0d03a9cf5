"""Backend choice and input validation: the one place where an op meets its implementations.

Every op has a ``reference`` implementation (eager PyTorch, the definition) and may have a
``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``) and a ``cpu`` (compiled C++ with a
chunked PyTorch fallback) implementation. Implementations are named here by import path and
imported only when first chosen, so ``import sea_kernels`` never imports triton or compiles C++.

Backend implementations receive validated, canonical inputs (see each op's module) and do no
validation of their own.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import warnings
from collections.abc import Callable
from functools import cache

import torch

BACKENDS = ("auto", "reference", "triton", "cpu")

# op -> backend -> "module:function". A backend that is not listed does not exist for the op.
_IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "cosine_topk": {
        "reference": "sea_kernels.labels:cosine_topk_reference",
        "triton": "sea_kernels.triton.labels:cosine_topk",
        "cpu": "sea_kernels.cpu.labels:cosine_topk",
    },
    "patch_labels": {
        "reference": "sea_kernels.labels:patch_labels_reference",
        "triton": "sea_kernels.triton.labels:patch_labels",
        "cpu": "sea_kernels.cpu.labels:patch_labels",
    },
    "contrastive_loss": {
        "reference": "sea_kernels.contrastive:contrastive_loss_reference",
        "triton": "sea_kernels.triton.contrastive:contrastive_loss",
        "cpu": "sea_kernels.cpu.contrastive:contrastive_loss",
    },
}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _load(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """The concrete backends that can run ``op`` on tensors of ``device``."""
    device = torch.device(device)
    found = []
    for backend in _IMPLEMENTATIONS[op]:
        if backend == "triton" and not (
            _triton_importable() and (device.type == "cuda" or (device.type == "cpu" and triton_interpret()))
        ):
            continue
        if backend == "cpu" and device.type != "cpu":
            continue
        found.append(backend)
    return found


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """Return the implementation of ``op`` for ``backend`` on ``device``.

    ``auto`` picks ``triton`` for CUDA tensors and ``cpu`` for CPU tensors and quietly uses
    ``reference`` where that backend does not exist (yet) for the op. An explicit backend that
    cannot run raises ``ValueError``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}; got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    impls = _IMPLEMENTATIONS[op]
    usable = available_backends(op, device)
    if backend == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu"
        if device.type == "cuda" and "triton" in impls and "triton" not in usable:
            _warn_once(f"triton is not importable: {op} on CUDA runs the reference backend")
        backend = preferred if preferred in usable else "reference"
        return _load(impls[backend])
    if backend not in impls:
        raise ValueError(f"backend {backend!r} does not implement {op}; available: {sorted(impls)}")
    if backend not in usable:
        if backend == "triton" and device.type == "cpu":
            raise ValueError(
                f"backend 'triton' got CPU tensors for {op}: run on CUDA tensors, or set "
                "TRITON_INTERPRET=1 before triton is imported to use the Triton interpreter"
            )
        if backend == "triton":
            raise ValueError(f"backend 'triton' cannot run {op} on {device.type} tensors (is triton installed?)")
        raise ValueError(f"backend {backend!r} needs CPU tensors for {op}; got {device.type} tensors")
    return _load(impls[backend])


@cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- validation
# Each helper raises TypeError for a wrong type and ValueError for a wrong value, naming the
# argument and what was expected.


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
            raise ValueError(
                f"grid is None, so the number of patches P must be a perfect square; got P = {num_patches} "
                "(pass grid=(H, W))"
            )
        return side, side
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be a pair (H, W) of ints; got {grid!r}")
    h = check_int("grid[0] (H)", grid[0], 1)
    w = check_int("grid[1] (W)", grid[1], 1)
    if h * w != num_patches:
        raise ValueError(f"grid (H, W) = ({h}, {w}) does not match P = {num_patches}: H * W must equal P")
    return h, w
