"""bfloat16 ``tl.dot`` on CPU as a GPU computes it, for the Triton interpreter (one place for the tests
and ``benchmarks/loss_precision.py``).

The interpreter has no bfloat16 arithmetic: its ``tl.dot`` multiplies the raw uint16 storage and its
float32 -> bfloat16 cast truncates. :func:`bfloat16_dots` patches it, while the ``with`` block runs,
to do what the GPU does: dots of bfloat16 operands with exact products accumulated in float32, and
float32 -> bfloat16 casts rounded to nearest even (Triton's default ``fp_downcast_rounding``). Other
dots and casts are left to the interpreter. On a GPU it changes nothing.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


class EmulationUnavailable(RuntimeError):
    """The Triton interpreter's internals moved: the emulation cannot be installed."""


def _as_f32(h):
    import triton.language as tl

    return (h.data.astype(np.uint32) << 16).view(np.float32) if h.dtype.scalar == tl.bfloat16 else h.data


@contextlib.contextmanager
def bfloat16_dots():
    """Within the block, interpreted kernels compute bfloat16 dots and casts as a GPU does (see the module)."""
    if torch.cuda.is_available():
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or not all(hasattr(builder, m) for m in ("create_dot", "cast_impl")):
        raise EmulationUnavailable("the Triton interpreter's internals changed")
    dot, cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, *args):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return dot(self, a, b, d, *args)
        return handle(np.matmul(_as_f32(a), _as_f32(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return handle(data.numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    try:
        yield
    finally:
        builder.create_dot, builder.cast_impl = dot, cast
