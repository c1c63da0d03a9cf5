"""Training metrics: ``metrics.jsonl`` (one strict JSON object per optimizer step: NaN or infinite
values are written as ``null`` and named under ``"nonfinite"``), TensorBoard when installed, the
progress bar's figures, and the loss plot ``loss.png``.

A torn last line of ``metrics.jsonl`` (a run stopped while writing it) is set aside in
``metrics.jsonl.torn`` when a run resumes; any other line that is not a metrics row is an error naming
the file and the line. A failed write (a full disk) is a :class:`~sea_model.errors.WriteError`
naming the file, the space needed and free; no partial line or plot is left."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path

from ..errors import atomic_write, writing

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TORN_SUFFIX = ".torn"


def strict(row: dict) -> dict:
    """``row`` with NaN and infinite numbers as None, their keys listed under ``"nonfinite"``, so
    that every line of ``metrics.jsonl`` is strict JSON."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row
    return {**{k: None if k in bad else v for k, v in row.items()}, "nonfinite": bad}


def read_rows(path: Path) -> tuple[list[tuple[str, dict]], tuple[int, str] | None]:
    """``(rows as (line, row), torn)`` of a ``metrics.jsonl``: ``torn`` is ``(line number, text)`` of
    a last line that is not valid JSON (a run stopped while writing it), else None. Any other line
    that is not a JSON object with a ``step`` is a ``ValueError`` naming the file and the line."""
    lines = [(n, line) for n, line in enumerate(Path(path).read_bytes().decode(errors="replace").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    rows, torn = [], None
    for k, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if k == len(lines) - 1:
                torn = (n, line)
                break
            raise ValueError(
                f"{path} line {n}: not valid JSON ({err}); repair or delete that line, then run again"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path} line {n}: not a metrics row (no integer 'step'); repair or delete that line")
        rows.append((line, row))
    return rows, torn


def _set_aside(path: Path, torn: tuple[int, str]) -> Path:
    aside = path.with_name(path.name + TORN_SUFFIX)
    text = torn[1] + "\n"
    with writing(aside, need=len(text.encode())):
        with open(aside, "a") as f:
            f.write(text)
    log.warning(
        "%s line %d is torn (not valid JSON: a run stopped while writing it); set aside in %s, resuming",
        path,
        torn[0],
        aside,
    )
    return aside


class MetricsLog:
    """``metrics.jsonl`` (rewritten up to ``start_step`` on resume; a torn last line set aside) and
    TensorBoard when installed."""

    def __init__(self, out_dir: Path, start_step: int, tensorboard: bool):
        self.path = out_dir / METRICS_FILE
        kept = []
        if self.path.is_file():
            rows, torn = read_rows(self.path)
            if torn is not None:
                _set_aside(self.path, torn)
            kept = [line for line, row in rows if row["step"] <= start_step]
        atomic_write(self.path, "".join(line + "\n" for line in kept).encode())
        with writing(self.path):
            self.file = open(self.path, "ab", buffering=0)  # unbuffered: a failed write is undone at once
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                log.info("tensorboard is not installed; metrics go to %s only", self.path)

    def write(self, m: dict) -> None:
        data = (json.dumps(strict(m), allow_nan=False) + "\n").encode()
        with writing(self.path, need=len(data)):
            start = self.file.tell()
            try:
                view = memoryview(data)
                while view:
                    view = view[self.file.write(view) :]
            except BaseException:
                with contextlib.suppress(OSError):
                    self.file.truncate(start)  # no torn line
                raise
        if self.writer is not None:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, m["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


_SHOWN = {"L_gen": "loss_gen", "L_align": "loss_align", "tau": "tau", "tok_s": "tokens_per_s"}  # on the bar


def _short(v) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 1000 else f"{v:.3f}"


def record_step(m: dict, progress, seconds: float, history: list, metrics: MetricsLog | None, bar) -> dict:
    """The step's metrics row from :func:`~sea_model.training.step.train_step`'s ``m`` (strict JSON:
    non-finite values as None; written, shown on ``bar``, kept in ``history``); returns it. Skipped
    images are reported in one aggregated line at 1, 10, 100, ... of them."""
    row = {"step": progress.step, "epoch": progress.epoch}
    row.update({k: m[k] for k in ("loss", "loss_gen", "loss_align", "pairs", "tau", "lr", "grad_norm")})
    row.update(tokens_per_s=m["tokens"] / seconds, elapsed=progress.elapsed(), skipped_images=m["skipped_images"])
    if m["skipped"]:
        row["skipped"] = True
    row = strict(row)
    history.append({**row, "pairs_local": m["pairs_local"]})
    if metrics is not None:
        metrics.write(row)
        total, new = progress.skipped_images, m["skipped_images"]
        if new and (total == new or len(str(total)) > len(str(total - new))):  # the first, then 10, 100, ...
            log.warning(
                "data: %d image(s) could not be read so far and were replaced by other samples (e.g. %s); "
                "counted per step in %s as skipped_images",
                total,
                ", ".join(m["skipped_examples"]) or "on another rank",
                METRICS_FILE,
            )
    bar.update(1)
    bar.set_postfix({k: _short(row[key]) for k, key in _SHOWN.items()})
    return row


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss curves (and tau) from ``metrics.jsonl`` into a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss plot")
        return None
    rows = [row for _, row in read_rows(Path(metrics_path))[0]]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "loss"), ("loss_gen", "L_gen"), ("loss_align", "L_align")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(steps, [float("nan") if y is None else y for y in ys], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    taus = [r.get("tau") for r in rows]
    if any(t is not None for t in taus):
        ax2 = ax.twinx()
        ax2.plot(steps, [float("nan") if t is None else t for t in taus], "k:", label="tau")
        ax2.set_ylabel("tau")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(f"{Path(metrics_path).parent.name}")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    atomic_write(png_path, image.getvalue())
    return png_path
