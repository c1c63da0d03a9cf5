"""Backend choice: the one place where an op meets its implementations.

Every op has a ``reference`` implementation (eager PyTorch, the definition) and may have a
``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``) and a ``cpu`` (compiled C++ with a
chunked PyTorch fallback) implementation. Implementations are named here by import path and
imported only when first chosen, so ``import sea_kernels`` never imports triton or compiles C++.

Backend implementations receive validated, canonical inputs (see each op's module) and do no
validation of their own.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from functools import cache

import torch

from ._common import triton_interpret

BACKENDS = ("auto", "reference", "triton", "cpu")

# op -> backend -> "module:function". A backend that is not listed does not exist for the op.
_IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "cosine_topk": {
        "reference": "sea_kernels.reference:cosine_topk_reference",
        "triton": "sea_kernels.triton.labels:cosine_topk",
        "cpu": "sea_kernels.cpu.labels:cosine_topk",
    },
    "patch_labels": {
        "reference": "sea_kernels.reference:patch_labels_reference",
        "triton": "sea_kernels.triton.labels:patch_labels",
        "cpu": "sea_kernels.cpu.labels:patch_labels",
    },
    "contrastive_loss": {
        "reference": "sea_kernels.reference:contrastive_loss_reference",
        "triton": "sea_kernels.triton.contrastive:contrastive_loss",
        "cpu": "sea_kernels.cpu.contrastive:contrastive_loss",
    },
}

OPS = tuple(_IMPLEMENTATIONS)


def backends(op: str) -> tuple[str, ...]:
    """The concrete backends that implement ``op`` (whether or not they can run here)."""
    if op not in _IMPLEMENTATIONS:
        raise ValueError(f"op must be one of {OPS}; got {op!r}")
    return tuple(_IMPLEMENTATIONS[op])


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
    for backend in backends(op):
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
