"""Saving a run's state as a checkpoint and restoring it: :class:`Checkpointer`.

It is given the run's stateful objects once (model, optimizer, scheduler, SEA's generator, the
trainer's progress) and saves or restores them by step. Each checkpoint is written into
``.checkpoint-<step>.tmp/``, given the modes a plain ``open`` gives, checksummed and fsynced, then
renamed into place (``os.replace``), so a folder named ``checkpoint-*`` is always complete; only the
last ``keep_last`` are kept. A checkpoint whose weights hold NaN or infinite values is never
written; a failed write (a full disk) removes the partial folder and says how much space a
checkpoint needs. The files: :mod:`.format`; the weights: :mod:`.weights`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from ...errors import free_space, is_write_failure, mib, write_reason, writing
from .format import (
    CONFIG,
    FORMAT,
    MM_PROJECTOR,
    OPTIMIZER,
    STATE,
    TOKENIZER,
    VERSION,
    WEIGHTS,
    CheckpointError,
    checkpoint_name,
    fsync_dir,
    list_checkpoints,
    read_json,
    rng_file,
    seal,
    torch_load,
)
from .weights import mm_projector_state, saved_parameter_names

log = logging.getLogger(__name__)


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary file; a failed write (a full disk) removes it and
    is a :class:`~sea_model.errors.WriteError` naming ``dst``, the space needed and free."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    with writing(dst, need=lambda: Path(src).stat().st_size, partial=tmp):
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _rng_state(sea_generator: torch.Generator) -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "sea": sea_generator.get_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
    }


def _set_rng_state(state: dict, sea_generator: torch.Generator) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    sea_generator.set_state(state["sea"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, g))


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # a DTensor (FSDP2): this rank's shard


def _param_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return _local(p).device if p is not None else torch.device("cpu")


def _tensors(obj):
    """Every tensor inside nested dicts / lists."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _gather_weights(model, names: list[str], main: bool) -> dict[str, torch.Tensor]:
    """Full tensors on the main rank (FSDP shards are all-gathered on every rank, in order)."""
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        p = params[n].detach()
        if hasattr(p, "full_tensor"):  # a DTensor (FSDP2): collective
            p = p.full_tensor()
        if main:
            out[n] = p.to("cpu", copy=True).contiguous()
    return out


