"""Error study of the bfloat16 backward of the Triton ``contrastive_loss``: each mode of the gradient
GEMMs (``BF16_GRAD_MODES``: hi + lo split, one bfloat16 product, one float16 product) against the rule.

Usage (repository root): ``python benchmarks/loss_precision.py [--quick]``; prints markdown tables.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` with bfloat16 dots computed as a GPU does
(``tests/_gpu_dots.py``: exact products, float32 accumulation, round-to-nearest casts; float16 dots
and casts are the interpreter's own, which compute them so), with the GPU's fixed tile sizes
(64 x 64 x 32; the tests' small interpreter tiles only change the float32 summation order, and run
slower). For every case (``N``, ``D``, scale, kind of pairs) it measures the max error against
float64 (inputs: the same bfloat16 numbers) of the loss, dx, dt and dscale for the eager bfloat16
reference and for each mode, and applies the project's rule (``tests._checks.rule``: at most 2x the
reference's error plus a floor). The loss and dscale do not depend on the mode (the GEMMs only make
dx and dt).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sea_kernels.triton import contrastive as tc  # noqa: E402
from sea_kernels.triton._launch import config  # noqa: E402
from tests._checks import FACTOR, contrastive_floor, loss_and_grads, pairs, rule  # noqa: E402
from tests._gpu_dots import bfloat16_dots  # noqa: E402

# Runs per case: (BF16_GRAD_MODES, BF16_EXACT_DIAGONAL). dx depends only on the mode of dx's GEMM and
# dt only on dt's, so runs "a" and "b" measure the split and one bfloat16 product in each GEMM;
# "c": one float16 product; "d": one bfloat16 product without the diagonal correction.
RUNS = {
    "a": (("bf16x2", "bf16"), True),
    "b": (("bf16", "bf16x2"), True),
    "c": (("f16x1", "f16x1"), True),
    "d": (("bf16", "bf16"), False),
}
GEMM_MODES = {  # name -> (run measuring dx in it, run measuring dt in it, what it is)
    "split": ("a", "b", 'MODE "bf16x2": a split into bfloat16 hi + lo, 2 products'),
    "bf16": ("b", "a", 'MODE "bf16": a rounded once to bfloat16, 1 product, its diagonal term corrected exactly'),
    "f16": ("c", "c", 'MODE "f16x1": a scaled and rounded once to float16, 1 product with float16 copies of t and x'),
    "bf16-plain": ("d", "d", 'MODE "bf16" without the diagonal correction'),
}
# whole-backward modes (dx GEMM, dt GEMM); N^2 D products in all: forward 1 + recompute 1 + the GEMMs'
MODES = {
    "6 products (split, split)": ("split", "split"),
    "5 products (split, bf16)": ("split", "bf16"),
    "5 products (bf16, split)": ("bf16", "split"),
    "4 products (bf16, bf16)": ("bf16", "bf16"),
    "4 products (bf16-plain, bf16-plain)": ("bf16-plain", "bf16-plain"),
    "4 products (f16, f16)": ("f16", "f16"),
}
OUTPUTS = ("loss", "dx", "dt", "dscale")
KINDS = {  # pairs(..., align=, duplicates=) and whether the rows' norms spread over 1e-8 .. 1e8 (with a zero row)
    "random": (0.0, False, False),
    "aligned": (1.0, False, False),
    "aligned4": (4.0, False, False),
    "duplicates": (0.0, True, False),
    "norms": (1.0, False, True),
}
SCALES = (1.0, 14.3, 100.0)  # tau 1, 0.07, 0.01
FULL = dict(n=(37, 89, 151), d=(40, 64, 128, 256))
QUICK = dict(n=(37,), d=(40,))


def gpu_tiles() -> None:
    """The interpreter launches the GPU's fixed tile sizes (fewer, larger programs: faster there)."""
    if not tc._INTERPRET:
        return
    tile = config(dict(BM=64, BN=64, BK=32, GROUP_M=8))
    tc._GEMM_FIXED = tc._PROBS_FIXED = [tile, tile]
    tc._FWD_FIXED = [config(dict(BN=64, BK=32))] * 2
    tc.FWD_BM = (64, 64)


