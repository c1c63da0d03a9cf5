"""The two-stage trainer: a plain PyTorch loop, single process or ``torchrun`` (DDP; FSDP optional).

Stage 1 (pretraining, ``blip_laion_cc_sbu_558k.json``, template ``plain``) trains the adapter and
SEA's log-scale with ``L = L_gen + lambda * L_align``; stage 2 (instruction tuning,
``llava_v1_5_mix665k.json``) trains adapter and LLM (and, with ``train.vision_lr``, the vision
tower: SEA-PRIME) starting from a stage-1 output (``train.init_from``). The defaults are
LLaVA-1.5's (:data:`sea_model.config.STAGE_DEFAULTS`; AdamW, cosine schedule, warmup ratio 0.03,
one epoch). ``global batch = micro batch * accumulation steps * world size``; the accumulation
follows. The configuration (:class:`~sea_model.config.RunConfig`, its YAML file and dotted
command-line overrides) is described in :mod:`sea_model.config`.

The loop (:func:`train`), top to bottom: distributed setup, model (built under ``train.seed``,
weights from ``init_from``/``resume``), freezing, data (a seeded, resumable stream of
per-epoch permutations), DDP/FSDP wrapping, AdamW + cosine schedule, resume of optimizer,
schedule, RNG and data position (:class:`~sea_model.checkpoint.Checkpointer`), then one
:func:`train_step` per optimizer step: ``accum`` micro-batches through
:func:`forward_backward_step` (bf16 autocast on the forward only, on GPU; backward outside it),
gradient clipping, the loss sums read once, ``optimizer.step()``. Then metrics
(:mod:`sea_model.metrics`: JSONL every step, TensorBoard when installed, a tqdm bar with L_gen,
L_align, tau and tokens/s), checkpoints every ``save_every`` steps and at the end (the last
``keep_last`` kept), the LLaVA ``mm_projector.bin`` export after stage 1 and a loss plot. The
Stage-1 benchmark (:mod:`sea_model.bench.stage1`) times the same :func:`train_step`.

What can go wrong is handled where it happens: the configuration is checked when it is read
(:mod:`sea_model.config`), the data file and a sample of images before the model is built
(:func:`sea_model.data.check_data`); the output folder is locked and claimed, and a resume from
an older checkpoint becomes a branch point (:mod:`sea_model.run_dir`); a step whose loss or
gradient norm is not finite is skipped, up to ``train.max_bad_steps`` in a row, then the run
stops with an error; SIGTERM / SIGINT save at the end of the current step and stop
(:class:`Preemption`); checkpoint writes are checked (:class:`~sea_model.checkpoint.Checkpointer`).

Distributed: under ``torchrun`` (or with a process group already initialised, as the tests do
with ``torch.multiprocessing.spawn``), SEA's contrastive loss gathers its pairs from every rank
(the default process group is passed to the model's forward), so ``L_align`` and ``pairs`` are
global and the same on every rank; ``L_gen`` is averaged over ranks for logging. With
``train.fsdp`` and more than one process, stage 2 shards the LLM's decoder layers and the model
(FSDP2 ``fully_shard``); this path is not covered by the test suite.

Exact resume: a run interrupted at any step and resumed from a checkpoint gives, on the CPU, the
same per-step losses as an uninterrupted run: data order depends only on ``train.seed``, the
epoch and the number of samples consumed (saved); the RNG states of torch, Python, NumPy and the
SEA sampling generator are saved per rank.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import run_dir
from .config import (  # noqa: F401  (re-exported: the trainer's configuration)
    STAGE_DEFAULTS,
    DataConfig,
    RunConfig,
    TrainConfig,
    load_run_config,
    parse_overrides,
)
from .errors import UserError
from .metrics import METRICS_FILE, PLOT_FILE, MetricsLog, plot_metrics, strict  # noqa: F401

log = logging.getLogger(__name__)

CONFIG_FILE = "run_config.yaml"


# --------------------------------------------------------------------------- pieces of the loop


class StreamSampler:
    """Micro-batches of dataset indices for one rank, from an endless stream of samples.

    Sample ``k`` of the stream is ``perm(k // n)[k % n]``, with ``perm(e)`` a permutation seeded by
    ``seed + e``. The stream is cut into rounds of ``world * micro_batch`` samples and rank ``r``
    takes the ``r``-th slice of each round. Starting at sample ``start`` (a multiple of the
    round) continues a run exactly; the order does not depend on DataLoader workers.
    """

    def __init__(self, n: int, micro_batch: int, rank: int, world: int, seed: int, start: int = 0):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.mb, self.rank, self.world, self.seed, self.start = n, micro_batch, rank, world, seed, start
        self._epoch, self._perm = None, None

    def index(self, k: int) -> int:
        epoch = k // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return self._perm[k % self.n]

    def __iter__(self):
        k = self.start
        while True:
            first = k + self.rank * self.mb
            yield [self.index(j) for j in range(first, first + self.mb)]
            k += self.world * self.mb


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to 0 (HF ``get_cosine_schedule_with_warmup``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # the default process group when world > 1
    created: bool = False  # we called init_process_group (and destroy it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def setup_distributed() -> Dist:
    """Use an initialised default process group, or create one under ``torchrun``."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        created = True
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Dist(created=created)
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Dist(dist.get_rank(), dist.get_world_size(), local, dist.group.WORLD, created)


def param_groups(model, t: TrainConfig) -> list[dict]:
    """Adapter + SEA log-scale, the LLM (stage 2), the tower (``vision_lr``): trainable only."""

    def trainable(module):
        return [p for p in module.parameters() if p.requires_grad] if module is not None else []

    groups = [{"name": "adapter", "params": trainable(model.adapter) + trainable(model.sea), "lr": t.lr}]
    if t.stage == 2:
        groups.append({"name": "llm", "params": trainable(model.llm), "lr": t.lr})
    if t.vision_lr is not None:
        groups.append({"name": "vision", "params": trainable(model.tower), "lr": t.vision_lr})
    return [g for g in groups if g["params"]]


def wrap_fsdp(model):
    """FSDP2: each decoder layer of the LLM, then the whole model (which keeps the embedding
    table unsharded through the forward, where SEA reads it)."""
    from torch.distributed.fsdp import fully_shard

    inner = getattr(model.llm, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError("train.fsdp: the LLM has no .model.layers to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- one step


@dataclass
class StepState:
    """The objects one optimizer step works on (the trainer's and the Stage-1 benchmark's).

    ``model`` is the unwrapped :class:`~sea_model.model.SEAModel`; ``engine`` what the forward
    runs through (its DDP wrapper; None: the model); ``params`` are clipped to ``grad_clip``
    (0: no clipping); ``scheduler`` None: none; ``generator`` drives SEA's sampling."""

    model: Any
    optimizer: torch.optim.Optimizer
    params: list
    scheduler: Any = None
    engine: Any = None
    generator: torch.Generator | None = None
    grad_clip: float = 1.0
    bf16: bool = False
    dist: Dist = field(default_factory=Dist)
    fsdp: bool = False


def forward_backward_step(s: StepState, batch: dict, *, accum: int, last: bool):
    """One micro-batch: the forward under bf16 autocast (when ``s.bf16``), ``(loss / accum).backward()``
    outside it; gradients are reduced over ranks after the ``last`` micro-batch only. Returns the
    model's output."""
    engine = s.engine if s.engine is not None else s.model
    sync = contextlib.nullcontext()
    if s.dist.world > 1 and s.fsdp:
        s.model.set_requires_gradient_sync(last)
    elif s.dist.world > 1 and not last:
        sync = engine.no_sync()
    with sync:
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=s.bf16):
            out = engine(**batch, generator=s.generator, group=s.dist.group)
        (out.loss / accum).backward()
    return out


def train_step(s: StepState, batches: Iterator[dict], accum: int) -> dict:
    """One optimizer step over ``accum`` micro-batches from ``batches`` (moved to the model's
    device here): forward/backward, clipping, ``optimizer.step()``, ``scheduler.step()``. When the
    loss or the gradient norm is not finite the optimizer step is skipped (``"skipped": True``;
    gradients dropped, the schedule advances).

    The loss sums stay on the device and are read once, after the last micro-batch. Returns
    floats: ``loss`` and ``loss_gen`` (means over micro-batches and ranks), ``loss_align`` (None
    without SEA), ``pairs`` (global), ``pairs_local`` (this rank's), ``tau``, ``lr`` (the rate this
    step used), ``grad_norm`` (None without clipping), ``tokens`` and ``skipped_images`` (over
    ranks: images that could not be read, replaced by other samples), ``skipped_examples`` (this
    rank's, up to three)."""
    device = next(iter(s.params)).device if s.params else torch.device("cpu")
    # over ranks: loss, L_gen, tokens, skipped images; this rank's: L_align (already global), its pairs;
    # the pairs over ranks, tau (of the last micro-batch): all read once, after the last micro-batch
    sums = torch.zeros(8, dtype=torch.float64, device=device)
    align_n, skipped, examples = 0, 0, []
    for micro in range(accum):
        batch = _to_device(next(batches), device)
        out = forward_backward_step(s, batch, accum=accum, last=micro == accum - 1)
        sums[:3] += torch.stack([out.loss.detach(), out.loss_gen.detach(), batch["attention_mask"].sum()]).double()
        if out.loss_align is not None:
            sums[4] += out.loss_align.detach().double()
            sums[6] += out.pair_count
            sums[7] = 1.0 / out.scale
            align_n += 1
        if out.align is not None:
            sums[5] += out.align.keep.sum()  # this rank's share of out.pair_count
        skipped, examples = skipped + batch.get("skipped", 0), examples + batch.get("skipped_examples", [])
    sums[3] += skipped
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, s.grad_clip) if s.grad_clip > 0 else None
    if s.dist.world > 1:
        torch.distributed.all_reduce(sums[:4])
    if hasattr(grad_norm, "full_tensor"):  # a DTensor (FSDP2)
        grad_norm = grad_norm.full_tensor()
    norm = grad_norm.detach().reshape(1).to(sums) if grad_norm is not None else sums.new_zeros(1)
    read = torch.cat([sums, norm]).tolist()  # one read
    loss, loss_gen, tokens, skipped, align_sum, local_pairs, pairs, tau, norm = read
    lr = s.optimizer.param_groups[0]["lr"]
    finite = math.isfinite(loss) and math.isfinite(norm)  # the same on every rank (reduced values)
    if finite:  # else skipped: weights and optimizer state stay as they are
        s.optimizer.step()
    if s.scheduler is not None:
        s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    n = accum * s.dist.world
    return {
        "loss": loss / n,
        "loss_gen": loss_gen / n,
        "loss_align": align_sum / align_n if align_n else None,
        "pairs": int(pairs),
        "pairs_local": int(local_pairs),
        "tau": tau if align_n else None,
        "lr": lr,
        "grad_norm": norm if grad_norm is not None else None,
        "tokens": tokens,
        "skipped_images": int(skipped),
        "skipped_examples": examples[:3],
        "skipped": not finite,
    }


# --------------------------------------------------------------------------- the run around it


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


def resolve_device(name: str | None, where: str, local_rank: int = 0) -> torch.device:
    """``name`` as a device (default: ``cuda:<local_rank>`` when CUDA is available, else the CPU);
    an unknown or unavailable one is a ``ValueError`` naming the option ``where``."""
    if not name:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{where} {name!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where} {name!r}: CUDA is not available here (use cpu)")
    return device


def _device(t: TrainConfig, dist: Dist) -> tuple[torch.device, bool]:
    """The device and whether the forward runs under bf16 autocast."""
    device = resolve_device(t.device, "train.device", dist.local_rank)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    return device, t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")


@contextlib.contextmanager
def _output_folder(t: TrainConfig, dist: Dist):
    """The output folder made, locked for the whole run (:mod:`sea_model.run_dir`; main rank),
    claimed (another run's checkpoints refused unless ``overwrite``); yields where the run starts
    from (:func:`_start`). The lock is released on the way out, whatever happens."""
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
    from . import checkpoint as ckpt

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
    from . import checkpoint as ckpt
    from .model import build_model

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


def _dataset(cfg: RunConfig, model, tokenizer, entries: list):
    from .data import LlavaDataset

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


def _parallelize(model, t: TrainConfig, dist: Dist, device):
    """``(engine, model)``: DDP around the model, or the model sharded with FSDP2, or as it is."""
    if dist.world > 1 and t.fsdp:
        if t.stage != 2:
            raise ValueError("train.fsdp is for stage 2 (stage 1 trains only the adapter; DDP is enough)")
        model = wrap_fsdp(model)
        return model, model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The vocabulary buffers are identical on every rank: no per-forward broadcast.
        no_sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else "broadcast_buffers"
        )
        engine = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=t.vision_lr is not None,
            **{no_sync: False},
        )
        return engine, model
    return model, model


