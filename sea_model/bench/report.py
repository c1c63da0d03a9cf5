"""What the benchmarks write: the environment, the tables (one formatter), the JSON, the plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

MIB = 2**20


# --------------------------------------------------------------------------- environment


def _cpuinfo() -> dict:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve")


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return round(kib / 2**20, 1)
    except (OSError, StopIteration):
        return None


def machine(device: str) -> dict:
    """CPU model and cores, memory, torch threads, and the GPU when ``device`` is CUDA."""
    import torch

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", cpu.get("Features", "")).split())
    info = {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{cpu.get('cpu family', '?')}/{cpu.get('model', '?')}" if cpu else None,
        "cpu_simd": [f for f in SIMD_FLAGS if f in flags],
        "hypervisor": "hypervisor" in flags,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": None,
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import torch

    import sea_kernels

    return {
        "sea": _version("sea-align") or sea_kernels.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "open_clip": _version("open_clip_torch"),
        "python": platform.python_version(),
    }


def git_revision() -> dict:
    """``{"revision", "dirty"}`` of the checkout that holds this package (None outside a checkout)."""
    here = Path(__file__).resolve().parent

    def git(*args):
        out = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=here, capture_output=True, text=True, timeout=20
        )
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        rev = git("rev-parse", "HEAD")
        dirty = None
        if rev:
            status = git("status", "--porcelain", "--untracked-files=no")
            dirty = bool(status) if status is not None else None
        return {"revision": rev, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- the table


def add_ratios(rows: list[dict]) -> list[dict]:
    """Fill ``ratio`` (median time) and ``peak_ratio`` (extra peak memory) of each row against the
    baseline row of the same op and size (``baseline: True``); None where there is none."""
    base = {(r["op"], r["size"]): r for r in rows if r.get("baseline") and not r.get("error")}
    for r in rows:
        b = base.get((r["op"], r["size"]))
        if r.get("error") or b is None:
            r["ratio"] = r["peak_ratio"] = None
            continue
        r["ratio"] = r["median_s"] / b["median_s"] if b.get("median_s") else None
        p, bp = r.get("extra_peak_bytes"), b.get("extra_peak_bytes")
        r["peak_ratio"] = p / bp if p is not None and bp else None
    return rows


def _ms(seconds) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 10 else f"{ms:.0f}"


def _mib(b) -> str:
    if b is None:
        return "-"
    m = b / MIB
    return f"{m:.2g}" if m < 10 else f"{m:.0f}"


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    """The one table formatter: a Markdown table (``sea bench``, ``sea selfcheck``, the pytest-benchmark summary)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in cells) + " |" for cells in body)])


def _cells(r: dict, gpu: bool) -> list[str]:
    if r.get("error"):
        return [r["op"], r["size"], r["shape"], r["backend"], f"error: {r['error']}"] + [""] * (5 + 2 * gpu)
    cells = [
        r["op"],
        r["size"],
        r["shape"],
        r["backend"] + (" (baseline)" if r.get("baseline") else ""),
        _ms(r["median_s"]),
        _ms(r.get("iqr_s")),
        str(r.get("runs", "-")),
        _x(r.get("ratio")),
        _mib(r.get("extra_peak_bytes")),
        _x(r.get("peak_ratio")),
    ]
    if gpu:
        share = r.get("matmul_share")
        cells += [
            "-" if r.get("tflops") is None else f"{r['tflops']:.1f}",
            "-" if share is None else f"{100 * share:.0f}%",
        ]
    return cells


def format_table(rows: list[dict]) -> str:
    """A Markdown table of result rows: one line per op, size and backend, ratios to the baseline."""
    gpu = any(r.get("tflops") is not None for r in rows)
    head = ["op", "size", "shape", "backend", "median ms", "IQR ms", "runs", "vs baseline", "extra peak MiB"]
    head += ["peak vs baseline"] + (["TFLOP/s", "of matmul"] if gpu else [])
    return markdown_table(head, [_cells(r, gpu) for r in rows])


