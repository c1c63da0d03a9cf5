"""The ``sea bench`` loop: every op, size and backend, timed, measured, compared, written.

Timing: the backends of one case are built, run once at full size (warm-up), then timed round by
round, each round running every backend once in a rotating order (so that a load change on a
shared machine hits all of them alike), until at least ``min_runs`` rounds and ``budget_s``
seconds (or ``max_runs`` rounds). CPU: wall time of the call (``time.perf_counter``). CUDA: CUDA
events around the call, with the L2 cache flushed before each (as ``triton.testing.do_bench``
does). Reported: median, interquartile range, ratio of medians to the baseline backend.

Memory: CPU, the extra peak RSS of one call in a fresh subprocess (:mod:`sea_model.bench.memory`);
CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the call.

GPU only: TFLOP/s of the op's matrix-product work (:func:`sea_model.bench.cases.flops`) and its
share of the rate of a plain ``torch.mm`` of the same shape and dtype, measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import cases, report, stage1
from .memory import cuda_extra_peak_bytes, extra_peak_bytes

# (device type, mode) -> timing settings
TIMING = {
    ("cpu", "quick"): dict(min_runs=5, max_runs=1000, budget_s=1.0),
    ("cpu", "full"): dict(min_runs=5, max_runs=1000, budget_s=3.0),
    ("cuda", "quick"): dict(min_runs=10, max_runs=1000, budget_s=0.5),
    ("cuda", "full"): dict(min_runs=10, max_runs=1000, budget_s=1.0),
}
STAGE1_BUDGET_FACTOR = 3  # the Stage-1 overhead is a small difference of long calls: more rounds
TARGETS = {"demo": 1.05, "llava-7b": 1.01}  # Stage-1 overhead targets of fused SEA (not asserted)
CASE = "sea_model.bench.cases:build_case"


class Timer:
    """Seconds of one call: wall time on CPU, CUDA events (L2 flushed first) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def __call__(self, fn, inputs) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn(*inputs)
            return time.perf_counter() - t0
        self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def time_round_robin(
    calls: dict, timer: Timer, *, min_runs: int, max_runs: int, budget_s: float, errors: dict | None = None
) -> dict[str, list[float]]:
    """``{name: [seconds, ...]}`` for ``calls = {name: (fn, inputs)}``, timed round by round (see the
    module doc). A call that raises leaves the rotation; its error goes to ``errors`` (else it is raised)."""
    names = list(calls)
    samples: dict[str, list[float]] = {n: [] for n in names}
    start, r = time.perf_counter(), 0
    while names:
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, inputs = calls[name]
            try:
                samples[name].append(timer(fn, inputs))
            except Exception as err:
                if errors is None:
                    raise
                errors[name] = _short(err)
                names.remove(name)
                if _is_oom(err):
                    torch.cuda.empty_cache()
        r += 1
        if r >= max_runs or (r >= min_runs and time.perf_counter() - start >= budget_s):
            break
    return samples


def summarize(samples: list[float]) -> dict:
    if len(samples) >= 2:
        q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        q1 = med = q3 = samples[0]
    return {"runs": len(samples), "median_s": med, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "min_s": min(samples)}


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:200]


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _prepare_cpu() -> float:
    """Load (on the first run: compile) the C++ extensions, outside every timing. Returns seconds."""
    from sea_kernels.cpu._build import load_extension

    t0 = time.perf_counter()
    for name in ("labels", "contrastive"):
        load_extension(name)
    return time.perf_counter() - t0


def _matmul_tflops(shape, dtype: str, device, timer: Timer, settings: dict) -> float:
    m, k, n = shape
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=g).to(cases.DTYPES[dtype])
    b = torch.randn(n, k, device=device, generator=g).to(cases.DTYPES[dtype]).T  # (k, n), as vocab.T
    torch.mm(a, b)
    samples = time_round_robin({"mm": (torch.mm, (a, b))}, timer, **settings)["mm"]
    return 2.0 * m * k * n / statistics.median(samples) / 1e12


def stage1_summary(rows: list[dict]) -> dict:
    """Per Stage-1 size: step time per variant (modelled where the LM was cut) and overhead vs SEA off."""
    out = {}
    for size in dict.fromkeys(r["size"] for r in rows if r["op"] == "stage1"):
        these = {r["backend"]: r for r in rows if r["op"] == "stage1" and r["size"] == size and not r.get("error")}
        modelled = any("modelled_step_s" in r.get("extra", {}) for r in these.values())
        key = (lambda r: r["extra"]["modelled_step_s"]) if modelled else (lambda r: r["median_s"])
        steps = {
            b: key(r)
            for b, r in these.items()
            if not r.get("auxiliary") and (not modelled or "modelled_step_s" in r["extra"])
        }
        off = steps.get("sea-off")
        s = {
            "modelled": modelled,
            "step_s": steps,
            "overhead": {b: t / off for b, t in steps.items() if off and b != "sea-off"},
            "tower": next((r["extra"].get("tower") for r in these.values() if r.get("extra", {}).get("tower")), None),
            "target_fused": TARGETS.get(size),
        }
        if modelled:
            r = next(iter(these.values()))
            p = r["params"]
            s["note"] = (
                f"LM: {stage1.built_layers(p)} of {stage1.total_layers(p)} layers built; the "
                f"{stage1.total_layers(p)}-layer step is modelled from the per-layer time measured with SEA off "
                f"({r['extra'].get('per_layer_s', 0) * 1e3:.1f} ms per layer)"
            )
        out[size] = s
    return out


