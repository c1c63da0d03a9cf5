"""Ahead-of-time compilation of every Triton kernel config the package can launch (no GPU needed).

``cases(full)`` lists the launchable configurations: each kernel, each operand dtype, each config of its
autotune list and its fixed (untuned) config, and for the labels kernel each padded ``k`` (``K_PAD``),
both epilogues and the largest window. ``compile_case`` compiles one for a target (``sm_80``, ``sm_90``)
with ``triton.compile`` and the ``ptxas`` that ships with triton, and reads the cubin: registers, spill
(local memory) bytes, shared memory, and the SASS instruction mix (``nvdisasm``), per loop of the kernel;
and the TTGIR and PTX (``ir_facts``): each dot's accumulator, the width of the global loads.

``python -m sea_kernels.triton.aot [--full] [--arch 90,80] [--jobs N] [--json OUT]`` compiles them in
parallel processes (Triton's cache makes a second run fast) and prints one line per case;
``tests/test_compile_gate.py`` runs the CI subset and ``benchmarks/compile_report.py`` the full matrix.
Runs with ``TRITON_INTERPRET`` unset (the interpreter's kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block (opt-in maximum)
DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


@dataclass
class Case:
    """One launchable kernel configuration."""

    kernel: str  # "module:attribute" of the JITFunction
    name: str  # readable id
    types: dict  # argument name -> Triton type ("*bf16", "i32"); other runtime arguments are i32
    constexprs: dict  # constexpr name -> value (None arguments too)
    warps: int
    stages: int
    div16: list = field(default_factory=list)  # integer arguments specialized as multiples of 16
    tile: dict = field(default_factory=dict)  # for the cost report: BM, BN, BK of the per-tile work
    archs: tuple | None = None  # the compute capabilities the config is launched on (None: all)
    regs: int | None = None  # ptxas register cap (the config's maxnreg; None: ptxas chooses)


def _labels_cases(full: bool) -> list[Case]:
    """Full: every dtype, epilogue, ``K_PAD`` and fitting config (windows 2 and 4). CI: bf16 and fp32,
    each config at the largest ``K_PAD`` it takes and the last at ``K_PAD`` 4, the trainer's call
    (``top_n`` 10, window 2) on the first config and the largest window on the last; fp16 at the
    trainer's call."""
    from . import labels as L

    out = []
    k_pads = [1 << i for i in range(L.MIN_K_PAD.bit_length() - 1, L.MAX_K_PAD.bit_length())]
    for dt in ("bf16", "fp16", "fp32") if full else ("bf16", "fp32", "fp16"):
        configs = [L.config(c) for c in (L.SINGLE_CONFIGS if dt == "fp32" else L.HALF_CONFIGS)]
        if full:
            combos = [(False, k, 1) for k in k_pads] + [
                (True, k, ww) for k in k_pads for ww in (4, 16, 64) if ww <= L.MAX_WW_PAD
            ]
            out += [_labels_case(L, dt, *combo, c) for combo in combos for c in configs if L.fits(c, *combo[1:])]
            continue
        if dt == "fp16":
            out.append(_labels_case(L, dt, True, 16, 4, configs[0]))
            continue
        for c in configs:
            out.append(_labels_case(L, dt, False, max(k for k in k_pads if L.fits(c, k, 1)), 1, c))
        out.append(_labels_case(L, dt, False, 4, 1, configs[-1]))  # small K_PAD: where ptxas spilled by choice
        out.append(_labels_case(L, dt, True, 16, 4, configs[0]))
        out.append(_labels_case(L, dt, True, L.MAX_K_PAD, L.MAX_WW_PAD, configs[-1]))
    return _unique(out)


def _regs(c) -> str:
    return f",r{c.maxnreg}" if c.maxnreg else ""


