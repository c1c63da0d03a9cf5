"""Every configuration of a run, as plain dataclasses with their checks, and their one deserializer.

A run (:class:`RunConfig`) has three sections: ``model`` (:class:`ModelConfig`, with its
:class:`VisionConfig` and :class:`SEAConfig`), ``data`` (:class:`DataConfig`) and ``train``
(:class:`TrainConfig`). :func:`from_dict` builds any of them from a nested dict (YAML, a
checkpoint's ``config.json``, the command line), converting leaves to the annotated types and
naming unknown keys. :meth:`RunConfig.resolved` fills ``None`` fields of ``train`` with the stage's
default (:data:`STAGE_DEFAULTS`, LLaVA-1.5's, written here once) and runs every section's
``check``. Reading a run's configuration from files and the command line:
:mod:`sea_model.training.run_config`.

Torch-free and importing no other part of sea_model, so that ``sea --help`` stays instant.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

STAGE_DEFAULTS = {
    1: {"lr": 1e-3, "global_batch_size": 256, "micro_batch_size": 32, "template": "plain"},
    2: {"lr": 2e-5, "global_batch_size": 128, "micro_batch_size": 16, "template": "auto"},
}
TEMPLATES = ("plain", "chat", "vicuna_v1", "auto")  # conversation templates (sea_model.prompts)
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a model may be loaded in
ASPECT_RATIOS = ("pad", "square", "crop")
LIBRARIES = ("auto", "open_clip", "transformers")
SELECT_STRATEGIES = ("default", "full")


def stage_defaults_text() -> str:
    """:data:`STAGE_DEFAULTS` in words (the CLI's help)."""
    return "\n  ".join(
        f"stage {s} lr {d['lr']:g}, global batch {d['global_batch_size']}, micro batch {d['micro_batch_size']}, "
        f"template {d['template']}"
        for s, d in STAGE_DEFAULTS.items()
    )


def _require(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}; got {value!r}")


def _positive(x) -> bool:
    return math.isfinite(x) and x > 0


def _non_negative(x) -> bool:
    return math.isfinite(x) and x >= 0


# --------------------------------------------------------------------------- the model


@dataclass
class VisionConfig:
    """How to build the vision tower (a plain dataclass, JSON-serialisable with ``asdict``).

    Args:
        name: an open_clip model name (``"ViT-L-14-336-quickgelu"``), or an ``hf-hub:`` /
            ``local-dir:`` identifier; with ``model_cfg`` it is only a label. With
            ``library="transformers"``: a Hugging Face model name or local folder
            (``"openai/clip-vit-large-patch14-336"``, LLaVA-1.5's ``--vision_tower``).
        pretrained: a pretrained tag (``"openai"``; downloads), a local checkpoint file, or None
            for random weights. With ``library="transformers"``: None builds random weights from
            the config at ``name``, anything else loads the weights at ``name``.
        model_cfg: an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``)
            used instead of the built-in config of ``name``.
        preprocess_cfg: overrides of open_clip's preprocessing config (``mean``, ``std``,
            ``interpolation``, ...).
        select_layer: the hidden-state layer the adapter reads (HF indexing, default -2); a list
            of layers (Hugging Face towers only) concatenates them on the feature axis.
        select_strategy: ``"default"`` (drop the first token: CLIP's CLS) or ``"full"`` (keep all
            tokens; Hugging Face towers only), as Llava's ``vision_feature_select_strategy``.
        library: ``"open_clip"``, ``"transformers"``, or ``"auto"``: ``transformers`` when ``name``
            is a local folder with a ``config.json`` or a ``org/model`` hub name, else ``open_clip``.
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5: expand to a square with the mean colour, then
            resize), ``"square"`` (resize to a square, ignoring the aspect ratio) or ``"crop"``
            (open_clip's default: resize the short side, centre crop).
    """

    name: str = "ViT-L-14-336-quickgelu"
    pretrained: str | None = "openai"
    model_cfg: dict | None = None
    preprocess_cfg: dict = field(default_factory=dict)
    select_layer: int | list[int] = -2
    image_aspect_ratio: str = "pad"
    select_strategy: str = "default"
    library: str = "auto"

    def resolved_library(self) -> str:
        """``"open_clip"`` or ``"transformers"`` (see ``library``)."""
        if self.library not in LIBRARIES:
            raise ValueError(f"vision.library must be one of {LIBRARIES}; got {self.library!r}")
        if self.library != "auto":
            return self.library
        if self.model_cfg is None and not self.name.startswith(("hf-hub:", "local-dir:")):
            if os.path.isfile(os.path.join(self.name, "config.json")) or (
                "/" in self.name and not os.path.exists(self.name)
            ):
                return "transformers"
        return "open_clip"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        return from_dict(cls, d, "vision")


@dataclass
class SEAConfig:
    """SEA options. ``weight`` is the lambda of ``loss = L_gen + lambda * L_align``; ``top_n``
    ... ``backend`` go to ``SEAAlignmentLoss`` (``min_scale``/``max_scale`` clamp ``1 / tau``:
    ``0.01 <= tau <= 100`` by default); ``words`` (a word-list file, None = wordfreq's
    top ``vocab_size``), ``template`` and ``cache_dir`` define the vocabulary."""

    enabled: bool = True
    weight: float = 1.0
    top_n: int = 10
    window: int = 2
    negate: bool = True
    dedup: bool = True
    init_log_scale: float = 0.0
    max_scale: float = 100.0
    min_scale: float = 0.01
    backend: str = "auto"
    words: str | None = None
    vocab_size: int = 41_242
    template: str = "{}"
    cache_dir: str | None = None

    def loss_kwargs(self) -> dict:
        keys = ("top_n", "window", "negate", "dedup", "init_log_scale", "max_scale", "min_scale", "backend")
        return {k: getattr(self, k) for k in keys}

    def check(self) -> None:
        """The loss weight, label counts and the temperature's clamps (NaN refused)."""
        _require(_non_negative(self.weight), "model.sea.weight", "a finite number >= 0", self.weight)
        _require(self.top_n >= 1, "model.sea.top_n", ">= 1", self.top_n)
        _require(self.window >= 1, "model.sea.window", ">= 1", self.window)
        _require(_positive(self.max_scale), "model.sea.max_scale", "a finite number > 0", self.max_scale)
        rule = f"a finite number in (0, max_scale = {self.max_scale}]"
        ok = _positive(self.min_scale) and self.min_scale <= self.max_scale
        _require(ok, "model.sea.min_scale", rule, self.min_scale)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`~sea_model.model.SEAModel` (weights aside).

    Args:
        vision: the tower (:class:`VisionConfig`).
        llm: a hub name or local directory (``from_pretrained``), or an HF config dict with
            ``model_type`` (random weights, ``from_config``).
        tokenizer: a hub name or directory; defaults to ``llm`` when that is a name.
        adapter: ``"mlp{n}x_gelu"`` (LLaVA-1.5: ``mlp2x_gelu``), ``"linear"`` or ``"identity"``.
        sea: :class:`SEAConfig`.
        attn_implementation: None picks ``flash_attention_2`` when CUDA, flash-attn and a half
            ``dtype`` are all present, else ``sdpa``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for tower and LM.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: str | dict = "lmsys/vicuna-7b-v1.5"
    tokenizer: str | None = None
    adapter: str = "mlp2x_gelu"
    sea: SEAConfig = field(default_factory=SEAConfig)
    attn_implementation: str | None = None
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """From a nested dict (a checkpoint's ``config.json``, YAML), by :func:`from_dict`."""
        return from_dict(cls, d, "model")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- the run


@dataclass
class DataConfig:
    """A LLaVA JSON file and its image folder (see :class:`~sea_model.data.LlavaDataset`).

    ``template`` None means ``plain`` in stage 1 and ``auto`` in stage 2."""

    json_path: str | None = None
    image_folder: str | None = None
    template: str | None = None
    max_length: int = 2048
    num_workers: int = 4

    def check(self) -> None:
        _require(self.template in TEMPLATES, "data.template", f"one of {', '.join(TEMPLATES)}", self.template)
        _require(self.max_length >= 2, "data.max_length", ">= 2", self.max_length)
        _require(self.num_workers >= 0, "data.num_workers", ">= 0", self.num_workers)


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

    def check(self) -> None:
        """Ranges (NaN refused), the batch sizes' divisibility, the stage's options; one clear error."""
        _require(
            self.precision in ("auto", "bf16", "fp32"), "train.precision", "'auto', 'bf16' or 'fp32'", self.precision
        )
        if self.vision_lr is not None and self.stage != 2:
            raise ValueError("train.vision_lr (training the vision tower) is for stage 2")
        _require(_positive(self.lr), "train.lr", "a finite number > 0", self.lr)
        if self.vision_lr is not None:
            _require(_positive(self.vision_lr), "train.vision_lr", "a finite number > 0 (or null)", self.vision_lr)
        _require(_non_negative(self.weight_decay), "train.weight_decay", "a finite number >= 0", self.weight_decay)
        _require(
            all(math.isfinite(b) and 0 <= b < 1 for b in self.betas), "train.betas", "two numbers in [0, 1)", self.betas
        )
        _require(
            math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
            "train.warmup_ratio",
            "in [0, 1)",
            self.warmup_ratio,
        )
        for key in ("global_batch_size", "micro_batch_size"):
            _require(getattr(self, key) >= 1, f"train.{key}", ">= 1", getattr(self, key))
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size}) (times the number of processes)"
            )
        _require(_positive(self.epochs), "train.epochs", "a finite number > 0", self.epochs)
        for key in ("max_steps", "stop_after"):
            _require(
                getattr(self, key) is None or getattr(self, key) >= 1,
                f"train.{key}",
                ">= 1 (or null)",
                getattr(self, key),
            )
        _require(
            _non_negative(self.grad_clip), "train.grad_clip", "a finite number >= 0 (0: no clipping)", self.grad_clip
        )
        _require(self.save_every >= 0, "train.save_every", ">= 0 (0: only at the end)", self.save_every)
        _require(self.keep_last >= 1, "train.keep_last", ">= 1", self.keep_last)
        _require(self.max_bad_steps >= 0, "train.max_bad_steps", ">= 0", self.max_bad_steps)
        if self.overwrite and self.resume:
            raise ValueError("train.overwrite and train.resume exclude each other: resume continues the run in out_dir")


@dataclass
class RunConfig:
    """A whole run: ``model``, ``data`` and ``train`` (see the module docstring)."""

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
        t.check()
        cfg.data.check()
        cfg.model.sea.check()
        return cfg


# --------------------------------------------------------------------------- the deserializer


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
