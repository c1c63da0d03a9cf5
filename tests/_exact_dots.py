"""float32 matrix products that no CPU changes, so that the error oracles hold on any x86-64 CPU.

The rule of ``tests/_checks.py`` compares a backend's error with the eager reference's. On a CPU both
depended on the BLAS kernel the machine gets: the Triton interpreter's float32 ``tl.dot`` is NumPy's
(OpenBLAS), the reference's products are torch's (MKL). With OpenBLAS's Haswell or Zen kernels (an AMD
Zen 4, or ``OPENBLAS_CORETYPE=Haswell``) the interpreted loss came out 3x less accurate than with its
SkylakeX kernel, and failed the rule where the same code passed on an Intel Xeon. Here each product is
computed exactly (float64: a float32 product is exact there, and a sum of a few thousand of them is off
by far less than a float32 ulp) and rounded once to float32: the most accurate float32 product, the
same on every CPU.

* :func:`exact_dots`: the interpreter computes float32 ``tl.dot`` that way (``tests/conftest.py``
  installs it for the whole session). The kernels' own arithmetic (tiles, accumulation across tiles,
  exponentials) is unchanged; a GPU's float32 dot (a chain of fused multiply-adds) is less accurate
  than this, so ``benchmarks/gpu_check.sh`` checks the GPU's own.
* :func:`exact_matmuls`: float32 ``mm`` / ``addmm`` / ``bmm`` of CPU tensors that way. The rule's
  yardstick is the less accurate of the reference with the machine's BLAS and with these products:
  the verdict then no longer depends on how accurate this CPU's BLAS happens to be.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten


def exact_product(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """``acc + a @ b`` computed in float64 and rounded once to float32."""
    return (acc.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)


@contextlib.contextmanager
def exact_dots():
    """Within the block, the interpreter computes float32 x float32 ``tl.dot`` by :func:`exact_product`."""
    if torch.cuda.is_available():
        yield
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot = builder.create_dot

    def create_dot(self, a, b, d, *args):
        if not (a.data.dtype == b.data.dtype == d.data.dtype == np.float32):
            return dot(self, a, b, d, *args)
        return interpreter.TensorHandle(exact_product(a.data, b.data, d.data), d.dtype.scalar)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = dot


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    zero = np.zeros((*a.shape[:-1], b.shape[-1]), dtype=np.float32)
    return torch.from_numpy(exact_product(a.detach().numpy(), b.detach().numpy(), zero))


def _float32_cpu(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


class _ExactMatmuls(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (_aten.mm.default, _aten.bmm.default) and _float32_cpu(*args[:2]):
            return _product(*args[:2])
        if func is _aten.addmm.default and _float32_cpu(*args[1:3]):
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            return beta * args[0] + alpha * _product(*args[1:3])
        return func(*args, **kwargs)


def exact_matmuls() -> TorchDispatchMode:
    """Context: float32 products of CPU tensors computed by :func:`exact_product` (autograd's too)."""
    return _ExactMatmuls()
