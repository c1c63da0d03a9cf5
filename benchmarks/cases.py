"""Benchmark cases, by op: builders of ``(fn, inputs)`` for pytest-benchmark and ``benchmarks._peak``.

Every builder takes JSON-friendly keyword arguments (dtypes as strings) and returns ``(fn, inputs)``;
``fn(*inputs)`` is the measured call. Building a case does the imports and one tiny call of the same
backend (which compiles or loads a C++ extension and pages in the code), so that a peak-memory
measurement around ``fn(*inputs)`` counts only the call itself.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ============================================================================ labels
# cosine_topk / patch_labels. Backends: "reference" (eager normalize + matmul + topk), "cpu" (the C++
# extension), "cpu_fallback" (the cpu backend's chunked PyTorch path, as without a compiler).

LABELS_BACKENDS = ("reference", "cpu", "cpu_fallback")
LABELS_OPS = ("cosine_topk", "patch_labels")

# name -> (b, p, q, d): b images of p patches (a square grid) against q vocabulary words of dim d.
LABELS_SIZES = {
    "small": (1, 64, 1000, 256),
    "medium": (2, 256, 8192, 512),
    "full": (2, 576, 41242, 768),  # LLaVA-1.5 CLIP ViT-L/14-336 grid 24 x 24, the paper's vocabulary
}


def labels_inputs(b: int, p: int, q: int, d: int, dtype: str = "float32", seed: int = 0):
    """``(patches (b, p, d), vocab (q, d), uniforms (b, n_windows, 2))`` for a square grid and window 2."""
    from sea_kernels.labels import num_windows

    side = int(round(p**0.5))
    assert side * side == p, "labels cases use square grids"
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(b, p, d, generator=g).to(DTYPES[dtype])
    vocab = torch.randn(q, d, generator=g).to(DTYPES[dtype])
    uniforms = torch.rand(b, num_windows((side, side), 2), 2, generator=g)
    return patches, vocab, uniforms


def labels_fn(op: str, backend: str, k: int = 10, negate: bool = False):
    """The measured function ``fn(patches, vocab, uniforms)`` of a labels case (no warm-up)."""
    import sea_kernels.labels as L

    if backend not in LABELS_BACKENDS:
        raise ValueError(f"backend must be one of {LABELS_BACKENDS}; got {backend!r}")
    if op not in LABELS_OPS:
        raise ValueError(f"op must be one of {LABELS_OPS}; got {op!r}")
    if backend == "cpu_fallback":
        from sea_kernels.cpu import labels as C

        if op == "cosine_topk":
            return lambda patches, vocab, uniforms: C.cosine_topk_impl(
                patches.reshape(-1, patches.shape[-1]), vocab, k, negate, use_cpp=False
            )
        return lambda patches, vocab, uniforms: C.patch_labels_impl(
            patches, vocab, _grid(patches), k, 2, negate, uniforms, use_cpp=False
        )
    if op == "cosine_topk":
        return lambda patches, vocab, uniforms: L.cosine_topk(patches, vocab, k, negate=negate, backend=backend, validate=False)
    return lambda patches, vocab, uniforms: L.patch_labels(
        patches, vocab, top_n=k, window=2, negate=negate, uniforms=uniforms, backend=backend, validate=False
    )


def _grid(patches):
    side = int(round(patches.shape[1] ** 0.5))
    return side, side


def labels_case(
    backend: str = "cpu",
    b: int = 2,
    p: int = 576,
    q: int = 41242,
    d: int = 768,
    dtype: str = "float32",
    op: str = "patch_labels",
    k: int = 10,
    negate: bool = False,
    seed: int = 0,
):
    """``(fn, inputs)`` for one ``patch_labels`` (top_n = k, window 2) or ``cosine_topk`` call (see the module doc)."""
    fn = labels_fn(op, backend, k, negate)
    fn(*labels_inputs(1, 16, max(k, 64), 32, dtype, seed))  # warm-up: imports, extension load
    return fn, labels_inputs(b, p, q, d, dtype, seed)