def _step_state(model, engine, t: TrainConfig, total_steps: int, dist: Dist, device, bf16: bool) -> StepState:
    """AdamW + cosine schedule, the global RNGs seeded and SEA's generator: a fresh run's state."""
    optimizer = torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    warmup = math.ceil(t.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup, total_steps))
    seed_everything(t.seed + dist.rank)
    return StepState(
        model=model,
        optimizer=optimizer,
        params=[p for g in optimizer.param_groups for p in g["params"]],
        scheduler=scheduler,
        engine=engine,
        generator=torch.Generator(device=device).manual_seed(t.seed + dist.rank),
        grad_clip=t.grad_clip,
        bf16=bf16,
        dist=dist,
        fsdp=dist.world > 1 and t.fsdp,
    )


def _checkpointer(cfg: RunConfig, state: StepState, progress: Progress, tokenizer):
    """The run's checkpointer, given its stateful objects."""
    from .checkpoint import Checkpointer

    t, dist = cfg.train, state.dist
    return Checkpointer(
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


def _batches(cfg: RunConfig, dataset, tokenizer, dist: Dist, device, start_sample: int) -> Iterator[dict]:
    """This rank's endless stream of collated micro-batches, from sample ``start_sample`` on."""
    from .data import Collator

    t = cfg.train
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StreamSampler(
            len(dataset), t.micro_batch_size, dist.rank, dist.world, t.seed, start=start_sample
        ),
        collate_fn=Collator(tokenizer.pad_token_id),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(t.seed),  # worker seeds: not drawn from the global RNG
        worker_init_fn=_ignore_stop_signals,
    )
    return iter(loader)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT / SIGTERM (a Ctrl-C or a scheduler signals the whole
    process group): the main process saves at the end of its step and stops them; they end on
    their own when it is gone."""
    import signal

    for name in Preemption.SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _outputs(cfg: RunConfig, start_step: int, dist: Dist) -> MetricsLog | None:
    """The main rank's metrics log (cut back to ``start_step``) and ``run_config.yaml``."""
    if not dist.main:
        return None
    import yaml

    out_dir = Path(cfg.train.out_dir)
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return MetricsLog(out_dir, start_step, cfg.train.tensorboard)


