"""Extra peak memory of one call, measured where it is honest.

CPU: a fresh subprocess builds the inputs (the case function also does its imports and loads any
compiled extension, e.g. by running the op once on a tiny input), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs the call once and reads ``VmHWM - VmRSS(before)`` from
``/proc/self/status``: the call's extra peak resident memory. (``ru_maxrss`` would not do: it carries
the parent's peak across fork + exec.)

CUDA: ``torch.cuda.max_memory_allocated`` around the call, after a warm-up.

Usage: ``extra_peak_bytes("benchmarks.cases:labels_case", {"backend": "cpu", ...})`` where the
named function takes the keyword arguments and returns ``(fn, inputs)``; ``fn(*inputs)`` is measured.
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
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = status_kib("VmRSS")
fn(*inputs)
print(json.dumps({"extra_peak_bytes": max(0, status_kib("VmHWM") - before) * 1024}))
"""


def extra_peak_bytes(case: str, kwargs: dict, *, threads: int | None = None) -> int:
    """Extra peak RSS (bytes) of one call of the case, in a fresh subprocess (CPU)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    spec = json.dumps({"case": case, "kwargs": kwargs})
    out = subprocess.run([sys.executable, "-c", _CHILD, spec], env=env, capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_bytes"])


def cuda_extra_peak_bytes(fn, *inputs) -> int:
    import torch

    fn(*inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
