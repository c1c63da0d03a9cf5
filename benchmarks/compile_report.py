"""Static cost report of the Triton kernels, from an ahead-of-time compile (no GPU needed).

Usage (from the repository root, TRITON_INTERPRET unset):
    python benchmarks/compile_report.py OUTDIR [--subset] [--jobs N] [--arch 90,80] [--match TEXT]

Compiles every launchable config (``sea_kernels.triton.aot``; ``--subset``: the compile gate's CI
subset) and writes ``OUTDIR/aot.json`` (every result) and ``OUTDIR/report.md``: per kernel and config
registers, spills, shared memory; for the labels kernel the SASS instruction mix per vocabulary tile
at the full-size shape (d = 768, q = 41,242), split into the tensor-core work of the dot (the K loop's
MMA instructions) and the integer/compare work of the running top-k (the tile loop outside the K
loop, plus the merge loop times its measured trip count), both as issue clocks of one SM:

* tensor: ``BLOCK_M * BLOCK_N * d / MACS_PER_CLOCK`` (dense 16-bit tensor-core rate per SM: 2048
  multiply-adds per clock on sm_90, 1024 on sm_80);
* integer/compare, and all other non-tensor instructions: SASS instructions per warp x warps / 4
  (four schedulers per SM, one warp instruction per clock each).

For the loss's logits kernels with 16-bit operands, the cost of promotion (each ``BK`` chunk's dot
from zero, then a round-to-nearest add; ``contrastive.py``'s Precision) against the same config
unpromoted (``promote=False``, full matrix only): registers, SASS instructions of the K loop (one
``BK`` step) and of the whole kernel.

The merge loop's trip count per tile is measured by replaying the kernel's running top-k in
PyTorch on random Gaussian features at the full-size shape (``merge_steps``): a proxy for CLIP
features, stated as such in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

D_FULL, Q_FULL, ROWS_SIM = 768, 41242, 1024
MACS_PER_CLOCK = {90: 2048, 80: 1024}
TENSOR = ("HGMMA", "HMMA", "IMMA", "QGMMA")
INTEGER = (
    "ISETP",
    "SEL",
    "IMAD",
    "IADD3",
    "LOP3",
    "SHF",
    "LEA",
    "PRMT",
    "IMNMX",
    "VIADD",
    "VIMNMX",
    "IABS",
    "FSETP",
    "FSEL",
    "FMNMX",
    "PLOP3",
    "P2R",
    "R2P",
    "SHFL",
    "POPC",
    "FLO",
    "BMSK",
    "SGXT",
    "ICMP",
    "IMUL",
    "IADD",
    "MOV",
    "UMOV",
    "ULOP3",
    "UIADD3",
    "UISETP",
    "USEL",
    "USHF",
    "ULEA",
    "UIMAD",
    "VOTE",
    "VOTEU",
    "CS2R",
)
MEMORY = ("LDG", "STG", "LDS", "STS", "LDGSTS", "LDSM", "UTMALDG", "SYNCS", "LDC", "ULDC", "LDL", "STL", "ATOMS")
CONTROL = ("BAR", "BRA", "BSSY", "BSYNC", "WARPSYNC", "NOP", "EXIT", "DEPBAR", "WARPGROUP", "RET", "CALL")


def categories(ops: dict) -> dict:
    out = {"tensor": 0, "integer": 0, "float": 0, "memory": 0, "control": 0}
    for op, n in ops.items():
        if op.startswith(TENSOR):
            out["tensor"] += n
        elif op in INTEGER:
            out["integer"] += n
        elif op.startswith(MEMORY):
            out["memory"] += n
        elif op.startswith(CONTROL):
            out["control"] += n
        else:
            out["float"] += n
    return out


def merge_steps(block_m: int, block_n: int, k_pad: int, seed: int = 0) -> float:
    """Mean merge-loop trips per vocabulary tile of one program (random features, the full shape).

    In a tile, row r inserts the tile's entries that are in the top ``k_pad`` of everything seen so
    far (the loop extracts in descending order); the program runs the loop body max over its rows of
    that many times.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(ROWS_SIM, D_FULL, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(Q_FULL, D_FULL, generator=g), dim=-1)
    s = -(x @ v.T)  # negate=True, as the trainer calls it
    top = torch.full((ROWS_SIM, k_pad), float("-inf"))
    trips = []
    for n0 in range(0, Q_FULL, block_n):
        tile = s[:, n0 : n0 + block_n]
        both = torch.cat([top, tile], 1)
        new_top, idx = both.topk(k_pad, dim=1)
        inserted = (idx >= k_pad).sum(1)  # the tile's entries that made the top k_pad
        trips.append(inserted.view(-1, block_m).amax(1).float())
        top = new_top
    return float(torch.stack(trips).mean())