def _record(m: dict, progress: Progress, seconds: float, history: list, metrics: MetricsLog | None, bar) -> dict:
    """The step's metrics row (strict JSON: non-finite values as None; written, shown, kept);
    returns it. Skipped images are reported in one aggregated line at 1, 10, 100, ... of them."""
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


_SHOWN = {"L_gen": "loss_gen", "L_align": "loss_align", "tau": "tau", "tok_s": "tokens_per_s"}


def _short(v) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 1000 else f"{v:.3f}"


def _check_finite(row: dict, bad: int, t: TrainConfig, last: Path | None) -> int:
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


def _save_due(progress: Progress, t: TrainConfig, stop: bool, bad: int, pending: bool) -> tuple[bool, bool]:
    """``(save now, save pending)``: every ``save_every`` steps, at the end and when preempted; while
    steps are being skipped (non-finite) a periodic save waits for the next good step, so a streak
    of bad steps never pushes good checkpoints out of ``keep_last``."""
    end = stop or progress.step == progress.total_steps
    due = end or pending or bool(t.save_every and progress.step % t.save_every == 0)
    if due and bad and not end:
        log.warning("step %d: checkpoint postponed until a step is finite again", progress.step)
        return False, True
    return due, False


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


def _finish(result: TrainResult, t: TrainConfig, saved: Path | None, metrics: MetricsLog | None, dist: Dist):
    """The end: metrics closed; when the run is complete, the loss plot and (stage 1) the LLaVA
    adapter export ``<out_dir>/mm_projector.bin`` (also when a resume finds the run complete:
    a run killed after its last checkpoint finishes its export)."""
    from . import checkpoint as ckpt

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


