"""Helpers shared by the ops and their backends: the interpreter check, the normalize epsilon,
the accumulation dtype."""

from __future__ import annotations

import os

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
