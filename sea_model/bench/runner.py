"""The timing engine: every op, size and backend of some case families, timed, measured, compared, written.

Timing: the backends of one case are built, run once at full size (warm-up), then timed round by
round, each round running every backend once in a rotating order (so that a load change on a
shared machine hits all of them alike), until at least ``min_runs`` rounds and ``budget_s``
seconds (or ``max_runs`` rounds). CPU: wall time of the call (``time.perf_counter``). CUDA: CUDA
events around the call, with the L2 cache flushed before each (as ``triton.testing.do_bench``
does). Reported: median, interquartile range, ratio of medians to the baseline backend.

Memory: CPU, the extra peak RSS of one call in a fresh subprocess (:mod:`sea_model.bench.memory`);
CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the call.

GPU only: TFLOP/s of the op's matrix-product work (:meth:`~sea_model.bench.op_cases.CaseSet.flops`)
and its share of the rate of a plain ``torch.mm`` of the same shape and dtype, measured in the same run.

:func:`run` takes the case families as ``{op: CaseSet}`` (default: the ops, :data:`~sea_model.bench.op_cases.OP_CASES`);
``sea bench`` (:func:`sea_model.bench.run`) adds the Stage-1 training step.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sea_kernels._common import DTYPES

from . import op_cases, report
from .memory import cuda_extra_peak_bytes, extra_peak_bytes

# (device type, mode) -> timing settings
TIMING = {
    ("cpu", "quick"): dict(min_runs=5, max_runs=1000, budget_s=1.0),
    ("cpu", "full"): dict(min_runs=5, max_runs=1000, budget_s=3.0),
    ("cuda", "quick"): dict(min_runs=10, max_runs=1000, budget_s=0.5),
    ("cuda", "full"): dict(min_runs=10, max_runs=1000, budget_s=1.0),
}


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
    a = torch.randn(m, k, device=device, generator=g).to(DTYPES[dtype])
    b = torch.randn(n, k, device=device, generator=g).to(DTYPES[dtype]).T  # (k, n), as vocab.T
    torch.mm(a, b)
    samples = time_round_robin({"mm": (torch.mm, (a, b))}, timer, **settings)["mm"]
    return 2.0 * m * k * n / statistics.median(samples) / 1e12


def time_calls(calls: dict, device, *, min_runs=3, max_runs=1000, budget_s=0.0) -> dict[str, dict]:
    """``{name: summary}`` of ``calls = {name: (fn, inputs)}`` after one warm-up call each (for
    ``sea selfcheck`` and other quick looks)."""
    timer = Timer(torch.device(device))
    for fn, inputs in calls.values():
        fn(*inputs)
    samples = time_round_robin(calls, timer, min_runs=min_runs, max_runs=max_runs, budget_s=budget_s)
    return {name: summarize(s) for name, s in samples.items()}


class _Case:
    """One op and size of a case family on one device: builds, times and measures its calls."""

    def __init__(self, case_set, op, size, params, device, say):
        self.set, self.op, self.size, self.params, self.device, self.say = case_set, op, size, params, device, say
        self.names = case_set.backends(op, device)  # measured backends, the baseline first
        self.calls = case_set.calls(op, params, device)  # ... plus any auxiliary calls
        self.built, self.errors, self.samples, self.peaks, self.mm_tflops = {}, {}, {}, {}, None

    def _error(self, name, err):
        self.errors[name] = _short(err)
        self.say(f"  {self.op} {self.size} {name}: {self.errors[name]}")
        if _is_oom(err):
            torch.cuda.empty_cache()

    def build(self) -> None:
        for name, backend, kwargs in self.calls:
            try:
                fn, inputs = self.set.build(self.op, backend, str(self.device), **kwargs)
                fn(*inputs)  # full-size warm-up
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.built[name] = (fn, inputs)
            except Exception as err:  # record it, go on with the other backends
                self._error(name, err)

    def time(self, timer: Timer, settings: dict) -> None:
        settings = {**settings, "budget_s": settings["budget_s"] * self.set.budget_factor}
        errors: dict[str, str] = {}
        self.samples = time_round_robin(self.built, timer, **settings, errors=errors) if self.built else {}
        for name, err in errors.items():
            self.errors[name] = err
            self.say(f"  {self.op} {self.size} {name}: {err}")
            del self.built[name]
        shape = self.set.matmul_shape(self.op, self.params)
        if self.device.type == "cuda" and shape and self.built:
            try:
                self.mm_tflops = _matmul_tflops(shape, self.params["dtype"], self.device, timer, settings)
            except Exception as err:
                self.say(f"  {self.op} {self.size} torch.mm: {_short(err)}")

    def measure_memory(self, threads, peak_workers) -> None:
        measured = [n for n in self.built if n in self.names]
        if self.device.type == "cuda":
            for name in measured:
                fn, inputs = self.built[name]
                try:
                    self.peaks[name] = cuda_extra_peak_bytes(fn, *inputs)
                except Exception as err:
                    self.say(f"  {self.op} {self.size} {name} memory: {_short(err)}")
                    torch.cuda.empty_cache()
            return

        def peak(name):
            kwargs = {"op": self.op, "backend": name, "device": "cpu", **self.params}
            try:
                return name, extra_peak_bytes(self.set.builder, kwargs, threads=threads)
            except Exception as err:
                self.say(f"  {self.op} {self.size} {name} memory: {_short(err)}")
                return name, None

        with ThreadPoolExecutor(max_workers=max(1, peak_workers)) as pool:
            self.peaks = dict(pool.map(peak, measured))

    def rows(self) -> list[dict]:
        p, op = self.params, self.op
        base = {"op": op, "size": self.size, "shape": self.set.describe(op, p), "params": p}
        base["work"] = self.set.work(op, p)
        flops, rows = self.set.flops(op, p), []
        for name, _, _ in self.calls:
            row = {**base, "backend": name, "baseline": name == self.names[0]}
            if name not in self.names:
                row["auxiliary"] = True
            if name in self.errors:
                rows.append({**row, "error": self.errors[name]})
                continue
            st = summarize(self.samples[name])
            tflops = flops / st["median_s"] / 1e12 if flops and self.device.type == "cuda" else None
            share = tflops / self.mm_tflops if tflops and self.mm_tflops else None
            row.update(st, extra_peak_bytes=self.peaks.get(name), flops=flops, tflops=tflops)
            row.update(matmul_tflops=self.mm_tflops, matmul_share=share, load_average=os.getloadavg()[0], extra={})
            rows.append(row)
        report.add_ratios(rows)
        self.set.finish(op, p, rows, self.built)
        return rows


def _rows_for_case(case: _Case, timer, settings, memory, peak_workers, threads) -> list[dict]:
    case.build()
    case.time(timer, settings)
    if memory:
        case.measure_memory(threads, peak_workers)
    rows = case.rows()
    case.built.clear()
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _units(ops, sizes, case_sets, dev) -> list[tuple]:
    """``(op, size name, params)`` of every case to run."""
    for op in ops:
        if op not in case_sets:
            raise ValueError(f"unknown op {op!r}; ops are {', '.join(case_sets)}")
    units = []
    for op in ops:
        cs = case_sets[op]
        if isinstance(sizes, str):
            units += [(op, name, cs.size_params(op, name, dev)) for name in cs.size_names(op, dev, sizes)]
        else:
            units += [(op, name, dict(p)) for name, p in sizes.get(op, {}).items()]
    if isinstance(sizes, str) and sizes not in op_cases.MODES:
        unknown = [n for n in op_cases.size_list(sizes) if n not in {u[1] for u in units}]
        if unknown:
            raise ValueError(f"unknown size(s) for ops {', '.join(ops)}: {', '.join(unknown)}")
    return units


def _settings(dev, mode: str, **overrides) -> dict:
    """Timing per device and mode; named sizes are timed as ``full``, custom cases as ``quick``."""
    timing = mode if mode in op_cases.MODES else ("quick" if mode == "custom" else "full")
    settings = dict(TIMING[(dev.type, timing)])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def _new_result(dev, mode, ops, settings, memory, case_sets) -> dict:
    return {
        "schema": "sea-bench/1",
        "date": report.now(),
        "command": " ".join(["sea", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "device": dev.type,
        "sizes": mode,
        "ops": ops,
        "titles": {op: case_sets[op].titles.get(op, op) for op in ops},
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


def _device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda; got {device!r}")
    return dev


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="sea bench", unit="case", file=sys.stderr)


def _finish(result: dict, out: Path, plots: bool, wall0: float, echo) -> None:
    """Write table, plots and the final JSON; print the table."""
    json_path, table_path = out / "bench.json", out / "table.md"
    result["load_average"]["end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - wall0
    report.write_table(table_path, result)
    plots_written = report.write_plots(out, result) if plots else []
    result["files"] = {"json": str(json_path), "table": str(table_path), "plots": [str(p) for p in plots_written]}
    report.write_json(json_path, result)
    echo("")
    echo(report.format_table(result["results"]))
    for line in report.stage1_lines(result["stage1"]):
        echo(line)
    echo(
        f"\nwrote {json_path}, {table_path}"
        + (f", {len(plots_written)} plots" if plots_written else "")
        + f" in {result['wall_s']:.0f} s (load average now {os.getloadavg()[0]:.2f})"
    )


def run(
    ops=None,
    sizes="quick",
    device: str = "cpu",
    out: str | os.PathLike = "sea-bench",
    *,
    case_sets: dict | None = None,
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

    ``case_sets``: ``{op: CaseSet}`` (default: the ops). ``sizes``: ``"quick"``, ``"full"``, or
    ``{op: {size name: builder params}}`` (custom cases, e.g. tiny ones for tests). ``threads``: torch
    CPU threads (default: torch's). ``min_runs``, ``max_runs``, ``budget_s``: the timing loop (defaults
    per device and mode, ``TIMING``). ``peak_workers``: CPU peak-memory subprocesses run at once (default 2)."""
    wall0 = time.perf_counter()
    case_sets = case_sets or {op: op_cases.OP_CASES for op in op_cases.OPS}
    ops = list(ops or case_sets)
    mode = sizes if isinstance(sizes, str) else "custom"
    dev = _device(device)
    units = _units(ops, sizes, case_sets, dev)
    if threads:
        torch.set_num_threads(threads)
    settings = _settings(dev, mode, min_runs=min_runs, max_runs=max_runs, budget_s=budget_s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = _new_result(dev, mode, ops, settings, memory, case_sets)
    echo(
        f"sea bench: {', '.join(ops)} ({mode} sizes) on {dev.type}: {report.where(result)}; torch "
        f"{result['versions']['torch']}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    if dev.type == "cpu":
        result["setup_s"]["extensions"] = s = _prepare_cpu()
        echo(f"C++ extensions ready in {s:.1f} s (compiled on a first run; never part of a timing)")
    peak_workers = peak_workers or min(2, os.cpu_count() or 1)
    _run_cases(units, case_sets, dev, result, out, settings, memory, peak_workers, progress, echo, wall0)
    _finish(result, out, plots, wall0, echo)
    return result


def _run_cases(units, case_sets, dev, result, out: Path, settings, memory, peak_workers, progress, echo, wall0):
    """Build, time and measure every case into ``result``; ``OUT/bench.json`` is rewritten after each case
    (a run cut short keeps what it measured)."""
    timer, bar = Timer(dev), _progress(len(units), progress)
    say = bar.write if bar is not None else echo
    families = dict.fromkeys(case_sets[op] for op in result["ops"])
    for op, size, params in units:
        if bar is not None:
            bar.set_postfix_str(f"{op} {size}")
        case = _Case(case_sets[op], op, size, params, dev, say)
        result["results"] += _rows_for_case(case, timer, settings, memory, peak_workers, torch.get_num_threads())
        for cs in families:
            cs.summarize(result)
        result["load_average"]["end"] = list(os.getloadavg())
        result["wall_s"] = time.perf_counter() - wall0
        report.write_json(out / "bench.json", result)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
