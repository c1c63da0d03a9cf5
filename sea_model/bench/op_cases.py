"""The op microbenchmark cases, for ``sea bench``, ``sea selfcheck`` and ``benchmarks/``.

Ops: ``topk`` (``cosine_topk``), ``labels`` (``patch_labels``: top-k + window sampling) and ``loss``
(``contrastive_loss``, forward + backward). Each op has named sizes, chosen per device and mode
(:meth:`CaseSet.size_names`), and backends (:meth:`CaseSet.backends`; the first, ``reference``, is
the baseline the others are compared with).

:class:`CaseSet` is what the timing engine (:mod:`sea_model.bench.runner`) needs of a family of
cases; :data:`OP_CASES` is the one for the ops. :mod:`sea_model.bench.stage1_cases` adds the Stage-1
training step as a second family.

``build_case(op, backend, device, **params)`` returns ``(fn, inputs)``; ``fn(*inputs)`` is the
measured call. Parameters are JSON-friendly (dtypes as strings), so that
:func:`sea_model.bench.memory.extra_peak_bytes` can rebuild the same case in a fresh process.
Building a case does its imports and one small call of the same backend (which compiles or loads a
C++ extension, compiles a Triton kernel, pages in the code), so that a measurement around
``fn(*inputs)`` counts only the call itself.

CPU backends: ``reference`` (eager PyTorch), ``cpu`` (the C++ extension), ``cpu_fp32`` (labels only: the
C++ extension with the plain float32 prefilter instead of the default low-precision one),
``cpu_fallback`` (the cpu backend's chunked PyTorch path, what runs without a compiler). CUDA:
``reference``, ``triton``.
"""

from __future__ import annotations

import torch

from sea_kernels._common import DTYPES, SHORT_DTYPES

OPS = ("topk", "labels", "loss")
TITLES = {
    "topk": "cosine_topk",
    "labels": "patch_labels (top-k + window sampling)",
    "loss": "contrastive_loss forward + backward",
}
MODES = ("quick", "full")

# topk / labels: b images of p patches (a square grid) against q vocabulary words of dim d.
LABELS_SIZES = {
    "small": dict(b=1, p=64, q=1000, d=256),
    "medium": dict(b=2, p=256, q=8192, d=512),
    "full": dict(b=2, p=576, q=41242, d=768),  # LLaVA-1.5's 24 x 24 grid against the paper's vocabulary
    "b32": dict(b=32, p=576, q=41242, d=768),  # a LLaVA-1.5 stage-1 micro batch (32 images per device)
    # the call as the trainer makes it: patches in the op dtype (bf16 under autocast on GPUs), the
    # vocabulary stored in float32 and used through SEAAlignmentLoss's cached cast to the patches' dtype
    "b32-trainer": dict(b=32, p=576, q=41242, d=768, vocab_dtype="float32"),
}
# loss: N pairs of dimension D.
LOSS_SIZES = {
    "1k": dict(n=1024, dim=512),
    "2k": dict(n=2048, dim=512),
    "4k": dict(n=4096, dim=512),
    "8k": dict(n=8192, dim=512),  # the cpu backend's target size
    "2k-d4096": dict(n=2048, dim=4096),
    "4608-d4096": dict(n=4608, dim=4096),  # 32 images x 144 windows, LLaMA-7B's hidden size
    "16k-d4096": dict(n=16384, dim=4096),
    "32k-d4096": dict(n=32768, dim=4096),
}

# device -> mode -> op -> size names (smallest first).
SIZE_NAMES = {
    "cpu": {
        "quick": {"topk": ["small", "medium"], "labels": ["small", "medium"], "loss": ["1k", "2k"]},
        "full": {
            "topk": ["small", "medium", "full"],
            "labels": ["small", "medium", "full"],
            "loss": ["1k", "2k", "4k", "8k", "2k-d4096"],
        },
    },
    "cuda": {
        "quick": {
            "topk": ["medium", "b32"],
            "labels": ["medium", "b32", "b32-trainer"],
            "loss": ["4608-d4096"],
        },
        "full": {
            "topk": ["medium", "full", "b32"],
            "labels": ["medium", "full", "b32", "b32-trainer"],
            "loss": ["8k", "4608-d4096", "16k-d4096", "32k-d4096"],
        },
    },
}
# Float dtype of the op inputs per device: what the model feeds the ops (bf16 autocast on GPUs).
DEVICE_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def device_type(device) -> str:
    return torch.device(device).type


def size_list(sizes: str) -> list[str]:
    """The names of ``sizes``: a mode (``quick``, ``full``) or comma-separated size names."""
    names = [n.strip() for n in sizes.split(",") if n.strip()]
    if not names:
        raise ValueError(f"sizes must be one of {MODES} or size names; got {sizes!r}")
    return names


def pick_sizes(sizes: str, by_mode: dict, known) -> list[str]:
    """``by_mode[sizes]`` for a mode, else those of the comma-separated names in ``known``."""
    if sizes in MODES:
        return list(by_mode[sizes])
    return [n for n in size_list(sizes) if n in known]


