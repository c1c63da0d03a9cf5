"""Run every op with every backend available here on random data; report error against the reference and time.

Used by ``sea selfcheck``. Not a test suite (see ``tests/``): a quick look at a new machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .contrastive import contrastive_loss
from .dispatch import available_backends
from .labels import cosine_topk, patch_labels


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    error: str
    ms: float


def _timed(fn, device, repeats=3):
    out = fn()  # warm-up: compiles kernels, loads extensions
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return out, statistics.median(times)


def run(device: str = "cpu", dtype: torch.dtype = torch.float32, size: str = "small") -> list[Row]:
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    b, side, d, q, n, dim = (2, 24, 256, 4099, 1000, 256) if size == "small" else (8, 24, 768, 41242, 4096, 4096)
    patches = torch.randn(b, side * side, d, device=dev, generator=g).to(dtype)
    vocab = torch.randn(q, d, device=dev, generator=g).to(dtype)
    uniforms = torch.rand(b, (side // 2) ** 2, 2, device=dev, generator=g)
    x = torch.randn(n, dim, device=dev, generator=g).to(dtype)
    t = torch.randn(n, dim, device=dev, generator=g).to(dtype)
    rows: list[Row] = []

    ref_topk = cosine_topk(patches, vocab, 10, backend="reference")
    ref_labels = patch_labels(patches, vocab, uniforms=uniforms, backend="reference")

    def loss_and_grads(backend):
        xs, ts = x.clone().requires_grad_(), t.clone().requires_grad_()
        scale = torch.tensor(14.0, device=dev, requires_grad=True)
        loss = contrastive_loss(xs, ts, scale, backend=backend)
        loss.backward()
        return loss.detach(), xs.grad, ts.grad, scale.grad

    ref_loss = loss_and_grads("reference")
    for backend in ["reference", "cpu", "triton"]:
        if backend in available_backends("cosine_topk", dev):
            out, ms = _timed(lambda b=backend: cosine_topk(patches, vocab, 10, backend=b), dev)
            err = (out.values - ref_topk.values).abs().max().item()
            same = (out.indices == ref_topk.indices).float().mean().item()
            rows.append(Row("cosine_topk", backend, str(dtype), f"{err:.1e} ({same:.1%} idx equal)", ms))
        if backend in available_backends("patch_labels", dev):
            out, ms = _timed(lambda b=backend: patch_labels(patches, vocab, uniforms=uniforms, backend=b), dev)
            same = ((out.patch == ref_labels.patch) & (out.label == ref_labels.label)).float().mean().item()
            rows.append(Row("patch_labels", backend, str(dtype), f"{same:.1%} pairs equal", ms))
        if backend in available_backends("contrastive_loss", dev):
            out, ms = _timed(lambda b=backend: loss_and_grads(b), dev)
            err = max((a.float() - r.float()).abs().max().item() for a, r in zip(out, ref_loss))
            rows.append(Row("contrastive_loss fwd+bwd", backend, str(dtype), f"{err:.1e}", ms))
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("op", "backend", "dtype", "max error vs reference", "time (ms)")
    body = [(r.op, r.backend, r.dtype.replace("torch.", ""), r.error, f"{r.ms:.1f}") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
