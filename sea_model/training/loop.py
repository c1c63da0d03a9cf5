"""One training stage, from its configuration to its final checkpoint: :func:`train`.

Stage 1 (pretraining, template ``plain``) trains the adapter and SEA's log-scale with
``L = L_gen + lambda * L_align``; stage 2 (instruction tuning) trains adapter and LLM (and, with
``train.vision_lr``, the vision tower: SEA-PRIME) from a stage-1 output (``train.init_from``).
``global batch = micro batch * accumulation steps * world size``; the accumulation follows.

The loop, top to bottom: processes and device (:mod:`.distributed`), the output folder locked and
claimed (:mod:`.run_dir`), the data checked before the model is built, the model (built under
``train.seed``, weights from ``init_from`` or ``resume``), frozen for the stage, the data stream
(:mod:`.sampler`), DDP/FSDP, AdamW and the schedule, the resumed state (:mod:`.checkpoint`), then
one :func:`~sea_model.training.step.train_step` per optimizer step with its metrics
(:mod:`.metrics`), the guards (:mod:`.guards`: preemption, non-finite steps) and checkpoints
every ``save_every`` steps and at the end. A stage-1 run ends with LLaVA's ``mm_projector.bin``
and a loss plot. A run resumed from a checkpoint continues exactly: on the CPU, the same
per-step losses as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, TrainConfig
from ..data import LlavaDataset, check_data
from ..model import build_model
from . import checkpoint as ckpt
from . import run_dir
from .distributed import Dist, device_and_precision, parallelize, setup_distributed
from .guards import Preemption, count_bad_steps, save_due
from .metrics import PLOT_FILE, MetricsLog, plot_metrics, record_step
from .run_config import write_run_config
from .sampler import batches
from .step import StepState, make_step_state, train_step

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where the run is (checkpointed as ``trainer_state.json``): optimizer steps done, samples
    consumed (the data position), time spent in earlier runs of this output."""

    total_steps: int
    global_batch_size: int
    dataset_size: int
    world_size: int
    step: int = 0
    samples_seen: int = 0
    elapsed_before: float = 0.0
    skipped_images: int = 0  # images that could not be read, over all runs of this output
    started: float = field(default_factory=time.time)

    def advance(self, skipped_images: int = 0) -> None:
        self.step += 1
        self.samples_seen += self.global_batch_size
        self.skipped_images += skipped_images

    @property
    def epoch(self) -> float:
        return self.samples_seen / self.dataset_size

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "epoch": self.epoch,
            "total_steps": self.total_steps,
            "elapsed": self.elapsed(),
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
            "skipped_images": self.skipped_images,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen, self.elapsed_before = state["step"], state["samples_seen"], state["elapsed"]
        self.skipped_images = state.get("skipped_images", 0)  # absent from checkpoints of older versions
        self.started = time.time()


class Start(NamedTuple):
    """Where a run starts from: a checkpoint to resume, a checkpoint to initialise from, or a
    LLaVA ``mm_projector.bin`` (at most one is set)."""

    resume: Path | None
    init_dir: Path | None
    projector: Path | None


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # optimizer steps done (over all runs of this output)
    total_steps: int
    checkpoint: Path | None  # the final checkpoint (None when stopped early)
    history: list[dict]  # this process's metrics, one dict per step of this run
    model: Any = None  # the (unwrapped) SEAModel
    tokenizer: Any = None
    metrics: Path | None = None
    plot: Path | None = None
    mm_projector: Path | None = None
    skipped_images: int = 0  # images that could not be read (replaced by others), over all runs
    preempted: str | None = None  # the signal that stopped the run (a checkpoint was saved first)
    last_checkpoint: Path | None = None  # the last checkpoint this run saved


# --------------------------------------------------------------------------- before the first step


@contextlib.contextmanager
def _output_folder(t: TrainConfig, dist: Dist):
    """The output folder made, locked for the whole run (:mod:`.run_dir`; main rank), claimed
    (another run's checkpoints refused unless ``overwrite``); yields where the run starts from
    (:func:`_start`). The lock is released on the way out, whatever happens."""
    out_dir, held = Path(t.out_dir), None
    try:
        if dist.main:
            run_dir.make(out_dir)
            held = run_dir.lock(out_dir)
            run_dir.claim(out_dir, resume=t.resume is not None, overwrite=t.overwrite)
        dist.barrier()
        yield _start(t, out_dir, dist)
    finally:
        if held is not None:
            held.close()