def _labels_case(L, dt: str, sample: bool, k_pad: int, ww: int, c) -> Case:
    kw = c.kwargs
    ptr = dict(X=f"*{dt}", V=f"*{dt}", INV_X="*fp32", INV_V="*fp32")
    outs = dict(OUT_P="*i64", OUT_L="*i64", OUT_S="*fp32", OUT_OK="*i8", U="*fp32")
    outs_topk = dict(OUT_V="*fp32", OUT_I="*i64")
    ptr.update(outs if sample else outs_topk)
    none = {k: None for k in (outs_topk if sample else outs)}
    const = dict(none, NEGATE=True, SAMPLE=sample, K_PAD=k_pad, WIN={1: 1, 4: 2, 16: 4, 64: 8}[ww], WW_PAD=ww)
    const.update(kw, EVEN_K=True, DOT_PRECISION="ieee" if dt == "fp32" else "tf32")
    what = "patch_labels" if sample else "cosine_topk"
    tiles = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']},w{c.num_warps}s{c.num_stages}{_regs(c)}"
    name = f"labels[{what},{dt},K_PAD={k_pad},WW_PAD={ww},{tiles}]"
    tile = dict(BM=kw["BLOCK_M"], BN=kw["BLOCK_N"], BK=kw["BLOCK_K"])
    div16 = ["D", "stride_b", "stride_p", "stride_v"]
    kernel = "sea_kernels.triton.labels:_labels_kernel"
    return Case(kernel, name, ptr, const, c.num_warps, c.num_stages, div16, tile, getattr(c, "archs", None), c.maxnreg)


def _contrastive_cases(full: bool) -> list[Case]:
    """Full: every config of every list and the fixed ones, each dtype, bf16 GEMMs in each mode, and
    the 16-bit logits kernels also unpromoted (``promote=False``: what promotion costs). CI: bf16 and
    fp32, the fixed configs and the first tuned one (bf16 GEMMs: every mode in the fixed config, the
    default modes in the tuned one); fp16's first tuned GEMM (its own TF32 split). The fixed configs
    are compiled as launched on D and strides that are multiples of 16 (the ``generic`` kernels
    specialize them) and also on any D (``unaligned``: all in the full matrix, in CI the bf16 and fp32
    logits kernels)."""
    from . import contrastive as C

    out = []
    kernels = [
        ("fwd", C._FWD, C._FWD_TUNED, C.FWD_GPU_FIXED),
        ("probs", C._PROBS, C._PROBS_TUNED, C.PROBS_GPU_FIXED),
        ("gemm", C._GEMM, C._GEMM_TUNED, C.GEMM_GPU_FIXED),
    ]
    for dt in ("bf16", "fp16", "fp32"):
        single = dt == "fp32"
        for what, (spec, generic), tuned, fixed in kernels:
            configs = tuned.single_configs if single else tuned.half_configs
            if not full and dt == "fp16":
                configs = configs[:1] if what == "gemm" else []
            chosen = [(spec, c, True) for c in (configs if full else configs[:1])]
            if full or dt != "fp16":
                chosen.append((generic, C.config(fixed[single]), False))
            for jit, c, specialized in chosen:
                for acc in (False, True) if what == "gemm" and full else (True,):
                    for mode in _gemm_modes(C, dt, full or not specialized) if what == "gemm" else (None,):
                        out.append(_contrastive_case(C, what, jit, dt, c, specialized, acc, mode))
                if what != "gemm" and not single and full:
                    out.append(_contrastive_case(C, what, jit, dt, c, specialized, True, None, promote=False))
            if full or (what != "gemm" and dt != "fp16"):  # the generic kernel on any D and strides
                mode = _gemm_modes(C, dt, False)[0] if what == "gemm" else None
                any_d = C.config(fixed[single])
                out.append(_contrastive_case(C, what, generic, dt, any_d, False, True, mode, aligned=False))
        if full or dt == "bf16":
            out += _row_kernel_cases(C, dt)
    return _unique(out)


def _gemm_modes(C, dt: str, every: bool) -> list[str]:
    """The gradient GEMM's ``MODE``s for operands of ``dt``: bfloat16 has three (``BF16_GRAD_MODES``:
    "bf16x2", "bf16", "f16x1"); ``every`` false: only those ``BF16_GRAD_MODES`` selects."""
    if dt != "bf16":
        return [{"fp16": "f16"}.get(dt, "f32")]
    return [m for m in ("bf16x2", "bf16", "f16x1") if every or m in C.BF16_GRAD_MODES]