class CaseSet:
    """What the timing engine needs of a family of cases, and the hooks it calls (defaults: none).

    ``builder`` names a ``module:function`` that takes ``op, backend, device, **params`` and returns
    ``(fn, inputs)``: the memory subprocess rebuilds a case through it."""

    ops: tuple[str, ...] = OPS
    titles: dict[str, str] = TITLES
    builder = "sea_model.bench.op_cases:build_case"
    budget_factor = 1.0  # times the timing budget of a case

    def size_names(self, op: str, device="cpu", mode: str = "quick") -> list[str]:
        """The sizes of ``op`` in ``mode``, or among comma-separated size names."""
        by_mode = {m: names[op] for m, names in SIZE_NAMES[device_type(device)].items()}
        return pick_sizes(mode, by_mode, LOSS_SIZES if op == "loss" else LABELS_SIZES)

    def size_params(self, op: str, size: str, device="cpu") -> dict:
        """The builder parameters of a named size on ``device`` (JSON-friendly)."""
        table = LOSS_SIZES if op == "loss" else LABELS_SIZES
        return {**table[size], "dtype": DEVICE_DTYPE[device_type(device)]}

    def backends(self, op: str, device="cpu") -> list[str]:
        """The backends measured for ``op`` on ``device``, the baseline first.

        Triton on a CPU (the interpreter) is never benchmarked."""
        from sea_kernels import available_backends

        kernel_op = {"topk": "cosine_topk", "labels": "patch_labels", "loss": "contrastive_loss"}[op]
        dev = torch.device(device)
        found = [b for b in available_backends(kernel_op, dev) if not (b == "triton" and dev.type != "cuda")]
        if "cpu" in found:
            found += ["cpu_fp32", "cpu_fallback"] if op in ("topk", "labels") else ["cpu_fallback"]
        return sorted(found, key=lambda b: b != "reference")

    def describe(self, op: str, params: dict) -> str:
        """A short shape string: ``b=2 p=576 q=41242 d=768 fp32``."""
        dtype = SHORT_DTYPES.get(params.get("dtype", "float32"), params.get("dtype"))
        if op == "loss":
            return f"N={params['n']} D={params['dim']} {dtype}"
        vocab = params.get("vocab_dtype")
        vocab = f" (vocab {SHORT_DTYPES.get(vocab, vocab)}, as the trainer)" if vocab else ""
        return f"b={params['b']} p={params['p']} q={params['q']} d={params['d']} {dtype}{vocab}"

    def flops(self, op: str, params: dict) -> float | None:
        """The matrix-product work of one call (the basis of TFLOP/s), or None.

        topk / labels: the ``(M, d) x (d, q)`` cosine product, ``2 M q d`` with ``M = b p``.
        loss: forward logits and the two gradient products, ``3 x 2 N^2 D`` (a kernel that recomputes
        the logits in its backward does a fourth product that is not counted)."""
        if op in ("topk", "labels"):
            return 2.0 * params["b"] * params["p"] * params["q"] * params["d"]
        if op == "loss":
            return 6.0 * params["n"] ** 2 * params["dim"]
        return None

    def matmul_shape(self, op: str, params: dict) -> tuple[int, int, int] | None:
        """``(m, k, n)`` of the plain matrix product whose measured rate the op is compared with."""
        if op in ("topk", "labels"):
            return params["b"] * params["p"], params["d"], params["q"]
        if op == "loss":
            return params["n"], params["dim"], params["n"]
        return None

    def work(self, op: str, params: dict) -> float:
        """The x axis of the plots: matrix-product work (FLOP)."""
        return self.flops(op, params)

    def build(self, op: str, backend: str, device: str = "cpu", **params):
        return build_case(op, backend, device, **params)

    # hooks of the engine
    def calls(self, op: str, params: dict, device) -> list[tuple[str, str, dict]]:
        """``(row name, backend, builder params)`` of every call timed for one case."""
        return [(b, b, dict(params)) for b in self.backends(op, device)]

    def finish(self, op: str, params: dict, rows: list[dict], built: dict) -> None:
        """Complete the rows of one case (``built``: row name -> ``(fn, inputs)``)."""

    def summarize(self, result: dict) -> None:
        """Add this family's summary to the result dict (after every case)."""


OP_CASES = CaseSet()


def build_case(op: str, backend: str, device: str = "cpu", **params):
    """``(fn, inputs)`` of one case (see the module doc)."""
    if op in ("topk", "labels"):
        return labels_case(op, backend, device, **params)
    if op == "loss":
        return loss_case(backend, device, **params)
    raise ValueError(f"op must be one of {OPS}; got {op!r}")


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------- topk / labels