def _start(t: TrainConfig, out_dir: Path, dist: Dist) -> Start:
    """Where the run starts from, checked; resuming from an older checkpoint makes it a branch point."""
    resume = ckpt.resolve(t.resume, out_dir) if t.resume else None
    init_from = Path(t.init_from) if t.init_from and resume is None else None
    init_dir = ckpt.resolve(init_from) if init_from is not None and init_from.suffix != ".bin" else None
    if resume is not None:
        info = ckpt.read_info(resume)
        if info["stage"] != t.stage:
            raise ckpt.CheckpointError(
                f"--resume {resume} is a stage-{info['stage']} checkpoint; this is stage {t.stage} (use --init_from)"
            )
        if dist.main:
            run_dir.branch_from(out_dir, resume, info["step"])
        dist.barrier()
    return Start(resume, init_dir, init_from if init_dir is None else None)


def _model(cfg: RunConfig, start: Start, tokenizer, device, dist: Dist):
    """``(model, tokenizer)``: built under the seed (random parts are reproducible), weights from
    the checkpoint, frozen for the stage, in training mode."""
    t = cfg.train
    source = start.resume or start.init_dir
    if source is not None:
        tokenizer = ckpt.load_tokenizer(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        model, tokenizer = build_model(cfg.model, tokenizer, device=device, progress=t.progress and dist.main)
    if start.resume is not None:
        ckpt.load_weights(model, start.resume, require_trainable_for_stage=t.stage, vision=t.vision_lr is not None)
    elif start.init_dir is not None:
        ckpt.load_weights(model, start.init_dir)
    elif start.projector is not None:
        ckpt.load_mm_projector(model.adapter, start.projector)
    model.freeze_for_stage(t.stage)
    if t.vision_lr is not None:
        model.tower.requires_grad_(True)
    low = {p.dtype for p in model.parameters() if p.requires_grad} & {torch.bfloat16, torch.float16}
    if low and dist.main:
        log.warning(
            "training %s parameters with AdamW drops small updates; use model.dtype float32 (bf16 autocast stays on)",
            low.pop(),
        )
    model.train()
    return model, tokenizer


def _dataset(cfg: RunConfig, model, tokenizer, entries: list) -> LlavaDataset:
    d = cfg.data
    return LlavaDataset(
        d.json_path,
        d.image_folder,
        tokenizer,
        model.tower.image_processor(),
        num_image_tokens=model.tower.num_patches,
        template=d.template,
        max_length=d.max_length,
        entries=entries,
    )


def _accumulation(t: TrainConfig, dist: Dist) -> int:
    G, mb = t.global_batch_size, t.micro_batch_size
    if G % (mb * dist.world):
        raise ValueError(
            f"train.global_batch_size ({G}) must be a multiple of micro_batch_size ({mb}) x world size ({dist.world})"
        )
    return G // (mb * dist.world)


def _total_steps(t: TrainConfig, dataset_size: int) -> int:
    if t.max_steps is not None:
        return t.max_steps
    return max(1, math.ceil(t.epochs * dataset_size / t.global_batch_size))


def _checkpointer(cfg: RunConfig, state: StepState, progress: Progress, tokenizer) -> ckpt.Checkpointer:
    """The run's checkpointer, given its stateful objects."""
    t, dist = cfg.train, state.dist
    return ckpt.Checkpointer(
        t.out_dir,
        model=state.model,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        generator=state.generator,
        progress=progress,
        tokenizer=tokenizer,
        run_config=cfg.to_dict(),
        stage=t.stage,
        rank=dist.rank,
        world=dist.world,
        keep_last=t.keep_last,
    )


def _resume(checkpointer: ckpt.Checkpointer, start: Start, progress: Progress, dist: Dist) -> None:
    checkpointer.load(start.resume)
    if progress.step > progress.total_steps:
        raise ckpt.CheckpointError(
            f"{start.resume}: at step {progress.step}, past this run's {progress.total_steps} steps (train.max_steps)"
        )
    if dist.main:
        done = progress.step == progress.total_steps
        log.info("resumed from %s at step %d%s", start.resume, progress.step, "; complete: exporting" * done)


def _outputs(cfg: RunConfig, start_step: int, dist: Dist) -> MetricsLog | None:
    """The main rank's metrics log (cut back to ``start_step``) and ``run_config.yaml``."""
    if not dist.main:
        return None
    write_run_config(cfg, Path(cfg.train.out_dir))
    return MetricsLog(Path(cfg.train.out_dir), start_step, cfg.train.tensorboard)


# --------------------------------------------------------------------------- the steps and the end


def _steps(cfg, state, stream, accum, progress, checkpointer, metrics, device, callback) -> tuple[list, str | None]:
    """Optimizer steps until the last (or a stop): ``(this run's metrics rows, the stopping signal)``;
    ``callback(step, row, model)`` after each."""
    t, dist = cfg.train, state.dist
    history, bad, pending = [], 0, False
    show = t.progress and dist.main
    desc = f"stage {t.stage}"
    bar = tqdm(total=progress.total_steps, initial=progress.step, desc=desc, unit="step", disable=not show)
    progress.started = time.time()
    with Preemption() as preemption:
        while progress.step < progress.total_steps:
            t0 = time.time()
            m = train_step(state, stream, accum)
            progress.advance(m["skipped_images"])
            row = record_step(m, progress, time.time() - t0, history, metrics, bar)
            bad = count_bad_steps(row, bad, t, checkpointer.last)
            if callback is not None:
                callback(progress.step, row, state.model)
            stop = preemption.requested(dist, device)
            save, pending = save_due(progress.step, progress.total_steps, t, stop, bad, pending)
            if save:
                checkpointer.save(progress.step)
            if stop or (t.stop_after is not None and t.stop_after <= progress.step < progress.total_steps):
                break
    bar.close()
    return history, preemption.signal


def _finish(result: TrainResult, t: TrainConfig, saved: Path | None, metrics: MetricsLog | None, dist: Dist):
    """The end: metrics closed; when the run is complete, the loss plot and (stage 1) the LLaVA
    adapter export ``<out_dir>/mm_projector.bin`` (also when a resume finds the run complete:
    a run killed after its last checkpoint finishes its export)."""
    finished = result.step == result.total_steps
    result.checkpoint = saved if finished else None
    if metrics is not None:
        metrics.close()
        result.metrics = metrics.path
        if finished and t.plot:
            result.plot = plot_metrics(metrics.path, result.out_dir / PLOT_FILE)
    if finished and t.stage == 1 and saved is not None and dist.main:
        projector = saved / ckpt.MM_PROJECTOR
        if projector.is_file():
            result.mm_projector = result.out_dir / ckpt.MM_PROJECTOR
            ckpt.atomic_copy(projector, result.mm_projector)
    dist.barrier()
    if dist.created:
        torch.distributed.destroy_process_group()
    return result


def train(cfg: RunConfig, *, tokenizer=None, callback: Callable[[int, dict, Any], None] | None = None) -> TrainResult:
    """Run one stage as configured; see the module docstring. ``tokenizer`` is used when there is
    no checkpoint to take one from (else the model config's is loaded).
    ``callback(step, metrics, model)`` runs after every step on every rank (raising in it
    interrupts the run)."""
    cfg = cfg.resolved()
    t = cfg.train
    if not cfg.data.json_path:
        raise ValueError("data.json_path is required (a LLaVA JSON file)")
    dist = setup_distributed()
    device, bf16 = device_and_precision(t, dist)
    with _output_folder(t, dist) as start:
        entries = check_data(cfg.data.json_path, cfg.data.image_folder, cfg.data.template)  # before the model
        model, tokenizer = _model(cfg, start, tokenizer, device, dist)
        dataset = _dataset(cfg, model, tokenizer, entries)
        accum, total_steps = _accumulation(t, dist), _total_steps(t, len(dataset))
        engine, model = parallelize(model, t, dist, device)
        state = make_step_state(model, engine, t, total_steps, dist, device, bf16)
        progress = Progress(total_steps, t.global_batch_size, len(dataset), dist.world)
        checkpointer = _checkpointer(cfg, state, progress, tokenizer)
        if start.resume is not None:
            _resume(checkpointer, start, progress, dist)
        stream = batches(cfg, dataset, tokenizer, dist, device, progress.samples_seen)
        metrics = _outputs(cfg, progress.step, dist)
        history, signal = _steps(cfg, state, stream, accum, progress, checkpointer, metrics, device, callback)
        result = TrainResult(Path(t.out_dir), progress.step, total_steps, None, history, model, tokenizer)
        result.skipped_images, result.preempted = progress.skipped_images, signal
        result.last_checkpoint = checkpointer.last
        return _finish(result, t, checkpointer.last or start.resume, metrics, dist)