def _row_kernel_cases(C, dt: str) -> list[Case]:
    out = []
    for jit in (C._inv_norm_kernel, C._normalize_bwd_kernel):
        const = dict(BM=C._ROW_BM, BD=C.ROW_GPU_BD, **({"EPS": C.NORM_EPS} if jit is C._inv_norm_kernel else {}))
        types = {a: "*fp32" for a in jit.arg_names if a.endswith("_ptr")}
        types.update({a: f"*{dt}" for a in ("x_ptr", "v_ptr", "out_ptr") if a in types})
        name = f"contrastive.{jit.fn.__name__}[{dt}]"
        out.append(Case(f"sea_kernels.triton.contrastive:{jit.fn.__name__}", name, types, const, 4, 1))
    return out


def _contrastive_case(
    C, what: str, jit, dt: str, c, specialized: bool, accumulate: bool, mode, promote: bool = True, aligned=True
) -> Case:
    """One config of a contrastive kernel. ``promote``: the logits kernels' ``PROMOTE`` for 16-bit
    operands (False: the unpromoted dot, for the cost report); ``aligned``: the generic kernel's D and
    strides are multiples of 16 (its specialized arguments)."""
    kw = dict(c.kwargs)
    attr = {("fwd", True): "_FWD[0]", ("fwd", False): "_FWD[1]", ("probs", True): "_PROBS[0]"}
    attr.update({("probs", False): "_PROBS[1]", ("gemm", True): "_GEMM[0]", ("gemm", False): "_GEMM[1]"})
    prec = "ieee" if dt == "fp32" else "tf32"
    types = {a: "*fp32" for a in jit.arg_names if a.endswith("_ptr")}
    if what == "gemm":
        types["b_ptr"] = "*fp16" if mode == "f16x1" else f"*{dt}"
        kw.update(ACCUMULATE=accumulate, MODE=mode, DOT_PREC=prec)
    else:
        types.update(x_ptr=f"*{dt}", t_ptr=f"*{dt}")
        kw.update(DOT_PREC=prec, PROMOTE=promote and dt != "fp32")
        if what == "fwd":
            kw["BM"] = C.FWD_GPU_BM[dt == "fp32"]
    tile = dict(BM=kw["BM"], BN=kw["BN"], BK=kw["BK"])
    ints = [a for a in jit.arg_names if not a.endswith("_ptr") and a not in kw]
    if specialized:
        div16 = [a for a in ints if a.startswith("stride") or a in ("D", "K")]
    else:
        div16 = [a for a in ints if a not in jit.do_not_specialize] if aligned else []
    suffix = f",acc={accumulate}" + (f",{mode}" if dt == "bf16" else "") if what == "gemm" else ""
    suffix += ("" if aligned else ",unaligned") + ("" if promote or dt == "fp32" else ",promote=False")
    tiles = "x".join(str(kw[b]) for b in ("BM", "BN", "BK"))
    how = "tuned" if specialized else "fixed"
    name = f"contrastive.{what}[{dt},{tiles},w{c.num_warps}s{c.num_stages}{_regs(c)},{how}{suffix}]"
    kernel = f"sea_kernels.triton.contrastive:{attr[(what, specialized)]}"
    return Case(kernel, name, types, kw, c.num_warps, c.num_stages, div16, tile, getattr(c, "archs", None), c.maxnreg)


def _unique(cases: list[Case]) -> list[Case]:
    seen, out = set(), []
    for c in cases:
        if c.name not in seen:
            seen.add(c.name)
            out.append(c)
    return out


def cases(full: bool = False) -> list[Case]:
    """Every launchable configuration (``full``), or the CI subset (see ``_labels_cases`` and
    ``_contrastive_cases``)."""
    return _labels_cases(full) + _contrastive_cases(full)