def stage1_lines(summary: dict) -> list[str]:
    """Human-readable overhead lines of the Stage-1 step summary (see ``runner.stage1_summary``)."""
    lines = []
    for size, s in summary.items():
        how = "modelled" if s.get("modelled") else "measured"
        off = s.get("step_s", {}).get("sea-off")
        parts = [f"Stage-1 step {size} ({how}"]
        if off is not None:
            parts[0] += f", SEA off {_ms(off)} ms"
        parts[0] += "):"
        for variant in ("sea-fused", "sea-reference"):
            ratio = s.get("overhead", {}).get(variant)
            if ratio is not None:
                parts.append(f"{variant} {ratio:.3f}x SEA off ({100 * (ratio - 1):+.1f}%)")
        line = " ".join(parts[:1]) + " " + ", ".join(parts[1:])
        if s.get("note"):
            line += f". {s['note']}"
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- files


def write_json(path, data) -> Path:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file); returns the path."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def plot_op(rows: list[dict], op: str, title: str, path: Path) -> Path | None:
    """Time and extra peak memory against size (log axes), one line per backend; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if r["op"] == op and not r.get("error") and not r.get("auxiliary")]
    if not rows:
        return None
    categorical = op == "stage1"  # sizes differ in kind, not in one scalar
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "median_s", "median time (ms)"),
        (axes[1], "extra_peak_bytes", "extra peak memory (MiB)"),
    ):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = [r for r in rows if r["backend"] == backend and r.get(key) is not None]
            if not pts:
                continue
            xs = [sizes.index(r["size"]) if categorical else r["work"] for r in pts]
            scale = 1e3 if key == "median_s" else 1 / MIB
            ys = [max(r[key] * scale, 1e-3) for r in pts]  # log axis: a zero is drawn at the floor
            ax.plot(xs, ys, marker="o", label=backend)
        ax.set_yscale("log")
        if categorical:
            ax.set_xticks(range(len(sizes)), sizes)
            ax.set_xlabel("size")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("matrix-product work per call (FLOP)")
            for r in rows:
                if r.get("baseline"):
                    ax.annotate(
                        r["size"],
                        (r["work"], max((r.get(key) or 0) * (1e3 if key == "median_s" else 1 / MIB), 1e-3)),
                        fontsize=7,
                        textcoords="offset points",
                        xytext=(3, 3),
                    )
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # e.g. the memory panel of a --no-memory run
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return Path(path)


def where(data: dict) -> str:
    """The machine of a result in a few words: the GPU, or the CPU model and cores."""
    m = data["machine"]
    return m["gpu"]["name"] if m.get("gpu") else f"{m['cpu']}, {m['cores']} cores"


def write_table(path: Path, data: dict) -> Path:
    """``table.md``: a header line (date, machine, versions, load), the table, the Stage-1 overhead lines."""
    load = data.get("load_average", {})
    start, end = (load.get("start") or [None])[0], (load.get("end") or [None])[0]
    header = (
        f"sea bench --sizes {data['sizes']} --device {data['device']}, {data['date']}, {where(data)}, "
        f"torch {data['versions']['torch']}, {data['machine']['torch_threads']} threads, git "
        f"{(data['git'].get('revision') or '?')[:10]}"
        + (" (modified)" if data["git"].get("dirty") else "")
        + (f", load average {start:.2f} -> {end:.2f}" if start is not None and end is not None else "")
    )
    lines = stage1_lines(data.get("stage1", {}))
    Path(path).write_text(
        header + "\n\n" + format_table(data["results"]) + ("\n\n" + "\n".join(lines) if lines else "") + "\n"
    )
    return Path(path)


def write_plots(out_dir: Path, data: dict) -> list[Path]:
    titles = data.get("titles", {})
    written = []
    for op in data["ops"]:
        png = plot_op(data["results"], op, f"{titles.get(op, op)} on {where(data)}", Path(out_dir) / f"{op}.png")
        if png is not None:
            written.append(png)
    return written


def redraw(json_path, out_dir=None) -> list[Path]:
    """Rewrite ``table.md`` and the plots of a ``bench.json`` (e.g. one fetched from a GPU machine)."""
    data = json.loads(Path(json_path).read_text())
    out = Path(out_dir) if out_dir else Path(json_path).parent
    out.mkdir(parents=True, exist_ok=True)
    return [write_table(out / "table.md", data), *write_plots(out, data)]


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m sea_model.bench.report BENCH_JSON [OUT_DIR]  (rewrites table.md and the plots)")
    for path in redraw(*sys.argv[1:]):
        print(path)
