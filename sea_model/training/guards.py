"""What stops a run or skips a step, and when it saves: preemption signals, streaks of non-finite
steps, and the checkpoint schedule that waits for a finite step."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import UserError
from .distributed import Dist

log = logging.getLogger(__name__)


class Preemption:
    """SIGTERM / SIGINT while training ask the loop to save a checkpoint at the end of the current
    step and stop (:meth:`requested`; agreed over ranks); a second SIGINT interrupts at once."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        import signal

        name = signal.Signals(signum).name
        if self.signal == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.signal = name
        log.warning("%s: saving a checkpoint at the end of this step, then stopping", name)

    def __enter__(self) -> Preemption:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)

    def requested(self, dist: Dist, device) -> bool:
        if dist.world == 1:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT / SIGTERM (a Ctrl-C or a scheduler signals the whole
    process group): the main process saves at the end of its step and stops them; they end on
    their own when it is gone."""
    import signal

    for name in Preemption.SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def count_bad_steps(row: dict, bad: int, t: TrainConfig, last: Path | None) -> int:
    """Count skipped (non-finite) steps in a row: a warning for each, an error once there are more
    than ``train.max_bad_steps``; returns the count."""
    if not row.get("skipped"):
        return 0
    bad += 1
    what = " and ".join(k for k in ("loss", "grad_norm") if k in row.get("nonfinite", ())) or "loss"
    if bad > t.max_bad_steps:
        raise UserError(
            f"step {row['step']}: the {what} was not finite for {bad} step(s) in a row (train.max_bad_steps "
            f"{t.max_bad_steps}); stopped without saving. Lower train.lr (now {t.lr:g}) or train.grad_clip (now "
            f"{t.grad_clip:g}) and resume from a checkpoint before the divergence (--resume DIR; the last saved: "
            f"{last or 'none by this run'})"
        )
    log.warning(
        "step %d: the %s is not finite; step skipped (weights unchanged), %d of train.max_bad_steps %d in a row",
        row["step"],
        what,
        bad,
        t.max_bad_steps,
    )
    return bad


def save_due(step: int, total_steps: int, t: TrainConfig, stop: bool, bad: int, pending: bool) -> tuple[bool, bool]:
    """``(save now, save pending)`` after ``step``: every ``save_every`` steps, at the end and when
    preempted; while steps are being skipped (non-finite) a periodic save waits for the next good
    step, so a streak of bad steps never pushes good checkpoints out of ``keep_last``."""
    end = stop or step == total_steps
    due = end or pending or bool(t.save_every and step % t.save_every == 0)
    if due and bad and not end:
        log.warning("step %d: checkpoint postponed until a step is finite again", step)
        return False, True
    return due, False