def _resume(checkpointer, start: Start, progress: Progress, dist: Dist) -> None:
    from . import checkpoint as ckpt

    checkpointer.load(start.resume)
    if progress.step > progress.total_steps:
        raise ckpt.CheckpointError(
            f"{start.resume}: at step {progress.step}, past this run's {progress.total_steps} steps (train.max_steps)"
        )
    if dist.main:
        done = progress.step == progress.total_steps
        log.info("resumed from %s at step %d%s", start.resume, progress.step, "; complete: exporting" * done)


# --------------------------------------------------------------------------- the loop


def train(cfg: RunConfig, *, tokenizer=None, callback: Callable[[int, dict, Any], None] | None = None) -> TrainResult:
    """Run one stage as configured; see the module docstring. ``tokenizer`` is used when there is
    no checkpoint to take one from (else the model config's is loaded).
    ``callback(step, metrics, model)`` runs after every step on every rank (raising in it
    interrupts the run)."""
    from tqdm.auto import tqdm

    from .data import check_data

    cfg = cfg.resolved()
    t = cfg.train
    if not cfg.data.json_path:
        raise ValueError("data.json_path is required (a LLaVA JSON file)")
    dist = setup_distributed()
    device, bf16 = _device(t, dist)
    with _output_folder(t, dist) as start:
        entries = check_data(cfg.data.json_path, cfg.data.image_folder, cfg.data.template)  # before the model
        model, tokenizer = _model(cfg, start, tokenizer, device, dist)
        dataset = _dataset(cfg, model, tokenizer, entries)
        accum, total_steps = _accumulation(t, dist), _total_steps(t, len(dataset))
        engine, model = _parallelize(model, t, dist, device)
        state = _step_state(model, engine, t, total_steps, dist, device, bf16)
        progress = Progress(total_steps, t.global_batch_size, len(dataset), dist.world)
        checkpointer = _checkpointer(cfg, state, progress, tokenizer)
        if start.resume is not None:
            _resume(checkpointer, start, progress, dist)
        batches = _batches(cfg, dataset, tokenizer, dist, device, progress.samples_seen)
        metrics, history, bad, pending = _outputs(cfg, progress.step, dist), [], 0, False
        show = t.progress and dist.main
        bar = tqdm(total=total_steps, initial=progress.step, desc=f"stage {t.stage}", unit="step", disable=not show)
        progress.started = time.time()
        with Preemption() as preemption:
            while progress.step < total_steps:
                t0 = time.time()
                m = train_step(state, batches, accum)
                progress.advance(m["skipped_images"])
                row = _record(m, progress, time.time() - t0, history, metrics, bar)
                bad = _check_finite(row, bad, t, checkpointer.last)
                if callback is not None:
                    callback(progress.step, row, model)
                stop = preemption.requested(dist, device)
                save, pending = _save_due(progress, t, stop, bad, pending)
                if save:
                    checkpointer.save(progress.step)
                if stop or (t.stop_after is not None and t.stop_after <= progress.step < total_steps):
                    break
        bar.close()
        result = TrainResult(Path(t.out_dir), progress.step, total_steps, None, history, model, tokenizer)
        result.skipped_images, result.preempted = progress.skipped_images, preemption.signal
        result.last_checkpoint = checkpointer.last
        return _finish(result, t, checkpointer.last or start.resume, metrics, dist)
