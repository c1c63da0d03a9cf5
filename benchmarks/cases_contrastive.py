"""Benchmark cases of contrastive_loss (to merge into ``benchmarks/cases.py``).

Same conventions as ``benchmarks.cases``: builders take JSON-friendly keyword arguments (dtypes as
strings) and return ``(fn, inputs)``; ``fn(*inputs)`` is the measured call, one forward and backward
with gradients for ``x``, ``t`` and the log-scale. Building a case does the imports and one tiny
call of the same backend (which compiles or loads the C++ extension and pages in the code), so
that a peak-memory measurement around ``fn(*inputs)`` counts only the call itself.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# "reference": eager normalize + N x N logits + two cross_entropy (the baseline); "cpu": the C++
# extension; "cpu_fallback": the cpu backend's blocked PyTorch path (as without a compiler).
CONTRASTIVE_BACKENDS = ("reference", "cpu", "cpu_fallback")

# name -> (N, D), float32. "8k" is the performance target of the cpu backend.
CONTRASTIVE_SIZES = {
    "1k": (1024, 512),
    "2k": (2048, 512),
    "4k": (4096, 512),
    "8k": (8192, 512),
    "1k-d4096": (1024, 4096),
    "2k-d4096": (2048, 4096),
}
# Opt-in (``SEA_BENCH_LARGE=1``): the eager reference needs ~4.5 GB and ~30 s per call here.
CONTRASTIVE_LARGE_SIZES = {"16k": (16384, 512)}


def contrastive_inputs(n: int, dim: int, dtype: str = "float32", scale: float = 14.3, seed: int = 0):
    """``(x, t, log_scale)`` leaves: ``t_i`` correlated with ``x_i`` as in a model being trained."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    t = torch.randn(n, dim, generator=g).mul_(0.7).add_(x, alpha=0.7)
    x = x.to(DTYPES[dtype]).requires_grad_()
    t = t.to(DTYPES[dtype]).requires_grad_()
    log_scale = torch.tensor(float(scale)).log().requires_grad_()
    return x, t, log_scale


def contrastive_fn(backend: str):
    """The measured function ``fn(x, t, log_scale)``: forward + backward of one loss (no warm-up)."""
    if backend not in CONTRASTIVE_BACKENDS:
        raise ValueError(f"backend must be one of {CONTRASTIVE_BACKENDS}; got {backend!r}")
    import sea_kernels

    if backend == "cpu_fallback":
        from sea_kernels.cpu import contrastive as C

        def loss_fn(x, t, scale):
            return C.contrastive_loss(x, t, scale, use_cpp=False)
    else:

        def loss_fn(x, t, scale):
            return sea_kernels.contrastive_loss(x, t, scale, backend=backend)

    def fn(x, t, log_scale):
        x.grad = t.grad = log_scale.grad = None
        loss = loss_fn(x, t, log_scale.exp())
        loss.backward()
        return loss

    return fn


def contrastive_case(n: int, dim: int, dtype: str = "float32", backend: str = "cpu", scale: float = 14.3, seed: int = 0):
    """``(fn, inputs)`` for ``benchmarks._peak.extra_peak_bytes`` (see the module doc)."""
    fn = contrastive_fn(backend)
    fn(*contrastive_inputs(64, 16, dtype, scale, seed))  # imports, extension build/load
    return fn, contrastive_inputs(n, dim, dtype, scale, seed)