class Checkpointer:
    """Saves a run's stateful objects as ``<out_dir>/checkpoint-<step>`` and restores them.

    It is given the objects once (as torchtitan's ``CheckpointManager``): ``model`` (the unwrapped
    model; FSDP2 shards are gathered), ``optimizer``, ``scheduler``, ``generator`` (SEA's sampling
    generator) and ``progress`` (any object with ``state_dict()``/``load_state_dict()`` holding at
    least ``step``, ``samples_seen``, ``elapsed`` and ``world_size``: ``trainer_state.json``), plus
    what describes the run: its ``tokenizer``, ``run_config`` (dict), ``stage``. :meth:`save` is
    collective when ``world > 1`` (the directory must be on a file system every rank sees)."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        model,
        optimizer,
        scheduler,
        generator: torch.Generator,
        progress,
        tokenizer,
        run_config: dict,
        stage: int,
        rank: int = 0,
        world: int = 1,
        keep_last: int = 2,
    ):
        self.out_dir, self.keep_last = Path(out_dir), keep_last
        self.model, self.optimizer, self.scheduler, self.generator = model, optimizer, scheduler, generator
        self.progress, self.tokenizer, self.run_config, self.stage = progress, tokenizer, run_config, stage
        self.rank, self.world = rank, world
        self.last: Path | None = None  # the last checkpoint saved

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def save(self, step: int) -> Path:
        """Write ``checkpoint-<step>`` atomically (into ``.checkpoint-<step>.tmp``: files written,
        given the usual modes, checksummed, fsynced, then renamed; the folder fsynced), keep the
        last ``keep_last``; returns its path. When ``keep_last`` allows, the oldest checkpoints are
        removed before writing, so the disk needs room for ``keep_last`` of them, not one more.

        Raises :class:`CheckpointError` without writing when a saved parameter is not finite, and
        when a write fails (a full disk: the space needed and free), after removing the partial folder."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        name = checkpoint_name(step)
        final, tmp = self.out_dir / name, self.out_dir / f".{name}.tmp"
        names = saved_parameter_names(self.model)
        self._check_finite(names, name)
        weights = _gather_weights(self.model, names, self.main)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        error = self._agree(self._attempt(lambda: self._make_room(final, tmp)) if self.main else None)
        if error is None:
            error = self._agree(self._attempt(lambda: self._write(tmp, step, names, weights, optim)))
        if error is None and self.main:
            error = self._attempt(lambda: self._publish(tmp, final))
        error = self._agree(error)
        if error is not None:
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_error(error, name, weights, optim) from error
        self.last = final
        return final

    @staticmethod
    def _attempt(write) -> Exception | None:
        """Run ``write``; any failure to write (an OSError, safetensors' SafetensorError, torch.save's
        RuntimeError: what a full disk raises) is returned, not raised."""
        try:
            write()
        except Exception as err:
            if not is_write_failure(err):
                raise
            return err
        return None

    def _agree(self, error: Exception | None) -> Exception | None:
        """Every rank's outcome of a write (collective when ``world > 1``): an error if any failed."""
        if self.world == 1:
            return error
        flag = torch.tensor([float(error is not None)], device=_param_device(self.model))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and error is None:
            return OSError(errno.EIO, "another process failed to write its part")
        return error

    def _check_finite(self, names: list[str], name: str) -> None:
        params = dict(self.model.named_parameters())
        bad = [n for n in names if not bool(torch.isfinite(_local(params[n])).all())]
        if self.world > 1:  # FSDP shards differ: agree
            count = torch.tensor([float(len(bad))], device=_param_device(self.model))
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            bad = bad or (["a parameter of another process"] if count.item() else [])
        if bad:
            raise CheckpointError(
                f"not saving {name}: {len(bad)} parameter(s) hold NaN or infinite values (e.g. {bad[0]}): the run "
                f"diverged. Lower train.lr or set train.grad_clip and resume from the last good checkpoint "
                f"({self.last or 'the latest in ' + str(self.out_dir)})"
            )

    def _make_room(self, final: Path, tmp: Path) -> None:
        """Remove partial saves and, when ``keep_last`` allows, the checkpoints the new one will push out."""
        for partial in self.out_dir.glob(".checkpoint-*.tmp"):  # left by a run killed while saving
            shutil.rmtree(partial, ignore_errors=True)
        if self.keep_last >= 2:
            others = [c for c in list_checkpoints(self.out_dir) if c.name != final.name]
            for stale in others[: max(0, len(others) - (self.keep_last - 1))]:
                shutil.rmtree(stale)
        tmp.mkdir(parents=True)

    def _write(self, tmp: Path, step: int, names: list[str], weights: dict, optim: dict) -> None:
        if self.main:
            self._write_main_files(tmp, step, names, weights, optim)
        torch.save(_rng_state(self.generator), tmp / rng_file(self.rank))

    def _write_error(self, err: Exception, name: str, weights: dict, optim: dict) -> CheckpointError:
        need = sum(t.numel() * t.element_size() for t in _tensors([weights, optim]))
        free = free_space(self.out_dir)
        reason = write_reason(err, need, free)
        advice = "Free space or lower train.keep_last" if reason.startswith("no space") else "Fix this"
        return CheckpointError(
            f"cannot write {name} in {self.out_dir}: {reason} (a checkpoint needs about {mib(need)}, "
            f"{mib(free) if free is not None else 'unknown'} free; the partial checkpoint was removed). {advice}, "
            f"then --resume latest"
        )

    def _write_main_files(self, tmp: Path, step: int, names: list[str], weights: dict, optim: dict) -> None:
        from safetensors.torch import save_file

        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt", "sea": f"{FORMAT}-v{VERSION}"})
        torch.save(optim, tmp / OPTIMIZER)
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        (tmp / STATE).write_text(json.dumps({**self.progress.state_dict(), "scheduler": sched}, indent=1))
        self.tokenizer.save_pretrained(str(tmp / TOKENIZER))
        if self.stage == 1:
            torch.save(mm_projector_state(weights), tmp / MM_PROJECTOR)
        info = {
            "format": FORMAT,
            "version": VERSION,
            "stage": self.stage,
            "step": step,
            "model": self.run_config["model"],
            "run": self.run_config,
            "weights": names,
        }
        (tmp / CONFIG).write_text(json.dumps(info, indent=1))

    def _publish(self, tmp: Path, final: Path) -> None:
        """Seal ``tmp`` (modes, checksums, fsync), rename it to ``final`` (replacing a checkpoint of
        the same step), fsync the folder, prune old checkpoints."""
        seal(tmp)
        if final.exists():  # a rerun of this step (after a resume): replace it
            old = self.out_dir / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        fsync_dir(self.out_dir)
        for stale in list_checkpoints(self.out_dir)[: -max(1, self.keep_last)]:
            shutil.rmtree(stale)

    def load(self, ckpt: str | os.PathLike) -> dict:
        """Restore optimizer, scheduler, this rank's RNG states and ``progress`` from ``ckpt``
        (weights are loaded before, by :func:`load_weights`); returns ``trainer_state.json``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        ckpt = Path(ckpt)
        state = read_json(ckpt / STATE)
        for key in ("step", "samples_seen", "elapsed", "world_size", "scheduler"):
            if key not in state:
                raise CheckpointError(f"{ckpt / STATE}: key {key!r} is missing")
        optim = torch_load(ckpt / OPTIMIZER)
        try:
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, optim, options=options)
        except Exception as err:
            raise CheckpointError(f"{ckpt / OPTIMIZER}: does not fit this run's optimizer ({err})") from None
        lambdas = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": lambdas})
        self._load_rng(ckpt, state["world_size"])
        self.progress.load_state_dict(state)
        return state

    def _load_rng(self, ckpt: Path, saved_world: int) -> None:
        if saved_world != self.world:
            log.warning(
                "%s was written by %d process(es), this run has %d: data order is kept, "
                "random streams are not (not an exact continuation)",
                ckpt,
                saved_world,
                self.world,
            )
        rng_path = ckpt / rng_file(self.rank)
        if rng_path.is_file() or saved_world == self.world:
            rng = torch_load(rng_path)
            if not isinstance(rng, dict) or not {"torch", "cuda", "sea", "python", "numpy"} <= set(rng):
                raise CheckpointError(f"{rng_path}: not a sea RNG state")
            _set_rng_state(rng, self.generator)