def loop_nest(sass: dict):
    """(k loop, tile loop, merge loops) of the labels kernel: the innermost loop with MMA instructions,
    the smallest loop around it, and the other loops inside that one."""
    loops = sass["loops"]
    mma = [i for i, lp in enumerate(loops) if categories(lp["ops"])["tensor"]]
    if not mma:
        return None
    k = mma[0]
    ks, ke = loops[k]["start"], loops[k]["end"]
    outer = [i for i, lp in enumerate(loops) if lp["start"] <= ks and ke <= lp["end"] and i != k]
    if not outer:
        return None
    t = outer[0]
    ts, te = loops[t]["start"], loops[t]["end"]
    merges = [i for i, lp in enumerate(loops) if i not in (k, t) and ts <= lp["start"] and lp["end"] <= te]
    return k, t, merges


def per_tile(case: dict, result: dict, steps: float) -> dict | None:
    """Per vocabulary tile: tensor-core clocks of the dot, and issue clocks of the other work."""
    nest = loop_nest(result["sass"])
    if nest is None:
        return None
    k, t, merges = nest
    loops = result["sass"]["loops"]
    tile = case["tile"]
    warps = case["warps"]
    k_iters = -(-D_FULL // tile["BK"])
    kc, tc = categories(loops[k]["ops"]), categories(loops[t]["ops"])
    mc = {c: sum(categories(loops[i]["ops"])[c] for i in merges) for c in kc}
    per_warp = {c: tc[c] + steps * mc[c] for c in tc}  # outside the K loop, per tile
    k_other = sum(v for c, v in kc.items() if c != "tensor") * k_iters
    arch = result["arch"]
    return dict(
        mma_per_tile=kc["tensor"] * k_iters,
        tensor_clocks=tile["BM"] * tile["BN"] * D_FULL / MACS_PER_CLOCK[arch],
        integer_per_warp=round(per_warp["integer"], 1),
        integer_clocks=per_warp["integer"] * warps / 4,
        other_clocks=(per_warp["float"] + per_warp["memory"] + per_warp["control"]) * warps / 4,
        k_loop_other_clocks=k_other * warps / 4,
        merge_steps=round(steps, 2),
        tile_loop_ops=loops[t]["ops"],
        merge_loop_ops=[loops[i]["ops"] for i in merges],
    )


def k_loop(sass: dict) -> dict | None:
    """The SASS opcode counts of the innermost loop with tensor-core instructions (the K loop)."""
    return next((lp["ops"] for lp in sass["loops"] if categories(lp["ops"])["tensor"]), None)


def promotion_rows(results: list[dict]) -> list[str]:
    """Markdown rows: each promoted logits config next to its ``promote=False`` twin (same arch)."""
    plain = {(r["case"].replace(",promote=False", ""), r["arch"]): r for r in results if ",promote=False" in r["case"]}
    rows = []
    for r in results:
        base = plain.get((r["case"], r["arch"]))
        if base is None or not (r["ok"] and base["ok"]):
            continue
        loops = [k_loop(x["sass"]) or {} for x in (base, r)]
        k_ops = [sum(lp.values()) for lp in loops]
        adds = [lp.get("FADD", 0) for lp in loops]
        total = [sum(x["sass"]["all"].values()) for x in (base, r)]
        rows.append(
            f"| `{r['case']}` | sm_{r['arch']} | {base['registers']} -> {r['registers']} | "
            f"{k_ops[0]} -> {k_ops[1]} | {adds[0]} -> {adds[1]} | {total[0]} -> {total[1]} | "
            f"{base['spill_stores'] + base['spill_loads']} -> {r['spill_stores'] + r['spill_loads']} |"
        )
    return rows


def write_report(out: str, cases: list[dict], results: list[dict], steps: dict, seconds: float) -> None:
    from sea_kernels.triton import aot

    by_name = {c["name"]: c for c in cases}
    lines = [
        "# Static cost report: Triton kernels compiled ahead of time",
        "",
        f"Command: `python benchmarks/compile_report.py OUTDIR` ({len(results)} compiles in {seconds:.0f} s). "
        "Nothing here ran on a GPU: registers, spills and shared memory are ptxas's; instruction counts are "
        "the SASS of the compiled cubin (nvdisasm); clocks are issue-slot estimates (see the script's docstring).",
        f"Merge-loop trips per tile: measured on random Gaussian features (d = {D_FULL}, q = {Q_FULL}, "
        f"{ROWS_SIM} rows, negate), a proxy for CLIP features.",
        "",
        "## Labels kernel, per vocabulary tile at d = 768 (sm_90 and sm_80)",
        "",
        "| config | arch | regs | MMA instr / tile | tensor clk | merge trips | integer instr / warp | "
        "integer clk | other clk (outside K loop) | integer / tensor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = by_name[r["case"]]
        if not r["ok"] or not c["name"].startswith("labels"):
            continue
        t = r.get("per_tile")
        if not t:
            continue
        lines.append(
            f"| `{c['name']}` | sm_{r['arch']} | {r['registers']} | {t['mma_per_tile']} | {t['tensor_clocks']:.0f} "
            f"| {t['merge_steps']} | {t['integer_per_warp']} | {t['integer_clocks']:.0f} | {t['other_clocks']:.0f} "
            f"| {t['integer_clocks'] / t['tensor_clocks']:.2f} |"
        )
    promoted = promotion_rows(results)
    if promoted:
        lines += ["", "## Promotion of the logits' 16-bit dots: unpromoted -> promoted", ""]
        lines += ["| kernel config | arch | regs | K-loop SASS instr | K-loop FADD | kernel SASS instr | spills (B) |"]
        lines += ["|---|---|---|---|---|---|---|", *promoted]
    lines += ["", "## Every compiled config", "", "| kernel config | arch | regs | spills (B) | shared (B) | ok |"]
    lines += ["|---|---|---|---|---|---|"]
    for r in results:
        why = aot.problems(r)
        if r["ok"]:
            spills = r["spill_stores"] + r["spill_loads"]
            lines.append(
                f"| `{r['case']}` | sm_{r['arch']} | {r['registers']} | {spills} | {r['shared']} | "
                f"{'; '.join(why) or 'yes'} |"
            )
        else:
            lines.append(f"| `{r['case']}` | sm_{r['arch']} | | | | {'; '.join(why)} |")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Static cost report of the Triton kernels (AOT compile, no GPU).")
    p.add_argument("out")
    p.add_argument("--subset", action="store_true", help="the compile gate's CI subset only")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--arch", default="90,80")
    p.add_argument("--match", default="", help="only the cases whose name contains this")
    a = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    from dataclasses import asdict

    from sea_kernels.triton import aot

    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    cases = [asdict(c) for c in aot.cases(full=not a.subset)]
    results = aot.run(not a.subset, [int(x) for x in a.arch.split(",")], a.jobs, a.match)
    seconds = time.perf_counter() - t0
    steps = {}
    by_name = {c["name"]: c for c in cases}
    for r in results:
        c = by_name[r["case"]]
        if r["ok"] and c["name"].startswith("labels"):
            key = (c["tile"]["BM"], c["tile"]["BN"], c["constexprs"]["K_PAD"])
            if key not in steps:
                steps[key] = merge_steps(*key)
            r["per_tile"] = per_tile(c, r, steps[key])
    with open(os.path.join(a.out, "aot.json"), "w") as f:
        json.dump({"cases": cases, "results": results, "seconds": seconds}, f)
    write_report(a.out, cases, results, steps, seconds)
    bad = sum(bool(aot.problems(r)) for r in results)
    print(f"compile_report: {len(results)} compiles, {bad} with problems, {seconds:.0f}s; {a.out}/report.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
