"""What the Triton kernels share: the dot precision, the config lists and the one launcher.

Every kernel is launched by keyword through :func:`launch`: autotuned over its config list on a GPU
for large calls, otherwise one fixed config (small calls would spend more on tuning than they save).
``TUNING`` (environment ``SEA_TRITON_TUNING``) changes that: ``"off"`` always runs the fixed config
(reproducible: timing-based tuning may pick other tiles in another run or on another DDP rank, and
the tiles change the float32 summation order); ``"force"`` tunes every call, also under the
interpreter, where Triton's timing is replaced by a deterministic stand-in (the first config tried
wins) so that the tests run the tuner's key, pruning, hooks and selection as a GPU does.
``tests/test_compile_gate.py`` compiles every config either path can launch for sm_80 and sm_90.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable

import torch
import triton

from .._common import triton_interpret

INTERPRET = triton_interpret()
# input_precision of tl.dot for float32 operands: "ieee" (CUDA cores, as the eager reference's float32
# matmuls; "tf32" would round the inputs to 10-bit mantissas). Module attribute so that a caller can
# choose "tf32x3" (three TF32 products, close to float32; its 2x-reference accuracy is unverified).
F32_DOT = "ieee"
TUNINGS = ("auto", "off", "force")
TUNING = os.environ.get("SEA_TRITON_TUNING", "auto")
# Compute capability the configs are pruned for off CUDA (the interpreter): 0 keeps the configs meant
# for every GPU; tests set 90 or 80 to prune as on an H100 or an A100.
EMULATED_ARCH = 0


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``.

    float32: ``F32_DOT``. 16-bit operands ignore it (their products are exact in the float32
    accumulator); "tf32" is Triton's default. The interpreter computes every dot in float32.
    """
    return F32_DOT if dtype == torch.float32 else "tf32"


def config(c: dict) -> triton.Config:
    """``triton.Config`` from a dict with the block sizes and optional ``warps`` / ``stages`` / ``archs``
    (the compute capabilities it is for, e.g. ``(90,)`` for a tile that spills registers on sm_80) /
    ``regs`` (ptxas's register cap per thread, ``.maxnreg``: None lets ptxas choose, which for some
    kernels means fewer registers and a few bytes of spills)."""
    c = dict(c)
    warps, stages, archs, regs = c.pop("warps", 4), c.pop("stages", 1), c.pop("archs", None), c.pop("regs", None)
    cfg = triton.Config(c, num_warps=warps, num_stages=stages, maxnreg=regs)
    cfg.archs = archs
    return cfg


def for_arch(cfg: triton.Config, arch: int) -> bool:
    """Whether ``cfg`` may run on compute capability ``arch`` (``major * 10 + minor``)."""
    return getattr(cfg, "archs", None) is None or arch in cfg.archs


def arch_of(t: torch.Tensor) -> int:
    """Compute capability of the GPU holding ``t`` (``major * 10 + minor``); ``EMULATED_ARCH`` off CUDA."""
    if t.device.type != "cuda":
        return EMULATED_ARCH
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


def tuner(kernel, key: list[str], half: list[dict], single: list[dict], dtype_arg: str, fits=None, **kwargs):
    """An autotuner over ``half`` (16-bit operands: tensor-core tiles) and ``single`` (float32 operands)
    configs, pruned to the operand dtype of ``dtype_arg`` and by ``fits(config, **constexprs)``."""
    half, single = [config(c) for c in half], [config(c) for c in single]
    ids = {id(c) for c in single}

    def prune(configs, named_args, **kw):
        # the autotuner passes positional arguments as named_args and keyword ones as kw (launch: all)
        args = {**named_args, **kw}
        x = args[dtype_arg]
        want, arch = x.dtype == torch.float32, arch_of(x)
        keep = [c for c in configs if (id(c) in ids) == want and for_arch(c, arch)]
        return [c for c in keep if fits is None or fits(c, **args)]

    bench = _stand_in_bench() if INTERPRET else None
    prune_by = {"early_config_prune": prune}
    tuned = triton.autotune(half + single, key=key, prune_configs_by=prune_by, do_bench=bench, **kwargs)(kernel)
    tuned.half_configs, tuned.single_configs = half, single
    return tuned


def _stand_in_bench() -> Callable:
    """The interpreter's ``do_bench``: runs the call once (hooks and kernel) and returns increasing
    "times", so that of the configs left after pruning the first one tried wins, every time."""
    ticks = itertools.count()

    def bench(kernel_call, quantiles=None):
        kernel_call()
        t = float(next(ticks))
        return [t, t, t] if quantiles else t

    return bench


def tuning() -> str:
    """``TUNING``, checked."""
    if TUNING not in TUNINGS:
        raise ValueError(f"SEA_TRITON_TUNING must be one of {TUNINGS}; got {TUNING!r}")
    return TUNING


def tuned_path(big: bool) -> bool:
    """Whether :func:`launch` takes the autotuned path for a call that is ``big`` (see ``TUNING``)."""
    mode = tuning()
    return mode == "force" or (mode == "auto" and big and not INTERPRET)


def on_device(t: torch.Tensor):
    """Context that makes ``t``'s GPU the current device (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, tuned, fixed: triton.Config, grid: Callable | tuple, big: bool, **kwargs) -> None:
    """Run ``tuned`` (an autotuner over ``kernel``) when :func:`tuned_path` says so; else ``kernel`` with
    ``fixed``.

    ``grid`` is a tuple or a function of the config's block sizes; every argument goes by keyword. It
    runs on the GPU of the first tensor argument, whatever the current device.
    """
    with on_device(next(v for v in kwargs.values() if isinstance(v, torch.Tensor))):
        if tuned_path(big):
            tuned[grid](**kwargs)
            return
        g = grid(fixed.kwargs) if callable(grid) else grid
        regs = {} if fixed.maxnreg is None or INTERPRET else {"maxnreg": fixed.maxnreg}
        kernel[g](**kwargs, **fixed.kwargs, num_warps=fixed.num_warps, num_stages=fixed.num_stages, **regs)
