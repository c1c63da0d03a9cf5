"""Helpers shared by the ops and their backends: the interpreter check, the normalize epsilon,
the accumulation dtype, the cache of values derived from constant tensors."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch

NORM_EPS = 1e-12  # torch.nn.functional.normalize's default: norms are clamped to at least this


def triton_interpret() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET`` set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The one map from dtype names (configs, command lines, benchmark parameters) to torch dtypes.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


class TensorCache:
    """One value derived from some tensors (a check, a cast, a kernel's prepared data), reused while the
    same tensor objects are alive and unmodified: the key holds each tensor's storage, version counter,
    shape, strides, dtype and device, plus ``extra``; weak references make sure the tensors are the ones
    keyed (a freed tensor's memory may come back with version 0), and the value is dropped as soon as
    one of them is freed. Inference tensors have no version counter: their value is made every time,
    never kept. Not pickled (a module holding one pickles without it)."""

    def __init__(self) -> None:
        self._entry = None  # (key, weak references, value)

    def get(self, tensors: tuple[torch.Tensor, ...], extra: tuple, make: Callable):
        if any(t.is_inference() for t in tensors):
            return make()
        key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)
        key += extra
        entry = self._entry
        if entry is not None and entry[0] == key and all(r() is t for r, t in zip(entry[1], tensors)):
            return entry[2]
        self._entry = None  # the old value goes before the new one is made: one at a time
        value = make()
        self._entry = (key, tuple(weakref.ref(t, self._forget) for t in tensors), value)
        return value

    def _forget(self, ref: weakref.ref) -> None:
        if self._entry is not None and any(r is ref for r in self._entry[1]):
            self._entry = None

    def clear(self) -> None:
        self._entry = None

    def __len__(self) -> int:
        return int(self._entry is not None)

    def value(self):
        """The kept value (``None`` when nothing is kept)."""
        return self._entry[2] if self._entry is not None else None

    def __getstate__(self) -> dict:
        return {"_entry": None}