def _resolve(path: str):
    import importlib

    module, attr = path.split(":")
    obj = importlib.import_module(module)
    for part in re.findall(r"\w+|\[\d+\]", attr):
        obj = obj[int(part[1:-1])] if part.startswith("[") else getattr(obj, part)
    return obj


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_case(case: Case, arch: int) -> dict:
    """Compile ``case`` for ``sm_<arch>``: its resources and SASS instruction mix (or the error)."""
    from triton.compiler import ASTSource

    fn = _resolve(case.kernel)
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in case.constexprs:
            sig[a] = "constexpr"
        else:
            sig[a] = case.types.get(a, "i32")
            if sig[a].startswith("*") or a in case.div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.perf_counter()
    result = dict(case=case.name, arch=arch, ok=False)
    try:
        k, log = _compile(ASTSource(fn, sig, case.constexprs, attrs), arch, case.warps, case.stages, case.regs)
    except Exception as e:  # reported per case
        result.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        return result
    result.update(ok=True, compile_s=round(time.perf_counter() - t0, 2), shared=int(k.metadata.shared))
    result.update(_cubin_facts(k.asm["cubin"]))
    result.update(_ptxas_facts(log))
    result.update(ir_facts(k.asm["ttgir"], k.asm["ptx"]))
    result["shared_limit"] = SHARED_LIMIT[arch]
    return result


