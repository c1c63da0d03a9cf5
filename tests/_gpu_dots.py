"""16-bit ``tl.dot`` on CPU as a GPU computes it, for the Triton interpreter (one place for the tests
and ``benchmarks/loss_precision.py``).

The interpreter has no bfloat16 arithmetic: its ``tl.dot`` multiplies the raw uint16 storage and its
float32 -> bfloat16 cast truncates. :func:`bfloat16_dots` patches it, while the ``with`` block runs,
to do what an IEEE machine does: dots of bfloat16 operands with exact products accumulated in float32
(round to nearest), and float32 -> bfloat16 casts rounded to nearest even (Triton's default
``fp_downcast_rounding``). Other dots and casts are left to the interpreter.

:func:`tensor_core_dots` instead computes every dot of bfloat16 or float16 operands as Hopper's
tensor cores do (wgmma / mma with float32 accumulation), which do not round like IEEE. The model
(Fasi, Higham, Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ Computer
Science 7:e330, 2021; for the H100: Khattak and Mikaitis, "Accurate models of NVIDIA tensor cores",
arXiv:2512.07004, 2025, model ``H100TC.m`` of github.com/north-numerical-computing/MATLAB-tensor-core:
16 products per block, 2 extra alignment bits, truncation, no sticky bit, round-toward-zero output):
``d = c + a @ b`` runs over ``k`` in blocks of ``K_BLOCK`` = 16 products, in order; per block

1. the products ``a_j b_j`` are exact (two 16-bit significands);
2. ``E = max(max_j (e(a_j) + e(b_j)), e(c))`` over the nonzero terms, ``e(v) = floor(log2 |v|)``
   clamped to the format's smallest normal exponent (-126 for ``c`` and bfloat16, -14 for float16);
3. every product and ``c`` is truncated toward zero to a multiple of ``2**(E - 23 - EXTRA_BITS)``
   (aligned to the largest exponent, ``24 + EXTRA_BITS`` bits kept; ``EXTRA_BITS`` = 2 on the H100);
4. the truncated terms are summed exactly and the sum is truncated (round toward zero) to float32:
   the next block's ``c``.

So a long chain of blocks into one accumulator loses up to about one float32 ulp of it per block,
always toward zero (IEEE's round to nearest would lose half an ulp, unbiased). Not modelled: products
below ``2**-133`` (flushed by the hardware), infinities and NaNs. ``tensor_core_dots(extra_bits=0)`` is
the older (V100) alignment. On a GPU both context managers change nothing.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

K_BLOCK = 16  # products per block: wgmma and mma.sync m16n8k16 take k = 16 for 16-bit inputs
EXTRA_BITS = 2  # alignment bits kept beyond float32's 24 on the H100 (Khattak and Mikaitis 2025)
_NONE = -(1 << 20)  # exponent of a zero term: below every real one


class EmulationUnavailable(RuntimeError):
    """The Triton interpreter's internals moved: the emulation cannot be installed."""


def _as_f32(h):
    import triton.language as tl

    return (h.data.astype(np.uint32) << 16).view(np.float32) if h.dtype.scalar == tl.bfloat16 else h.data


def _exponent(v: np.ndarray, emin: int) -> np.ndarray:
    """``floor(log2 |v|)`` clamped below at ``emin`` (``_NONE`` where ``v`` is 0), int64."""
    _, e = np.frexp(v)
    return np.where(v != 0, np.maximum(e.astype(np.int64) - 1, emin), _NONE)


def _to_float32_rz(s: np.ndarray) -> np.ndarray:
    """float64 ``s`` rounded toward zero to float32."""
    f = s.astype(np.float32)
    over = np.abs(f.astype(np.float64)) > np.abs(s)
    return np.where(over, np.nextafter(f, np.float32(0)), f)


def tensor_core_matmul(a, b, c, *, emin: int, k_block: int = K_BLOCK, extra_bits: int = EXTRA_BITS) -> np.ndarray:
    """``c + a @ b`` as a tensor core computes it (see the module): ``a`` ``(M, K)`` and ``b`` ``(K, N)``
    hold 16-bit values (any float dtype), ``c`` ``(M, N)`` float32; float32 result."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ea, eb = _exponent(a, emin), _exponent(b, emin)
    acc = np.asarray(c, np.float32)
    for k0 in range(0, a.shape[1], k_block):
        p = a[:, k0 : k0 + k_block, None] * b[None, k0 : k0 + k_block, :]  # exact
        e = (ea[:, k0 : k0 + k_block, None] + eb[None, k0 : k0 + k_block, :]).max(1)
        acc64 = acc.astype(np.float64)
        top = np.maximum(e, _exponent(acc64, -126))
        ulp = np.ldexp(1.0, np.where(top > _NONE // 2, top - 23 - extra_bits, 0))[:, None, :]
        total = (np.trunc(p / ulp).sum(1) + np.trunc(acc64 / ulp[:, 0])) * ulp[:, 0]  # exact: < 2**53 ulps
        acc = _to_float32_rz(total)
    return acc


@contextlib.contextmanager
def _patched(dot_for):
    """Patch the interpreter's ``create_dot`` (``dot_for(a, b, d)``: a TensorHandle, or None for the
    interpreter's own) and its float32 -> bfloat16 cast (round to nearest even) while the block runs."""
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
        out = dot_for(a, b, d)
        return dot(self, a, b, d, *args) if out is None else handle(out, d.dtype.scalar)

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


@contextlib.contextmanager
def or_skip(emulation):
    """Run a test inside ``emulation`` (:func:`bfloat16_dots`, :func:`tensor_core_dots`); the test is skipped,
    not failed, when the interpreter's internals moved (:class:`EmulationUnavailable`)."""
    import pytest

    try:
        with emulation:
            yield
    except EmulationUnavailable as e:
        pytest.skip(str(e))


def bfloat16_dots():
    """Within the block, interpreted kernels compute bfloat16 dots (IEEE float32 accumulation) and casts
    as an IEEE machine does (see the module)."""
    import triton.language as tl

    def dot_for(a, b, d):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return None
        return np.matmul(_as_f32(a), _as_f32(b), dtype=d.data.dtype) + d.data

    return _patched(dot_for)


def tensor_core_dots(*, k_block: int = K_BLOCK, extra_bits: int = EXTRA_BITS):
    """Within the block, interpreted kernels compute dots of bfloat16 and float16 operands as Hopper's
    tensor cores do (:func:`tensor_core_matmul`) and bfloat16 casts as the GPU does (see the module)."""
    import triton.language as tl

    emins = {tl.bfloat16: -126, tl.float16: -14}

    def dot_for(a, b, d):
        kind = a.dtype.scalar
        if kind not in emins or b.dtype.scalar != kind or d.dtype.scalar != tl.float32:
            return None
        return tensor_core_matmul(
            _as_f32(a), _as_f32(b), d.data, emin=emins[kind], k_block=k_block, extra_bits=extra_bits
        )

    return _patched(dot_for)