def measure(n: int, d: int, scale: float, kind: str, seed: int) -> dict:
    """``{output: {"ref": e_ref, mode: (e_fast, ok)}}`` of one case: modes of ``GEMM_MODES`` for dx and
    dt, "fused" for the loss and dscale (the same in every run: checked)."""
    align, dup, spread = KINDS[kind]
    x, t = pairs(n, d, torch.bfloat16, seed=seed, align=align, duplicates=dup)
    if spread:  # float16 copies must keep rows of any norm (MODE "f16x1" scales each row)
        g = torch.Generator().manual_seed(seed)
        x = (x.float() * torch.pow(10.0, torch.rand(n, 1, generator=g) * 16 - 8)).bfloat16()
        t = (t.float() * torch.pow(10.0, torch.rand(n, 1, generator=g) * 16 - 8)).bfloat16()
        x[n // 2] = 0.0
    truth = loss_and_grads(x, t, scale, "reference", cast=torch.float64)
    ref = loss_and_grads(x, t, scale, "reference")
    runs = {}
    for name, (modes, diagonal) in RUNS.items():
        tc.BF16_GRAD_MODES, tc.BF16_EXACT_DIAGONAL = modes, diagonal
        runs[name] = loss_and_grads(x, t, scale, "triton")
    out = {}
    for i, (what, r, w) in enumerate(zip(OUTPUTS, ref, truth)):
        out[what] = res = {}
        if what in ("loss", "dscale"):
            assert all(torch.equal(runs["a"][i], f[i]) for f in runs.values()), f"{what} depends on the GEMM mode"
            modes = {"fused": runs["a"][i]}
        else:
            modes = {m: runs[pick[what == "dt"]][i] for m, pick in GEMM_MODES.items()}
        for m, f in modes.items():
            e_fast, res["ref"], _, ok = rule(f.cpu(), r.cpu(), w.cpu(), scale=contrastive_floor(what, w))
            res[m] = (e_fast, ok)
    return out


def _cell(res: dict, mode: str) -> str:
    e_fast, ok = res[mode]
    ratio = e_fast / res["ref"] if res["ref"] > 0 else float("inf")
    return f"{ratio:.2f}{'' if ok else ' **FAIL**'}"


COLUMNS = [("loss", ["fused"]), ("dscale", ["fused"]), ("dx", list(GEMM_MODES)), ("dt", list(GEMM_MODES))]


def _header() -> list[str]:
    print(
        f"Max error against float64 of each fused output / the eager bfloat16 reference's (the rule: at most "
        f"{FACTOR}x the reference's error + a floor; **FAIL** where it does not hold; inf: the reference is exact "
        "and the fused error is within the floor). Gradient GEMM modes:"
    )
    for m, (*_, what) in GEMM_MODES.items():
        print(f"- {m}: {what}")
    print()
    head = ["N", "D", "scale", "pairs"]
    for what, modes in COLUMNS:
        head += [f"{what} e_ref"] + [f"{what} {m}" for m in modes]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))


def _summary(results: list[tuple[tuple, dict]]) -> None:
    print()
    print("| backward | dx GEMM | dt GEMM | worst dx ratio | worst dt ratio | cases failing the rule |")
    print("|---|---|---|---|---|---|")
    for name, (mx, mt) in MODES.items():
        fails, worst = [], {"dx": 0.0, "dt": 0.0}
        for (n, d, scale, kind), res in results:
            bad = [w for w, m in (("loss", "fused"), ("dscale", "fused"), ("dx", mx), ("dt", mt)) if not res[w][m][1]]
            for w, m in (("dx", mx), ("dt", mt)):
                worst[w] = max(worst[w], res[w][m][0] / max(res[w]["ref"], 1e-300))
            if bad:
                fails.append(f"{'+'.join(bad)} at N={n} D={d} scale={scale:g} {kind}")
        failing = f"{len(fails)} of {len(results)}" + (": " + "; ".join(fails) if fails else "")
        print(f"| {name} | {mx} | {mt} | {worst['dx']:.2f} | {worst['dt']:.2f} | {failing} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small grid (a smoke run)")
    a = p.parse_args(argv)
    grid = QUICK if a.quick else FULL
    gpu_tiles()
    default = tc.BF16_GRAD_MODES, tc.BF16_EXACT_DIAGONAL
    _header()
    t0 = time.perf_counter()
    results = []
    with bfloat16_dots():
        for i, case in enumerate(itertools.product(grid["n"], grid["d"], SCALES, KINDS)):
            res = measure(*case, seed=1000 + i)
            results.append((case, res))
            row = [str(case[0]), str(case[1]), f"{case[2]:g}", case[3]]
            for what, modes in COLUMNS:
                row += [f"{res[what]['ref']:.2e}"] + [_cell(res[what], m) for m in modes]
            print("| " + " | ".join(row) + " |", flush=True)
    tc.BF16_GRAD_MODES, tc.BF16_EXACT_DIAGONAL = default
    print(f"\n{len(results)} cases in {time.perf_counter() - t0:.0f} s.")
    _summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
