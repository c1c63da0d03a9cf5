"""The run configuration and its one deserializer.

:class:`RunConfig` has three sections, ``model`` (:class:`~sea_model.model.ModelConfig`), ``data``
(:class:`DataConfig`) and ``train`` (:class:`TrainConfig`). A YAML file gives any of them; every
field can then be overridden on the command line by its dotted name::

    sea train --stage 1 --config configs/stage1.yaml --train.lr 1e-3 --model.sea.enabled false \\
        --data.json_path data/blip_laion_cc_sbu_558k.json --model.llm.hidden_size 64

Values are read as YAML scalars (``false``, ``null``, ``1e-3``, ``[1, 2]``) and converted to the
field's type by :func:`from_dict` (which :meth:`ModelConfig.from_dict
<sea_model.model.ModelConfig.from_dict>` uses too). Precedence: defaults < the model config of
``init_from`` (or the whole saved run config of ``resume``) < the file < the command line
(:func:`load_run_config`). ``None`` fields of ``train`` take the stage's default from
:data:`STAGE_DEFAULTS` (LLaVA-1.5's), written here once.

This module imports neither torch nor the model, so ``sea --help`` stays instant.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if typing.TYPE_CHECKING:
    from .model import ModelConfig

STAGE_DEFAULTS = {
    1: {"lr": 1e-3, "global_batch_size": 256, "micro_batch_size": 32, "template": "plain"},
    2: {"lr": 2e-5, "global_batch_size": 128, "micro_batch_size": 16, "template": "auto"},
}


TEMPLATES = ("plain", "chat", "vicuna_v1", "auto")  # conversation templates (sea_model.data)


def stage_defaults_text() -> str:
    """:data:`STAGE_DEFAULTS` in words (the CLI's help)."""
    return "\n  ".join(
        f"stage {s} lr {d['lr']:g}, global batch {d['global_batch_size']}, micro batch {d['micro_batch_size']}, "
        f"template {d['template']}"
        for s, d in STAGE_DEFAULTS.items()
    )


def _model_config():
    from .model import ModelConfig

    return ModelConfig()


def _type_names() -> dict:
    """Names the annotations here refer to that are imported only when needed."""
    from .model import ModelConfig

    return {"ModelConfig": ModelConfig}


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
        max_bad_steps: a step whose loss or gradient norm is not finite is skipped (weights and
            optimizer state untouched, a warning, ``"skipped": true`` in the metrics); after this
            many in a row the run stops with an error (0: stop at the first).
        overwrite: start afresh in an ``out_dir`` that holds another run's checkpoints (they and
            its metrics are deleted); without it such a folder is refused unless ``resume`` is set.
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
    max_bad_steps: int = 3
    overwrite: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=_model_config)
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
        _check_train(t)
        _check_data(cfg.data)
        _check_sea(cfg.model.sea)
        return cfg


def _require(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}; got {value!r}")


def _positive(x) -> bool:
    return math.isfinite(x) and x > 0


def _non_negative(x) -> bool:
    return math.isfinite(x) and x >= 0


def _check_train(t: TrainConfig) -> None:
    """Ranges (NaN refused), the batch sizes' divisibility, the stage's options; one clear error."""
    _require(t.precision in ("auto", "bf16", "fp32"), "train.precision", "'auto', 'bf16' or 'fp32'", t.precision)
    if t.vision_lr is not None and t.stage != 2:
        raise ValueError("train.vision_lr (training the vision tower) is for stage 2")
    _require(_positive(t.lr), "train.lr", "a finite number > 0", t.lr)
    if t.vision_lr is not None:
        _require(_positive(t.vision_lr), "train.vision_lr", "a finite number > 0 (or null)", t.vision_lr)
    _require(_non_negative(t.weight_decay), "train.weight_decay", "a finite number >= 0", t.weight_decay)
    _require(all(math.isfinite(b) and 0 <= b < 1 for b in t.betas), "train.betas", "two numbers in [0, 1)", t.betas)
    _require(
        math.isfinite(t.warmup_ratio) and 0 <= t.warmup_ratio < 1, "train.warmup_ratio", "in [0, 1)", t.warmup_ratio
    )
    for key in ("global_batch_size", "micro_batch_size"):
        _require(getattr(t, key) >= 1, f"train.{key}", ">= 1", getattr(t, key))
    if t.global_batch_size % t.micro_batch_size:
        raise ValueError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) (times the number of processes)"
        )
    _require(_positive(t.epochs), "train.epochs", "a finite number > 0", t.epochs)
    for key in ("max_steps", "stop_after"):
        _require(getattr(t, key) is None or getattr(t, key) >= 1, f"train.{key}", ">= 1 (or null)", getattr(t, key))
    _require(_non_negative(t.grad_clip), "train.grad_clip", "a finite number >= 0 (0: no clipping)", t.grad_clip)
    _require(t.save_every >= 0, "train.save_every", ">= 0 (0: only at the end)", t.save_every)
    _require(t.keep_last >= 1, "train.keep_last", ">= 1", t.keep_last)
    _require(t.max_bad_steps >= 0, "train.max_bad_steps", ">= 0", t.max_bad_steps)
    if t.overwrite and t.resume:
        raise ValueError("train.overwrite and train.resume exclude each other: resume continues the run in out_dir")


def _check_data(d: DataConfig) -> None:
    _require(d.template in TEMPLATES, "data.template", f"one of {', '.join(TEMPLATES)}", d.template)
    _require(d.max_length >= 2, "data.max_length", ">= 2", d.max_length)
    _require(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)


def _check_sea(sea) -> None:
    """SEA's options: the loss weight, label counts and the temperature's clamps."""
    _require(_non_negative(sea.weight), "model.sea.weight", "a finite number >= 0", sea.weight)
    _require(sea.top_n >= 1, "model.sea.top_n", ">= 1", sea.top_n)
    _require(sea.window >= 1, "model.sea.window", ">= 1", sea.window)
    _require(_positive(sea.max_scale), "model.sea.max_scale", "a finite number > 0", sea.max_scale)
    rule = f"a finite number in (0, max_scale = {sea.max_scale}]"
    _require(_positive(sea.min_scale) and sea.min_scale <= sea.max_scale, "model.sea.min_scale", rule, sea.min_scale)


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
    hints = typing.get_type_hints(cls, localns=_type_names())
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
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
            ) from None
        except IsADirectoryError:
            raise ValueError(f"--config {path}: a directory, not a YAML file") from None
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
        base["train"].update(resume=None, stop_after=None, overwrite=False)  # how that one ran, not what this one does
    elif t.get("init_from") and not str(t["init_from"]).endswith(".bin"):
        saved = ckpt.read_info(ckpt.resolve(t["init_from"]))
        base["model"] = saved["model"]
    merged = _merge(base, file_dict)
    for k, v in overrides:
        set_dotted(merged, k, v)
    return RunConfig.from_dict(merged)