def labels_inputs(
    b: int, p: int, q: int, d: int, dtype: str = "float32", device="cpu", seed: int = 0, vocab_dtype: str | None = None
):
    """``(patches (b, p, d), vocab (q, d), uniforms (b, n_windows, 2))`` for a square grid and window 2."""
    from sea_kernels.reference import num_windows

    side = int(round(p**0.5))
    if side * side != p:
        raise ValueError(f"labels cases use square grids; p = {p}")
    g = _generator(device, seed)
    patches = torch.randn(b, p, d, generator=g, device=device).to(DTYPES[dtype])
    vocab = torch.randn(q, d, generator=g, device=device).to(DTYPES[vocab_dtype or dtype])
    uniforms = torch.rand(b, num_windows((side, side), 2), 2, generator=g, device=device)
    return patches, vocab, uniforms


def labels_fn(op: str, backend: str, k: int = 10, negate: bool = True):
    """The measured function ``fn(patches, vocab, uniforms)`` of a ``topk``/``labels`` case (no warm-up)."""
    import sea_kernels as sk

    if op not in ("topk", "labels"):
        raise ValueError(f"op must be 'topk' or 'labels'; got {op!r}")
    if backend in ("cpu_fallback", "cpu_fp32"):
        from sea_kernels.cpu import labels as C

        opts = dict(use_cpp=False) if backend == "cpu_fallback" else dict(use_cpp=True, prefilter="fp32")
        if op == "topk":
            return lambda patches, vocab, uniforms: C.cosine_topk(
                patches.reshape(-1, patches.shape[-1]), vocab, k, negate, **opts
            )
        return lambda patches, vocab, uniforms: C.patch_labels(
            patches, vocab, _grid(patches), k, 2, negate, uniforms, **opts
        )
    if op == "topk":
        return lambda patches, vocab, uniforms: sk.cosine_topk(
            patches, vocab, k, negate=negate, backend=backend, validate=False
        )
    return lambda patches, vocab, uniforms: sk.patch_labels(
        patches, vocab, top_n=k, window=2, negate=negate, uniforms=uniforms, backend=backend, validate=False
    )


def _grid(patches):
    side = int(round(patches.shape[1] ** 0.5))
    return side, side


def labels_case(
    op: str, backend: str, device="cpu", *, b, p, q, d, dtype="float32", k=10, negate=True, seed=0, vocab_dtype=None
):
    """``(fn, inputs)`` of one ``cosine_topk`` (``op="topk"``) or ``patch_labels`` (top_n = k, window 2) call."""
    fn = labels_fn(op, backend, k, negate)
    if vocab_dtype is not None:  # the call as SEAAlignmentLoss makes it: its cached mixed-dtype cast, then the op
        from sea_kernels.alignment import SEAAlignmentLoss

        policy = SEAAlignmentLoss()._vocabulary_for

        def fn(patches, vocab, uniforms, op_fn=fn):
            return op_fn(patches, policy(vocab, patches.dtype), uniforms)

    fn(*labels_inputs(1, 16, max(k, 64), 32, dtype, device, seed, vocab_dtype))  # warm-up: imports, extension, compile
    return fn, labels_inputs(b, p, q, d, dtype, device, seed, vocab_dtype)


# ---------------------------------------------------------------------------- loss


def loss_inputs(n: int, dim: int, dtype: str = "float32", device="cpu", scale: float = 14.3, seed: int = 0):
    """``(x, t, log_scale)`` leaves: ``t_i`` correlated with ``x_i`` as in a model being trained."""
    g = _generator(device, seed)
    x = torch.randn(n, dim, generator=g, device=device)
    t = torch.randn(n, dim, generator=g, device=device).mul_(0.7).add_(x, alpha=0.7)
    x = x.to(DTYPES[dtype]).requires_grad_()
    t = t.to(DTYPES[dtype]).requires_grad_()
    log_scale = torch.tensor(float(scale), device=device).log().requires_grad_()
    return x, t, log_scale


def loss_fn(backend: str):
    """The measured function ``fn(x, t, log_scale)``: one loss, forward and backward (no warm-up)."""
    import sea_kernels as sk

    if backend == "cpu_fallback":
        from sea_kernels.cpu import contrastive as C

        def forward(x, t, scale):
            return C.contrastive_loss(x, t, scale, use_cpp=False)
    else:

        def forward(x, t, scale):
            return sk.contrastive_loss(x, t, scale, backend=backend, validate=False)

    def fn(x, t, log_scale):
        x.grad = t.grad = log_scale.grad = None
        loss = forward(x, t, log_scale.exp())
        loss.backward()
        return loss

    return fn


def loss_case(backend: str, device="cpu", *, n, dim, dtype="float32", scale=14.3, seed=0):
    """``(fn, inputs)`` of one ``contrastive_loss`` forward + backward (gradients of x, t and the log-scale)."""
    fn = loss_fn(backend)
    fn(*loss_inputs(64, 16, dtype, device, scale, seed))  # warm-up: imports, extension, compile
    return fn, loss_inputs(n, dim, dtype, device, scale, seed)