def _ptxas_facts(log: str) -> dict:
    """Registers, spill bytes and stack frame from the ``ptxas -v`` log of Triton's own ptxas run."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and spill):
        raise RuntimeError(f"no ptxas -v log to read: {log[-300:]!r}")
    groups = (int(regs.group(1)), *(int(g) for g in spill.groups()))
    return dict(zip(("registers", "stack", "spill_stores", "spill_loads"), groups))


def _compile(src, arch: int, warps: int, stages: int, regs: int | None = None):
    """``triton.compile`` with the ptxas log: printed by Triton on a fresh compile, else kept from one."""
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": regs} if regs else {}))
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cache = os.path.join(os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache"), "sea-aot")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"{k.hash}.log")
    log = buf.getvalue()
    if "bytes spill" in log:
        with open(path, "w") as f:
            f.write(log)
    elif os.path.exists(path):
        with open(path) as f:
            log = f.read()
    else:  # compiled before this cache existed: clear Triton's entry for it and compile again
        raise RuntimeError(f"no ptxas log kept for {k.hash}; rerun with an empty TRITON_CACHE_DIR")
    return k, log


_COPY = re.compile(r"cp\.async\.c[ag]\.shared\.global(?:\.\w+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)")
_LD16 = re.compile(r"\bld\.global(?:\.\w+)*?\.[bsuf]16\b")
_DOT = re.compile(r"(%[\w#]+)\s*=\s*(?:tt\.dot|ttng\.warp_group_dot)\s+%[\w#]+,\s*%[\w#]+,\s*(%[\w#]+)")


def ir_facts(ttgir: str, ptx: str) -> dict:
    """What the compiled IR says about the loads and the dots: ``ld_global_16``, the PTX's global loads of
    one 16-bit element; ``cp_async``, its asynchronous global-to-shared copies (and of them
    ``cp_async_16``, 16-byte ones); ``dot_acc``, each TTGIR dot's accumulator operand: "zero" (a zero
    constant: the dot starts from zero), "dot" (the result of another dot: one ``tl.dot`` split along
    k), "carried" (a loop's iteration argument, or a block argument) or "other"."""
    zeros = set(re.findall(r"^\s*(%[\w#]+) = arith\.constant dense<0\.0+e\+00>", ttgir, re.M))
    dots = _DOT.findall(ttgir)
    carried = set(re.findall(r"(%[\w#]+) = ", " ".join(re.findall(r"iter_args\(([^)]*)\)", ttgir))))
    kinds = {**{a: "carried" for a in carried}, **{res: "dot" for res, _ in dots}, **{z: "zero" for z in zeros}}
    accs = [kinds.get(acc, "carried" if acc.startswith("%arg") else "other") for _, acc in dots]
    copies = _COPY.findall(ptx)
    return dict(
        ld_global_16=len(_LD16.findall(ptx)),
        cp_async=len(copies),
        cp_async_16=sum(int(n, 0) == 16 for n in copies),
        dot_acc=accs,
    )


def _cubin_facts(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    return dict(
        cubin_registers=int(m.group(1)), static_shared=int(m.group(3)), local=int(m.group(4)), sass=sass_loops(sass)
    )


_INSN = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)(.*?);", re.M)
_LABEL = re.compile(r"^(\.L_x_\d+):", re.M)


def sass_loops(sass: str) -> dict:
    """SASS opcode counts of the whole kernel and of each loop (a backward branch's range, innermost first).

    Returns ``{"all": {op: n}, "loops": [{"start", "end", "ops": {op: n}}]}``; a loop's ``ops`` count only
    the instructions not inside a loop nested in it.
    """
    insns = [(int(m.group(1), 16), m.group(2), m.group(4)) for m in _INSN.finditer(sass)]
    labels = {}
    for m in _LABEL.finditer(sass):
        nxt = _INSN.search(sass, m.end())
        if nxt:
            labels[m.group(1)] = int(nxt.group(1), 16)
    loops = []
    for addr, op, rest in insns:
        target = re.search(r"\(\s*(\.L_x_\d+)\s*\)", rest)
        if op in ("BRA", "JMP") and target and labels.get(target.group(1), addr + 1) <= addr:
            loops.append((labels[target.group(1)], addr))
    loops = sorted(set(loops), key=lambda se: se[1] - se[0])
    owner = {}
    for addr, _op, _ in insns:
        inner = [i for i, (s, e) in enumerate(loops) if s <= addr <= e]
        owner[addr] = inner[0] if inner else None
    out = [{"start": s, "end": e, "ops": {}} for s, e in loops]
    for addr, op, _ in insns:
        if owner[addr] is not None:
            ops = out[owner[addr]]["ops"]
            ops[op] = ops.get(op, 0) + 1
    return {"all": dict(Counter(op for _, op, _ in insns)), "loops": out}


def _run_one(args):
    case, arch = args
    return compile_case(case, arch)


def run(full: bool, archs: list[int], jobs: int, match: str = "") -> list[dict]:
    """Compile every case (whose name contains ``match``) for every arch in ``jobs`` processes
    (``TRITON_INTERPRET`` must be unset)."""
    work = [(c, a) for c in cases(full) for a in archs if (c.archs is None or a in c.archs) and match in c.name]
    if jobs <= 1:
        return [_run_one(w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_run_one, work, chunksize=1))


def problems(result: dict) -> list[str]:
    """Why a compiled case would not run as intended: no compile, register spills, too much shared memory."""
    if not result["ok"]:
        return [f"does not compile: {result.get('error')}"]
    out = []
    if result["spill_stores"] or result["spill_loads"] or result["local"]:
        out.append(f"spills registers ({result['spill_stores']} B stores, {result['spill_loads']} B loads)")
    if result["shared"] + result["static_shared"] > result["shared_limit"]:
        out.append(f"needs {result['shared']} B shared memory > {result['shared_limit']} B")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the full matrix (default: the CI subset)")
    p.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="write every result to this file")
    p.add_argument("--match", default="", help="only the cases whose name contains this")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = run(a.full, [int(x) for x in a.arch.split(",")], a.jobs, a.match)
    bad = 0
    for r in results:
        why = problems(r)
        bad += bool(why)
        facts = f"regs {r['registers']:3d} shared {r['shared']:6d}" if r["ok"] else ""
        print(f"sm_{r['arch']} {'FAIL' if why else 'ok  '} {facts} {r['case']} {'; '.join(why)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cases": [asdict(c) for c in cases(a.full)], "results": results}, f)
    print(f"aot: {len(results)} compiles, {bad} failing, {time.perf_counter() - t0:.0f}s with {a.jobs} jobs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
