"""GPU benchmark of the Triton ``cosine_topk`` / ``patch_labels`` against the reference.

Usage: ``python benchmarks/gpu_labels.py OUTDIR [--quick] [--check-only] [--dtypes bf16,fp16]``

Full size: ``M = 18,432`` patches (32 images of 24 x 24), ``q = 41,242`` words, ``d = 768``
(``--quick``: 512 x 4,099 x 256). Per dtype it compiles (autotunes) the kernels, checks them
against the reference (index agreement, and the float64 score gap of the disagreeing indices,
which are near-ties; value error; patch_labels agreement with the same uniforms), then times with
``triton.testing.do_bench`` the Triton ops, the reference ops and a plain ``torch.mm`` of the same
shape in that dtype, and measures the extra peak memory of each call (``--check-only``: compile and
check only; ``sea bench --device cuda`` times the same ops). Prints a table and writes
``OUTDIR/labels.json``. Needs a CUDA GPU; about a minute on an H100, most of it compiling
and autotuning (3 configs x 2 kernels x 2 dtypes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL = dict(b=32, h=24, w=24, q=41242, d=768)
QUICK = dict(b=2, h=16, w=16, q=4099, d=256)
TOP_N, WINDOW, NEGATE = 10, 2, True


def pair_scores(patches, vocab, rows, cols):
    """float64 cosines of selected (patch row, vocab index) pairs, with the op's sign."""
    s = torch.nn.functional.normalize(patches[rows].double(), dim=-1)
    s = (s * torch.nn.functional.normalize(vocab[cols].double(), dim=-1)).sum(-1)
    return -s if NEGATE else s


def check(sk, patches, vocab, flat, u, grid) -> dict:
    fast = sk.cosine_topk(flat, vocab, TOP_N, negate=NEGATE, backend="triton")
    ref = sk.cosine_topk(flat, vocab, TOP_N, negate=NEGATE, backend="reference")
    differ = fast.indices != ref.indices
    rows = torch.arange(flat.shape[0], device=flat.device)[:, None].expand_as(differ)[differ]
    gap = pair_scores(flat, vocab, rows, fast.indices[differ]) - pair_scores(flat, vocab, rows, ref.indices[differ])
    gap = gap.abs()
    out = {
        "topk_index_agreement": differ.logical_not().float().mean().item(),
        "topk_disagreeing_max_true_gap": gap.max().item() if gap.numel() else 0.0,
        "topk_max_value_error_vs_reference": (fast.values - ref.values).abs().max().item(),
    }
    del fast, ref
    kw = dict(grid=grid, top_n=TOP_N, window=WINDOW, negate=NEGATE, uniforms=u)
    fl = sk.patch_labels(patches, vocab, backend="triton", **kw)
    rl = sk.patch_labels(patches, vocab, backend="reference", **kw)
    same = (fl.patch == rl.patch) & (fl.label == rl.label) & (fl.valid == rl.valid)
    out.update(
        labels_agreement=same.float().mean().item(),
        labels_valid_fraction=rl.valid.float().mean().item(),
        labels_max_score_error=(fl.score - rl.score)[same].abs().max().item() if same.any() else 0.0,
    )
    return out


def run_dtype(sk, name: str, sizes: dict, rows: list, quick: bool, check_only: bool = False) -> dict:
    from triton.testing import do_bench

    from sea_kernels.bench.memory import cuda_extra_peak_bytes

    dtype = DTYPES[name]
    b, h, w, q, d = sizes["b"], sizes["h"], sizes["w"], sizes["q"], sizes["d"]
    g = torch.Generator(device="cuda").manual_seed(0)
    patches = torch.randn(b, h * w, d, device="cuda", generator=g).to(dtype)
    vocab = torch.randn(q, d, device="cuda", generator=g).to(dtype)
    flat = patches.reshape(-1, d)
    u = torch.rand(b, (-(-h // WINDOW)) * (-(-w // WINDOW)), 2, device="cuda", generator=g)
    m = flat.shape[0]
    flops = 2.0 * m * q * d

    def topk(backend):
        return lambda: sk.cosine_topk(flat, vocab, TOP_N, negate=NEGATE, backend=backend)

    def labels(backend):
        kw = dict(grid=(h, w), top_n=TOP_N, window=WINDOW, negate=NEGATE, uniforms=u, backend=backend)
        return lambda: sk.patch_labels(patches, vocab, **kw)

    t0 = time.time()
    topk("triton")()  # compiles and autotunes
    labels("triton")()
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    checks = check(sk, patches, vocab, flat, u, (h, w))
    if check_only:
        return dict(dtype=name, m=m, q=q, d=d, compile_and_autotune_s=compile_s, checks=checks)

    calls = {
        ("cosine_topk", "triton"): topk("triton"),
        ("patch_labels", "triton"): labels("triton"),
        ("cosine_topk", "reference"): topk("reference"),
        ("patch_labels", "reference"): labels("reference"),
        ("mm", f"torch.mm {name}"): lambda: torch.mm(flat, vocab.T),
    }
    for (op, backend), fn in calls.items():
        try:
            ms = do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100)
            peak = cuda_extra_peak_bytes(fn)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            ms, peak = None, None
        tflops = flops / ms / 1e9 if ms else None
        rows.append(dict(dtype=name, op=op, backend=backend, ms=ms, tflops=tflops, extra_peak_bytes=peak))
    from sea_kernels.triton import labels as tl_labels

    best = {str(k): str(v) for k, v in getattr(tl_labels._tuned_kernel, "cache", {}).items()}
    return dict(dtype=name, m=m, q=q, d=d, compile_and_autotune_s=compile_s, checks=checks, autotune=best)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--check-only", action="store_true", help="compile and check; no timings")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated, of bf16, fp16, fp32")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_labels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this benchmarks compiled kernels", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import triton

    import sea_kernels as sk

    start = time.time()
    sizes = QUICK if args.quick else FULL
    rows, per_dtype = [], []
    for name in args.dtypes.split(","):
        per_dtype.append(run_dtype(sk, name.strip(), sizes, rows, args.quick, args.check_only))
        print(json.dumps(per_dtype[-1], indent=1), flush=True)

    if rows:
        print(f"\n{'dtype':5} {'op':13} {'backend':15} {'ms':>9} {'TFLOP/s':>8} {'extra peak MiB':>15}")
    for r in rows:
        ms = f"{r['ms']:9.3f}" if r["ms"] is not None else f"{'OOM':>9}"
        tf = f"{r['tflops']:8.1f}" if r["tflops"] is not None else f"{'-':>8}"
        pk = f"{r['extra_peak_bytes'] / 2**20:15.1f}" if r["extra_peak_bytes"] is not None else f"{'-':>15}"
        print(f"{r['dtype']:5} {r['op']:13} {r['backend']:15} {ms} {tf} {pk}")
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        sizes=sizes,
        top_n=TOP_N,
        window=WINDOW,
        negate=NEGATE,
        quick=args.quick,
        rows=rows,
        per_dtype=per_dtype,
        wall_s=time.time() - start,
    )
    os.makedirs(args.outdir, exist_ok=True)
    path = os.path.join(args.outdir, "labels.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
