"""Extra peak memory of one call, measured where it is honest.

CPU (:func:`extra_peak_bytes`): a fresh subprocess builds the case (the builder does its imports
and loads any compiled extension, e.g. by running the op once on a tiny input), resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``), runs the call once and reads
``VmHWM - VmRSS(before)`` from ``/proc/self/status``: the call's extra peak resident memory.
(``ru_maxrss`` would not do: it carries the parent's peak across fork + exec, so a parent that
holds large tensors would hide the call's peak.) Linux only.

CUDA (:func:`cuda_extra_peak_bytes`): ``torch.cuda.max_memory_allocated`` around the call, above
what was allocated before it, after a warm-up call.

Usage: ``extra_peak_bytes("sea_model.bench.op_cases:build_case", {"op": "labels", "backend": "cpu",
"b": 2, ...})``: the named function takes the keyword arguments and returns ``(fn, inputs)``;
``fn(*inputs)`` is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import gc, importlib, json, sys
import torch

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

spec = json.loads(sys.argv[1])
mod, name = spec["case"].split(":")
fn, inputs = getattr(importlib.import_module(mod), name)(**spec["kwargs"])
gc.collect()
try:  # hand memory freed by the warm-up back to the OS (glibc), so the call's pages count again
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except Exception:
    pass
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = status_kib("VmRSS")
fn(*inputs)
print(json.dumps({"extra_peak_bytes": max(0, status_kib("VmHWM") - before) * 1024}))
"""

# The folder that holds the sea_model package (the checkout, or site-packages when installed).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def extra_peak_bytes(case: str, kwargs: dict, *, threads: int | None = None, timeout: float | None = None) -> int:
    """Extra peak RSS (bytes) of one call of the case, in a fresh subprocess (CPU).

    ``threads``: torch CPU threads in the subprocess (``OMP_NUM_THREADS``); buffers per thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    spec = json.dumps({"case": case, "kwargs": kwargs})
    out = subprocess.run([sys.executable, "-c", _CHILD, spec], env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"peak-memory subprocess for {case} {kwargs} failed:\n{tail}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_bytes"])


def cuda_extra_peak_bytes(fn, *inputs) -> int:
    """Extra peak CUDA memory (bytes) of ``fn(*inputs)`` above what was allocated before it."""
    import torch

    fn(*inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
