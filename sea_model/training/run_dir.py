"""A run's output folder: one run at a time, no silent reuse of another run's checkpoints, rollbacks.

* :func:`lock`: an exclusive ``fcntl`` lock on ``<out_dir>/.lock`` held for the whole run (the
  OS releases it when the process ends, even on a crash); a second ``sea train`` into the same
  folder stops at once, naming the process that holds it.
* :func:`claim`: a fresh run refuses a folder that holds checkpoints (another run's) unless told to
  ``overwrite`` them (they, the metrics, the plot and the adapter export are deleted).
* :func:`branch_from`: resuming from a checkpoint older than the newest makes it the branch point:
  the newer checkpoints move to ``<out_dir>/abandoned-<time>/`` with their metrics rows, so that
  ``--resume latest`` continues the branch that was chosen (the trainer drops the rows after the
  branch point from ``metrics.jsonl``).
* :func:`resume_out_dir`: ``--resume PATH`` continues in the folder that holds PATH, whatever folder
  the checkpoint recorded (it may have been copied or moved); ``--out`` naming another is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path

from ..errors import writing
from . import checkpoint as ckpt
from .metrics import METRICS_FILE, PLOT_FILE, read_rows
from .run_config import CONFIG_FILE

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
OUTPUTS = (METRICS_FILE, PLOT_FILE, ckpt.MM_PROJECTOR, CONFIG_FILE, "tensorboard")


def make(out_dir: Path) -> None:
    """Create ``out_dir``; a path that is a file, or a folder that cannot be written, is a clear error."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"train.out_dir {out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"train.out_dir {out_dir}: cannot be created ({err.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"train.out_dir {out_dir}: not writable (permission denied)")


def lock(out_dir: Path):
    """Hold ``<out_dir>/.lock`` exclusively; returns the open file (closing it releases the lock).
    Another process holding it is a ``ValueError`` naming that process."""
    import fcntl

    path = out_dir / LOCK_FILE
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(
            f"train.out_dir {out_dir} is in use by another sea train ({holder}); wait for it to end, or choose "
            f"another --out"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def claim(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh run in a folder holding checkpoints, unless ``overwrite`` (then delete that
    run's checkpoints and outputs). Partial checkpoint folders left by a crash are removed."""
    for partial in out_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    found = ckpt.list_checkpoints(out_dir)
    if resume or not found:
        return
    if not overwrite:
        raise ValueError(
            f"train.out_dir {out_dir} holds another run's checkpoints ({found[0].name} ... {found[-1].name}): continue "
            f"it with --resume latest, start afresh with --overwrite (deletes them), or choose another --out"
        )
    log.warning("--overwrite: deleting %d checkpoint(s) and the outputs of the previous run in %s", len(found), out_dir)
    for path in found + [out_dir / name for name in OUTPUTS]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def resume_out_dir(resume: str | None, out: str | None) -> str | None:
    """The output folder of ``--resume PATH``: the folder that holds the checkpoint PATH (or PATH, an
    output folder), not the one recorded in it; None for ``latest`` or no resume. ``out`` (``--out``)
    naming another folder is a ``ValueError`` naming both."""
    if not resume or resume == "latest":
        return None
    try:
        holder = ckpt.resolve(resume).parent
    except ckpt.CheckpointError:
        return None  # the run names the problem
    if out is not None and Path(out).resolve() != holder.resolve():
        raise ValueError(
            f"--resume {resume} is in {holder}, but --out is {out}: a run continues in the folder that holds its "
            f"checkpoints. Leave out --out, or copy the checkpoint into {out} and resume from there"
        )
    return str(holder)


def branch_from(out_dir: Path, resume: Path, step: int) -> Path | None:
    """Move the checkpoints of ``out_dir`` newer than ``resume`` (at ``step``), and their metrics
    rows, to ``abandoned-<time>/``; returns that folder, or None when there were none."""
    newer = [c for c in ckpt.list_checkpoints(out_dir) if ckpt.checkpoint_step(c) > step]
    if not newer:
        return None
    aside = out_dir / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-after-{step}"
    aside.mkdir()
    for c in newer:
        os.replace(c, aside / c.name)
    metrics = out_dir / METRICS_FILE
    if metrics.is_file():
        rows = [line for line, row in read_rows(metrics)[0] if row["step"] > step]  # a torn line: set aside later
        text = "".join(line + "\n" for line in rows)
        with writing(aside / METRICS_FILE, need=len(text.encode())):
            (aside / METRICS_FILE).write_text(text)
    log.warning(
        "resuming from %s, older than %s: this is a branch point; the %d newer checkpoint(s) and their metrics moved "
        "to %s, so --resume latest continues from here",
        resume.name,
        newer[-1].name,
        len(newer),
        aside,
    )
    return aside
