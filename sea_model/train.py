"""The two-stage trainer: a plain PyTorch loop, single process or ``torchrun`` (DDP; FSDP optional).

Stage 1 (pretraining, ``blip_laion_cc_sbu_558k.json``, template ``plain``) trains the adapter and
SEA's log-scale with ``L = L_gen + lambda * L_align``; stage 2 (instruction tuning,
``llava_v1_5_mix665k.json``) trains adapter and LLM (and, with ``train.vision_lr``, the vision
tower: SEA-PRIME) starting from a stage-1 output (``train.init_from``). Defaults are LLaVA-1.5's:

========================  ==========  ==========
                          stage 1     stage 2
========================  ==========  ==========
lr (AdamW, cosine,        1e-3        2e-5
warmup ratio 0.03)
global batch              256         128
micro batch (per device)  32          16
epochs                    1           1
========================  ==========  ==========

``global batch = micro batch * accumulation steps * world size``; the accumulation follows.

Configuration: :class:`RunConfig` has three sections, ``model`` (:class:`~sea_model.model.ModelConfig`),
``data`` (:class:`DataConfig`) and ``train`` (:class:`TrainConfig`). A YAML file gives any of
them; every field can then be overridden on the command line by its dotted name::

    sea train --stage 1 --config configs/stage1.yaml --train.lr 1e-3 --model.sea.enabled false \\
        --data.json_path data/blip_laion_cc_sbu_558k.json --model.llm.hidden_size 64

Values are read as YAML scalars (``false``, ``null``, ``1e-3``, ``[1, 2]``) and converted to the
field's type. ``--stage``, ``--resume``, ``--init_from``, ``--out`` and ``--fsdp`` are shortcuts for
``--train.stage`` ... ``--train.fsdp``. Precedence: defaults < the model config of ``init_from``
(or the whole saved run config of ``resume``) < the file < the command line.
``sea train --print_config`` prints the resolved configuration and exits.

The loop (:func:`train`), top to bottom: distributed setup, model (built under ``train.seed``,
weights from ``init_from``/``resume``), freezing, data (a seeded, resumable stream of
per-epoch permutations), DDP/FSDP wrapping, AdamW + cosine schedule, resume of optimizer,
schedule, RNG and data position, then steps of ``accum`` micro-batches with bf16 autocast on
GPU, gradient clipping, metrics (JSONL every step, TensorBoard when installed, a tqdm bar with
L_gen, L_align, tau and tokens/s), checkpoints every ``save_every`` steps and at the end (the last
``keep_last`` kept, see :mod:`sea_model.checkpoint`), the LLaVA ``mm_projector.bin`` export
after stage 1 and a loss plot.

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
import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import random
import time
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .model import ModelConfig

log = logging.getLogger(__name__)

STAGE_DEFAULTS = {
    1: {"lr": 1e-3, "global_batch_size": 256, "micro_batch_size": 32, "template": "plain"},
    2: {"lr": 2e-5, "global_batch_size": 128, "micro_batch_size": 16, "template": "auto"},
}
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CONFIG_FILE = "run_config.yaml"


# --------------------------------------------------------------------------- configuration


@dataclass
class DataConfig:
    """A LLaVA JSON file and its image folder (see :class:`~sea_model.data.LlavaDataset`).

    ``template`` None means ``plain`` in stage 1 and ``auto`` in stage 2."""

    json_path: str | None = None
    image_folder: str | None = None
    template: str | None = None
    max_length: int = 2048
    num_workers: int = 4


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and logging. ``None`` fields take the stage's default.

    Args:
        stage: 1 (adapter + SEA log-scale) or 2 (adapter + LLM).
        out_dir: checkpoints, ``metrics.jsonl``, ``loss.png``, ``mm_projector.bin`` go here.
        init_from: stage 2: a stage-1 output directory or checkpoint, or a LLaVA ``mm_projector.bin``.
        resume: a checkpoint directory, an output directory (its latest checkpoint) or
            ``"latest"`` (the latest under ``out_dir``); continues that run exactly.
        lr: peak learning rate of adapter, log-scale and (stage 2) LLM.
        vision_lr: when set (stage 2), the vision tower trains too at this rate (SEA-PRIME; 2e-6).
        global_batch_size / micro_batch_size: samples per optimizer step over all ranks / per
            forward pass per rank; their ratio over the world size is the accumulation.
        epochs: passes over the data (fractions allowed); ``max_steps`` overrides it.
        stop_after: end the process after this step as if it were killed there (no final
            checkpoint); for testing resume.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` or ``fp32``.
        seed: model initialisation (random parts), data order, SEA sampling (``seed + rank``).
        save_every: checkpoint every this many steps (0: only at the end); keep_last: how many.
        fsdp: shard the model with FSDP2 when there is more than one process (stage 2).
        device: default ``cuda:<local rank>`` when CUDA is available, else ``cpu``.
        deterministic: ``torch.use_deterministic_algorithms(True)``.
    """

    stage: int = 1
    out_dir: str = "runs/sea"
    init_from: str | None = None
    resume: str | None = None
    lr: float | None = None
    vision_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    global_batch_size: int | None = None
    micro_batch_size: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    stop_after: int | None = None
    grad_clip: float = 1.0
    precision: str = "auto"
    seed: int = 0
    save_every: int = 1000
    keep_last: int = 2
    fsdp: bool = False
    device: str | None = None
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    deterministic: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return from_dict(cls, d)

    def resolved(self) -> RunConfig:
        """A copy with the stage defaults filled in, checked."""
        cfg = copy.deepcopy(self)
        t = cfg.train
        if t.stage not in STAGE_DEFAULTS:
            raise ValueError(f"train.stage must be 1 or 2; got {t.stage!r}")
        defaults = STAGE_DEFAULTS[t.stage]
        for key in ("lr", "global_batch_size", "micro_batch_size"):
            if getattr(t, key) is None:
                setattr(t, key, defaults[key])
        if cfg.data.template is None:
            cfg.data.template = defaults["template"]
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision must be 'auto', 'bf16' or 'fp32'; got {t.precision!r}")
        if t.vision_lr is not None and t.stage != 2:
            raise ValueError("train.vision_lr (training the vision tower) is for stage 2")
        for key in ("global_batch_size", "micro_batch_size"):
            if getattr(t, key) < 1:
                raise ValueError(f"train.{key} must be >= 1; got {getattr(t, key)}")
        if not 0 <= t.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1); got {t.warmup_ratio}")
        return cfg


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _coerce(value: Any, tp, where: str):
    """``value`` (from YAML or the command line) as the annotated type ``tp``."""
    options, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{where}: may not be null")
    if dataclasses.is_dataclass(options[0]) and isinstance(value, dict):
        return from_dict(options[0], value, where)
    for opt in options:
        origin = typing.get_origin(opt) or opt
        try:
            if opt is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                    return value.lower() in ("true", "yes", "1")
                if isinstance(value, int) and value in (0, 1):
                    return bool(value)
                continue
            if opt is int:
                if isinstance(value, bool):
                    continue
                if isinstance(value, (int, str)) or (isinstance(value, float) and value.is_integer()):
                    return int(value)
                continue
            if opt is float:
                if not isinstance(value, bool) and isinstance(value, (int, float, str)):
                    return float(value)
                continue
            if opt is str:
                if isinstance(value, (dict, list)):
                    continue
                return str(value)
            if origin is dict and isinstance(value, dict):
                return value
            if origin in (tuple, list) and isinstance(value, (list, tuple)):
                inner = typing.get_args(opt)
                if origin is tuple and inner and len(inner) == len(value):
                    return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, inner)))
                return origin(value)
        except ValueError:
            continue
    raise ValueError(f"{where}: cannot read {value!r} as {tp}")


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass ``cls`` from a nested dict, converting leaves to the annotated types and
    naming unknown keys."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(
            f"unknown key {where + '.' if where else ''}{unknown[0]}; valid keys of "
            f"{where or cls.__name__}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in d.items()}
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--train.lr", "1e-3", "--model.sea.enabled=false"]`` -> ``[("train.lr", "1e-3"), ...]``."""
    pairs, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ValueError(f"expected --section.key VALUE; got {a!r}")
        if "=" in a:
            key, value = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"{a}: missing value")
            key, value = a[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def set_dotted(d: dict, key: str, raw: str) -> None:
    """Set ``d[a][b][c] = yaml(raw)`` for ``key = "a.b.c"`` (only through existing mappings)."""
    import yaml

    parts = key.split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        if p not in node:
            raise ValueError(f"unknown key --{key}: {'.'.join(parts[: i + 1])} does not exist")
        if not isinstance(node[p], dict):
            raise ValueError(f"--{key}: {'.'.join(parts[: i + 1])} is {node[p]!r}, not a section")
        node = node[p]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


def load_run_config(path: str | os.PathLike | None = None, overrides: list[tuple[str, str]] = ()) -> RunConfig:
    """Defaults < model config of ``init_from`` / saved run of ``resume`` < YAML file < overrides."""
    import yaml

    file_dict: dict = {}
    if path is not None:
        try:
            file_dict = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"--config: no such file: {path}") from None
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(file_dict, dict):
            raise ValueError(
                f"{path}: expected a mapping with sections model, data, train; got {type(file_dict).__name__}"
            )
    # Where does this run start from? (Looked up before the layers are merged.)
    probe = _merge(asdict(RunConfig()), file_dict)
    for k, v in overrides:
        if k in ("train.resume", "train.init_from", "train.out_dir"):
            set_dotted(probe, k, v)
    base = asdict(RunConfig())
    from . import checkpoint as ckpt

    t = probe["train"]
    if t.get("resume"):
        saved = ckpt.read_info(ckpt.resolve(t["resume"], t.get("out_dir")))
        base = _merge(base, saved.get("run", {}))
        for key in ("resume", "stop_after"):  # how that invocation ran, not what this one should do
            base["train"][key] = None
    elif t.get("init_from") and not str(t["init_from"]).endswith(".bin"):
        saved = ckpt.read_info(ckpt.resolve(t["init_from"]))
        base["model"] = saved["model"]
    merged = _merge(base, file_dict)
    for k, v in overrides:
        set_dotted(merged, k, v)
    return RunConfig.from_dict(merged)


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
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, m["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


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


# --------------------------------------------------------------------------- the loop


def train(cfg: RunConfig, *, tokenizer=None, callback: Callable[[int, dict, Any], None] | None = None) -> TrainResult:
    """Run one stage as configured; see the module docstring. ``tokenizer`` is used when there is
    no checkpoint to take one from (else the model config's is loaded).
    ``callback(step, metrics, model)`` runs after every step on every rank (raising in it
    interrupts the run)."""
    from tqdm.auto import tqdm

    from . import checkpoint as ckpt
    from .data import Collator, LlavaDataset
    from .model import build_model

    cfg = cfg.resolved()
    t, d = cfg.train, cfg.data
    if not d.json_path:
        raise ValueError("data.json_path is required (a LLaVA JSON file)")

    # ---- processes and device
    dist = setup_distributed()
    if t.device:
        device = torch.device(t.device)
    else:
        device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    out_dir = Path(t.out_dir)
    if t.resume is None and ckpt.list_checkpoints(out_dir):
        raise ckpt.CheckpointError(
            f"{out_dir} already holds checkpoints: continue with --resume latest, or choose another --out"
        )
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    # ---- where this run starts from
    resume_dir = ckpt.resolve(t.resume, out_dir) if t.resume else None
    init_from = Path(t.init_from) if t.init_from and resume_dir is None else None
    init_dir = ckpt.resolve(init_from) if init_from is not None and init_from.suffix != ".bin" else None
    if resume_dir is not None:
        info = ckpt.read_info(resume_dir)
        if info["stage"] != t.stage:
            raise ckpt.CheckpointError(
                f"--resume {resume_dir} is a stage-{info['stage']} checkpoint; "
                f"this is stage {t.stage} (use --init_from)"
            )
    source = resume_dir or init_dir
    if source is not None:
        tokenizer = ckpt.load_tokenizer(source)

    # ---- model: built under the seed (random parts are reproducible), then checkpoint weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        model, tokenizer = build_model(cfg.model, tokenizer, device=device, progress=t.progress and dist.main)
    if resume_dir is not None:
        ckpt.load_weights(model, resume_dir, require_trainable_for_stage=t.stage, vision=t.vision_lr is not None)
    elif init_dir is not None:
        ckpt.load_weights(model, init_dir)
    elif init_from is not None:
        ckpt.load_mm_projector(model.adapter, init_from)
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

    # ---- data
    G, mb = t.global_batch_size, t.micro_batch_size
    if G % (mb * dist.world):
        raise ValueError(
            f"train.global_batch_size ({G}) must be a multiple of micro_batch_size ({mb}) x world size ({dist.world})"
        )
    accum = G // (mb * dist.world)
    dataset = LlavaDataset(
        d.json_path,
        d.image_folder,
        tokenizer,
        model.tower.image_processor(),
        num_image_tokens=model.tower.num_patches,
        template=d.template,
        max_length=d.max_length,
    )
    total_steps = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * len(dataset) / G))

    # ---- parallelism
    engine = model
    if dist.world > 1 and t.fsdp:
        if t.stage != 2:
            raise ValueError("train.fsdp is for stage 2 (stage 1 trains only the adapter; DDP is enough)")
        engine = model = wrap_fsdp(model)
    elif dist.world > 1:
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

    # ---- optimizer and schedule
    optimizer = torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    warmup = math.ceil(t.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup, total_steps))

    # ---- state: fresh, or everything a checkpoint holds
    seed_everything(t.seed + dist.rank)
    sea_generator = torch.Generator(device=device).manual_seed(t.seed + dist.rank)
    step, samples, elapsed_before = 0, 0, 0.0
    if resume_dir is not None:
        state = ckpt.load_training_state(
            resume_dir, model, optimizer, scheduler, sea_generator, rank=dist.rank, world=dist.world
        )
        step, samples, elapsed_before = state["step"], state["samples_seen"], state["elapsed"]
        if dist.main:
            log.info("resumed from %s at step %d", resume_dir, step)
    if step >= total_steps:
        raise ckpt.CheckpointError(f"{resume_dir}: already at step {step} of {total_steps}; nothing to do")

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StreamSampler(len(dataset), mb, dist.rank, dist.world, t.seed, start=samples),
        collate_fn=Collator(tokenizer.pad_token_id),
        num_workers=d.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(t.seed),  # worker seeds: not drawn from the global RNG
    )
    batches = iter(loader)

    # ---- outputs
    metrics = None
    if dist.main:
        metrics = MetricsLog(out_dir, step, t.tensorboard)
        import yaml

        (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_dict = cfg.to_dict()
    history: list[dict] = []
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bar = tqdm(
        total=total_steps, initial=step, desc=f"stage {t.stage}", unit="step", disable=not (t.progress and dist.main)
    )
    start_time = time.time()
    last_saved = None

    def save(step_done: int) -> Path:
        nonlocal last_saved
        state = {
            "step": step_done,
            "samples_seen": samples,
            "epoch": samples / len(dataset),
            "total_steps": total_steps,
            "elapsed": elapsed_before + time.time() - start_time,
            "world_size": dist.world,
            "global_batch_size": G,
        }
        last_saved = ckpt.save_checkpoint(
            out_dir,
            step_done,
            model=model,
            tokenizer=tokenizer,
            run_config=run_dict,
            stage=t.stage,
            optimizer=optimizer,
            scheduler=scheduler,
            state=state,
            sea_generator=sea_generator,
            rank=dist.rank,
            world=dist.world,
            keep_last=t.keep_last,
        )
        return last_saved

    # ---- steps
    while step < total_steps:
        t0 = time.time()
        sums = torch.zeros(3, dtype=torch.float64)  # loss, L_gen, tokens
        align_sum, align_n, pairs, local_pairs, tau = 0.0, 0, 0, 0, None
        for micro in range(accum):
            batch = _to_device(next(batches), device)
            last = micro == accum - 1  # gradients are reduced over ranks after the last one only
            sync = contextlib.nullcontext()
            if dist.world > 1 and t.fsdp:
                model.set_requires_gradient_sync(last)
            elif dist.world > 1 and not last:
                sync = engine.no_sync()
            with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = engine(**batch, generator=sea_generator, group=dist.group)
                (out.loss / accum).backward()
            sums += torch.tensor(
                [out.loss.item(), out.loss_gen.item(), float(batch["attention_mask"].sum())], dtype=torch.float64
            )
            if out.align is not None:
                local_pairs += int(out.align.keep.sum())  # this rank's share of out.pairs
            if out.loss_align is not None:
                align_sum, align_n, pairs, tau = (
                    align_sum + out.loss_align.item(),
                    align_n + 1,
                    pairs + out.pairs,
                    out.temperature,
                )
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip > 0 else None
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples += G
        if dist.world > 1:  # L_gen and tokens over ranks (L_align and pairs are already global)
            torch.distributed.all_reduce(sums)
        dt = time.time() - t0
        m = {
            "step": step,
            "epoch": samples / len(dataset),
            "loss": sums[0].item() / (accum * dist.world),
            "loss_gen": sums[1].item() / (accum * dist.world),
            "loss_align": align_sum / align_n if align_n else None,
            "pairs": pairs,
            "tau": tau,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": sums[2].item() / dt,
            "elapsed": elapsed_before + time.time() - start_time,
        }
        history.append({**m, "pairs_local": local_pairs})
        if metrics is not None:
            metrics.write(m)
        bar.update(1)
        bar.set_postfix(
            L_gen=f"{m['loss_gen']:.3f}",
            L_align="-" if m["loss_align"] is None else f"{m['loss_align']:.3f}",
            tau="-" if tau is None else f"{tau:.3f}",
            tok_s=f"{m['tokens_per_s']:.0f}",
        )
        if callback is not None:
            callback(step, m, model)
        if step == total_steps or (t.save_every and step % t.save_every == 0):
            save(step)
        if t.stop_after is not None and step >= t.stop_after and step < total_steps:
            break
    bar.close()

    # ---- the end: LLaVA adapter export, plot
    finished = step == total_steps
    result = TrainResult(out_dir, step, total_steps, last_saved if finished else None, history, model, tokenizer)
    if metrics is not None:
        metrics.close()
        result.metrics = metrics.path
        if finished and t.plot:
            result.plot = plot_metrics(metrics.path, out_dir / PLOT_FILE)
    if finished and t.stage == 1 and last_saved is not None and dist.main:
        projector = last_saved / ckpt.MM_PROJECTOR
        if projector.is_file():
            result.mm_projector = out_dir / ckpt.MM_PROJECTOR
            ckpt.atomic_copy(projector, result.mm_projector)
    dist.barrier()
    if dist.created:
        torch.distributed.destroy_process_group()
    return result
