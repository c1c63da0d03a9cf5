"""Training metrics: ``metrics.jsonl`` (one strict JSON object per optimizer step: NaN or infinite
values are written as ``null`` and named under ``"nonfinite"``), TensorBoard when installed, the
progress bar's figures, and the loss plot ``loss.png``."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def strict(row: dict) -> dict:
    """``row`` with NaN and infinite numbers as None, their keys listed under ``"nonfinite"``, so
    that every line of ``metrics.jsonl`` is strict JSON."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row
    return {**{k: None if k in bad else v for k, v in row.items()}, "nonfinite": bad}


class MetricsLog:
    """``metrics.jsonl`` (rewritten up to ``start_step`` on resume) and TensorBoard when installed."""

    def __init__(self, out_dir: Path, start_step: int, tensorboard: bool):
        self.path = out_dir / METRICS_FILE
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= start_step:
                    kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                log.info("tensorboard is not installed; metrics go to %s only", self.path)

    def write(self, m: dict) -> None:
        self.file.write(json.dumps(strict(m), allow_nan=False) + "\n")
        self.file.flush()
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
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
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
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
