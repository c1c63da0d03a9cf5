"""Run every op with every backend available here on random data; report error against the reference and time.

Used by ``sea selfcheck``. Not a test suite (see ``tests/``): a quick look at a new machine. The inputs
are the benchmark cases' (:mod:`sea_model.bench.op_cases`), timed by the one engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sea_kernels import available_backends
from sea_kernels._common import SHORT_DTYPES

from . import op_cases as cases
from .report import markdown_table
from .runner import time_calls

# selfcheck size -> (labels size, loss size) of the benchmark cases
SIZES = {"small": ("medium", "1k"), "full": ("full", "4608-d4096")}
OPS = {"topk": "cosine_topk", "labels": "patch_labels", "loss": "contrastive_loss"}


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    error: str
    ms: float


def _error(op: str, out, grads, ref, ref_grads) -> str:
    if op == "topk":
        err = (out.values - ref.values).abs().max().item()
        return f"{err:.1e} ({(out.indices == ref.indices).float().mean().item():.1%} idx equal)"
    if op == "labels":
        same = ((out.patch == ref.patch) & (out.label == ref.label)).float().mean().item()
        return f"{same:.1%} pairs equal"
    pairs = zip([out, *grads], [ref, *ref_grads])
    return f"{max((a.float() - r.float()).abs().max().item() for a, r in pairs):.1e}"


def _calls(op: str, device, dtype_name: str, size: str) -> dict:
    """``{backend: (fn, inputs)}`` of one op, every backend that runs here on the same inputs."""
    labels_size, loss_size = SIZES[size]
    params = {**(cases.LOSS_SIZES[loss_size] if op == "loss" else cases.LABELS_SIZES[labels_size])}
    params["dtype"] = dtype_name
    backends = [b for b in ("reference", "cpu", "triton") if b in available_backends(OPS[op], device)]
    inputs = (cases.loss_inputs if op == "loss" else cases.labels_inputs)(**params, device=device)
    fns = {b: cases.loss_fn(b) if op == "loss" else cases.labels_fn(op, b) for b in backends}
    return {b: (fn, inputs) for b, fn in fns.items()}


def run(device: str = "cpu", dtype: torch.dtype = torch.float32, size: str = "small") -> list[Row]:
    dev = torch.device(device)
    dtype_name = str(dtype).replace("torch.", "")
    rows: list[Row] = []
    for op in OPS:
        calls = _calls(op, dev, dtype_name, size)
        outputs = {}
        for backend, (fn, inputs) in calls.items():
            out = fn(*inputs)
            grads = [v.grad.clone() for v in inputs] if op == "loss" else []
            outputs[backend] = (out.detach() if op == "loss" else out, grads)
        times = time_calls(calls, dev)
        for backend in calls:
            error = _error(op, *outputs[backend], *outputs["reference"])
            name = "contrastive_loss fwd+bwd" if op == "loss" else OPS[op]
            rows.append(Row(name, backend, dtype_name, error, times[backend]["median_s"] * 1e3))
    return rows


def format_table(rows: list[Row]) -> str:
    head = ["op", "backend", "dtype", "max error vs reference", "time (ms)"]
    return markdown_table(head, [[r.op, r.backend, SHORT_DTYPES[r.dtype], r.error, f"{r.ms:.1f}"] for r in rows])
