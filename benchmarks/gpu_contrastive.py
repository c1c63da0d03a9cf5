"""GPU benchmark of ``contrastive_loss``: triton against reference (accuracy, time, peak memory).

    python benchmarks/gpu_contrastive.py OUTDIR [--quick] [--check-only]

1. Accuracy at N = 4608, D = 4096, bfloat16 inputs, scale 1/0.07: the loss and the gradients of x, t
   and scale of both backends against the reference run on float64 copies (max abs error).
2. Forward + backward time (``triton.testing.do_bench``, ms) for N in {4608, 16384, 32768} and
   D in {512, 4096} (``--quick``: N = 4608 only), bfloat16 inputs; the reference where memory
   allows (an out-of-memory error is recorded as ``null``). The "matmul floor" is four
   ``N x N x D`` bfloat16 matrix products (``(N, D) @ (D, N)``) measured in the same run: forward,
   recompute, and the two gradient products. Extra peak memory of one call is
   ``torch.cuda.max_memory_allocated`` above the inputs.

``--check-only``: step 1 only (``sea bench --device cuda`` times the loss). Prints a table and writes
``OUTDIR/contrastive.json``. The first triton call of each shape includes
autotuning, which do_bench's warm-up absorbs. About 2-3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SCALE = 1 / 0.07


def _inputs(n, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=g)
    t = (x + 0.8 * torch.randn(n, d, device="cuda", generator=g)).to(dtype)  # matched pairs, some signal
    return x.to(dtype).requires_grad_(), t.requires_grad_(), torch.tensor(SCALE, device="cuda", requires_grad=True)


def _fwd_bwd(backend):
    from sea_kernels import contrastive_loss

    def fn(x, t, s):
        loss = contrastive_loss(x, t, s, backend=backend, validate=False)
        return (loss, *torch.autograd.grad(loss, (x, t, s)))

    return fn


def accuracy(n=4608, d=4096):
    x, t, s = _inputs(n, d, seed=1)
    truth = _fwd_bwd("reference")(*(v.detach().double().requires_grad_() for v in (x, t, s)))
    out = {"N": n, "D": d, "dtype": "bfloat16", "scale": SCALE}
    for backend in ("triton", "reference"):
        got = _fwd_bwd(backend)(x, t, s)
        out[backend] = {
            name: {"max_abs_err": (g.double() - w).abs().max().item(), "max_abs_true": w.abs().max().item()}
            for name, g, w in zip(("loss", "dx", "dt", "dscale"), got, truth)
        }
    del x, t, s, truth
    torch.cuda.empty_cache()
    return out


def _time(fn, *args):
    from triton.testing import do_bench

    return do_bench(lambda: fn(*args), warmup=25, rep=100)


def _peak(fn, *args):
    from sea_kernels.bench.memory import cuda_extra_peak_bytes

    return cuda_extra_peak_bytes(fn, *args)


def _try(what, fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        print(f"  {what}: out of memory", flush=True)
        return None
    finally:
        torch.cuda.empty_cache()


def timing(n, d):
    row = {"N": n, "D": d}
    x, t, s = _inputs(n, d)
    for backend in ("triton", "reference"):
        fn = _fwd_bwd(backend)
        row[f"{backend}_ms"] = _try(f"{backend} N={n} D={d}", functools.partial(_time, fn, x, t, s))
        row[f"{backend}_peak_mib"] = None
        if row[f"{backend}_ms"] is not None:
            peak = _try(f"{backend} peak", functools.partial(_peak, fn, x, t, s))
            row[f"{backend}_peak_mib"] = None if peak is None else peak / 2**20
    del x, t, s
    torch.cuda.empty_cache()
    a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, d, device="cuda", dtype=torch.bfloat16).T
    mm = _try("matmul", functools.partial(_time, torch.mm, a, b))
    row["matmul_floor_ms"] = None if mm is None else 4 * mm
    del a, b
    torch.cuda.empty_cache()
    if row["triton_ms"] and row["matmul_floor_ms"]:
        row["triton_over_floor"] = row["triton_ms"] / row["matmul_floor_ms"]
    if row["triton_ms"] and row["reference_ms"]:
        row["speedup_vs_reference"] = row["reference_ms"] / row["triton_ms"]
    return row


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--quick", action="store_true", help="N = 4608 only")
    ap.add_argument("--check-only", action="store_true", help="the accuracy check only; no timings")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    os.makedirs(args.outdir, exist_ok=True)
    start = time.time()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "reference_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    result["accuracy"] = acc = accuracy()
    print(f"accuracy, N={acc['N']} D={acc['D']} bf16 (max abs error vs float64; max |true| in brackets)")
    for name in ("loss", "dx", "dt", "dscale"):
        tr, rf = acc["triton"][name], acc["reference"][name]
        print(
            f"  {name:7s} triton {tr['max_abs_err']:.3e}  reference {rf['max_abs_err']:.3e}  [{tr['max_abs_true']:.3e}]"
        )
    path = os.path.join(args.outdir, "contrastive.json")

    def save():  # after every step: a run cut short still leaves its results
        result["seconds"] = time.time() - start
        with open(path, "w") as f:
            json.dump(result, f, indent=2)

    save()
    ns = [] if args.check_only else [4608] if args.quick else [4608, 16384, 32768]
    rows = result["timing"] = []
    if ns:
        print(
            "\n     N     D   triton ms  reference ms  4-matmul floor ms  triton/floor  speedup  triton "
            "MiB  reference MiB"
        )
    for n in ns:
        for d in (512, 4096):
            r = timing(n, d)
            rows.append(r)
            print(
                f"{n:6d} {d:5d} {_fmt(r['triton_ms'], '11.2f')} {_fmt(r['reference_ms'], '13.2f')}"
                f" {_fmt(r['matmul_floor_ms'], '18.2f')} {_fmt(r.get('triton_over_floor'), '13.2f')}"
                f" {_fmt(r.get('speedup_vs_reference'), '8.1f')} {_fmt(r['triton_peak_mib'], '11.0f')}"
                f" {_fmt(r['reference_peak_mib'], '14.0f')}",
                flush=True,
            )
            save()
    save()
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