def _rows_for_case(op, size, params, device, timer, settings, memory, peak_workers, threads, say) -> list[dict]:
    shape = cases.describe(op, params)
    base = {"op": op, "size": size, "shape": shape, "params": params, "work": cases.work(op, params)}
    names = cases.backends(op, device)
    built, errors = {}, {}
    calls = [(b, b, dict(params)) for b in names]
    modelled = op == "stage1" and stage1.is_modelled(params)
    if modelled:
        short = params["layers_short"]
        calls.append((f"sea-off ({short} layers)", "sea-off", {**params, "active_layers": short}))
    for name, backend, kwargs in calls:
        try:
            fn, inputs = cases.build_case(op, backend, str(device), **kwargs)
            fn(*inputs)  # full-size warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            built[name] = (fn, inputs)
        except Exception as err:  # record it, go on with the other backends
            errors[name] = _short(err)
            say(f"  {op} {size} {name}: {errors[name]}")
            if _is_oom(err):
                torch.cuda.empty_cache()
    if op == "stage1":
        settings = {**settings, "budget_s": settings["budget_s"] * STAGE1_BUDGET_FACTOR}
    samples = time_round_robin(built, timer, **settings, errors=errors) if built else {}
    for name in [n for n in built if n in errors]:
        say(f"  {op} {size} {name}: {errors[name]}")
        del built[name]
    mm_tflops = None
    if device.type == "cuda" and cases.matmul_shape(op, params) and built:
        try:
            mm_tflops = _matmul_tflops(cases.matmul_shape(op, params), params["dtype"], device, timer, settings)
        except Exception as err:
            say(f"  {op} {size} torch.mm: {_short(err)}")

    peaks: dict[str, int | None] = {}
    if memory:
        measured = [n for n in built if n in names]
        if device.type == "cuda":
            for name in measured:
                fn, inputs = built[name]
                try:
                    peaks[name] = cuda_extra_peak_bytes(fn, *inputs)
                except Exception as err:
                    say(f"  {op} {size} {name} memory: {_short(err)}")
                    torch.cuda.empty_cache()
        else:

            def peak(name):
                kwargs = {"op": op, "backend": name, "device": "cpu", **params}
                try:
                    return name, extra_peak_bytes(CASE, kwargs, threads=threads)
                except Exception as err:
                    say(f"  {op} {size} {name} memory: {_short(err)}")
                    return name, None

            with ThreadPoolExecutor(max_workers=max(1, peak_workers)) as pool:
                peaks = dict(pool.map(peak, measured))

    rows = []
    baseline = names[0]
    flops = cases.flops(op, params)
    for name, _, _ in calls:
        row = {**base, "backend": name, "baseline": name == baseline}
        if name != baseline and name not in names:
            row["auxiliary"] = True
        if name in errors:
            rows.append({**row, "error": errors[name]})
            continue
        st = summarize(samples[name])
        row.update(st)
        row["extra_peak_bytes"] = peaks.get(name)
        row["flops"] = flops
        row["tflops"] = flops / st["median_s"] / 1e12 if flops and device.type == "cuda" else None
        row["matmul_tflops"] = mm_tflops
        row["matmul_share"] = row["tflops"] / mm_tflops if row["tflops"] and mm_tflops else None
        row["load_average"] = os.getloadavg()[0]
        row["extra"] = {}
        if op == "stage1":
            row["extra"]["tower"] = getattr(built[name][0], "tower_kind", None)
        rows.append(row)
    report.add_ratios(rows)
    if modelled:
        by = {r["backend"]: r for r in rows if not r.get("error")}
        aux = by.get(calls[-1][0])
        off = by.get("sea-off")
        if aux and off:
            n_built, n_short, n_total = stage1.built_layers(params), params["layers_short"], stage1.total_layers(params)
            per_layer = max(0.0, (off["median_s"] - aux["median_s"]) / (n_built - n_short))
            for r in by.values():
                r["extra"]["per_layer_s"] = per_layer
                if not r.get("auxiliary"):
                    r["extra"]["modelled_step_s"] = r["median_s"] + (n_total - n_built) * per_layer
                    r["extra"]["layers_modelled"] = n_total
    del built
    if op == "stage1":
        stage1.clear_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(
    ops=None,
    sizes="quick",
    device: str = "cpu",
    out: str | os.PathLike = "sea-bench",
    *,
    threads: int | None = None,
    min_runs: int | None = None,
    max_runs: int | None = None,
    budget_s: float | None = None,
    memory: bool = True,
    plots: bool = True,
    progress: bool = True,
    peak_workers: int | None = None,
    echo=print,
) -> dict:
    """Run the benchmarks; write ``OUT/bench.json``, ``OUT/table.md`` and ``OUT/<op>.png``; return the result dict.

    ``sizes``: ``"quick"``, ``"full"``, or ``{op: {size name: builder params}}`` (custom cases, e.g.
    tiny ones for tests). ``threads``: torch CPU threads (default: torch's). ``min_runs``,
    ``max_runs``, ``budget_s``: the timing loop (defaults per device and mode, ``TIMING``).
    ``peak_workers``: CPU peak-memory subprocesses run at once (default 2)."""
    wall0 = time.perf_counter()
    ops = list(ops or cases.OPS)
    for op in ops:
        if op not in cases.OPS:
            raise ValueError(f"unknown op {op!r}; ops are {', '.join(cases.OPS)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda; got {device!r}")
    if threads:
        torch.set_num_threads(threads)
    mode = sizes if isinstance(sizes, str) else "custom"
    settings = dict(TIMING[(dev.type, mode if mode in cases.MODES else "quick")])
    for key, value in (("min_runs", min_runs), ("max_runs", max_runs), ("budget_s", budget_s)):
        if value is not None:
            settings[key] = value
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    units = []
    for op in ops:
        if isinstance(sizes, str):
            units += [(op, name, cases.size_params(op, name, dev)) for name in cases.size_names(op, dev, sizes)]
        else:
            units += [(op, name, dict(p)) for name, p in sizes.get(op, {}).items()]

    result = {
        "schema": "sea-bench/1",
        "date": report.now(),
        "command": " ".join(["sea", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "device": dev.type,
        "sizes": mode,
        "ops": ops,
        "settings": {**settings, "memory": memory, "threads": torch.get_num_threads()},
        "machine": report.machine(dev.type),
        "versions": report.versions(),
        "git": report.git_revision(),
        "load_average": {"start": list(os.getloadavg())},
        "setup_s": {},
        "results": [],
        "stage1": {},
        "notes": [],
    }
    m = result["machine"]
    where = m["gpu"]["name"] if m.get("gpu") else f"{m['cpu']}, {m['cores']} cores"
    echo(
        f"sea bench: {', '.join(ops)} ({mode} sizes) on {dev.type}: {where}; torch {result['versions']['torch']}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    if dev.type == "cpu":
        result["setup_s"]["extensions"] = s = _prepare_cpu()
        echo(f"C++ extensions ready in {s:.1f} s (compiled on a first run; never part of a timing)")
    timer = Timer(dev)
    json_path, table_path = out / "bench.json", out / "table.md"

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(units), desc="sea bench", unit="case", file=sys.stderr)
        except ImportError:
            pass

    def say(text):
        (bar.write if bar is not None else echo)(text)

    peak_workers = peak_workers or min(2, os.cpu_count() or 1)
    for op, size, params in units:
        if bar is not None:
            bar.set_postfix_str(f"{op} {size}")
        rows = _rows_for_case(
            op, size, params, dev, timer, settings, memory, peak_workers, torch.get_num_threads(), say
        )
        result["results"] += rows
        result["stage1"] = stage1_summary(result["results"])
        result["load_average"]["end"] = list(os.getloadavg())
        result["wall_s"] = time.perf_counter() - wall0
        report.write_json(json_path, result)  # after every case: a run cut short keeps what it measured
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    for size, s in result["stage1"].items():
        if s.get("modelled"):
            result["notes"].append(f"stage1 {size}: {s['note']}")
    result["load_average"]["end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - wall0
    report.write_table(table_path, result)
    plots_written = report.write_plots(out, result) if plots else []
    result["files"] = {"json": str(json_path), "table": str(table_path), "plots": [str(p) for p in plots_written]}
    report.write_json(json_path, result)
    table = report.format_table(result["results"])
    lines = report.stage1_lines(result["stage1"])
    echo("")
    echo(table)
    for line in lines:
        echo(line)
    echo(
        f"\nwrote {json_path}, {table_path}"
        + (f", {len(plots_written)} plots" if plots_written else "")
        + f" in {result['wall_s']:.0f} s (load average now {os.getloadavg()[0]:.2f})"
    )
    return result
