"""One optimizer step: the trainer's (:mod:`.loop`) and the Stage-1 benchmark's (``sea bench --ops stage1``).

:func:`train_step` runs ``accum`` micro-batches through :func:`forward_backward_step` (the forward
under bf16 autocast on GPUs, the backward outside it), clips the gradients and steps the
optimizer; the step's sums (:class:`StepSums`) stay on the device and are read once, after the
last micro-batch. A step whose loss or gradient norm is not finite leaves weights and optimizer
state untouched. :func:`make_step_state` builds what a fresh run steps with: AdamW over
:func:`param_groups`, the cosine schedule with warmup, seeded RNGs and SEA's generator.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..config import TrainConfig
from .distributed import Dist


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


@dataclass
class StepSums:
    """What one optimizer step adds up over its micro-batches: 0-d float64 tensors on the device,
    so that nothing waits for the device until :meth:`read`.

    ``loss``, ``loss_gen``, ``tokens`` and ``skipped_images`` are this rank's until
    :meth:`reduce_over_ranks`; ``loss_align`` and ``pairs`` are global already (SEA gathers its
    pairs from every rank); ``pairs_local`` is this rank's share of them; ``tau`` is the temperature
    of the last micro-batch."""

    loss: torch.Tensor
    loss_gen: torch.Tensor
    tokens: torch.Tensor
    skipped_images: torch.Tensor
    loss_align: torch.Tensor
    pairs_local: torch.Tensor
    pairs: torch.Tensor
    tau: torch.Tensor

    @classmethod
    def zeros(cls, device) -> StepSums:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in fields(cls)))

    def add(self, out, attention_mask: torch.Tensor) -> None:
        """One micro-batch's model output (:class:`~sea_model.model.SEAModelOutput`) and its tokens."""
        self.loss += out.loss.detach().double()
        self.loss_gen += out.loss_gen.detach().double()
        self.tokens += attention_mask.sum()
        if out.loss_align is not None:
            self.loss_align += out.loss_align.detach().double()
            self.pairs += out.pair_count
            self.tau = (1.0 / out.scale).double()
        if out.align is not None:
            self.pairs_local += out.align.keep.sum()  # this rank's share of out.pair_count

    def reduce_over_ranks(self) -> None:
        """Sum the per-rank fields over the default process group (one collective)."""
        per_rank = torch.stack([self.loss, self.loss_gen, self.tokens, self.skipped_images])
        torch.distributed.all_reduce(per_rank)
        self.loss, self.loss_gen, self.tokens, self.skipped_images = per_rank.unbind()

    def read(self, grad_norm: torch.Tensor | None) -> dict[str, float]:
        """Every field and the gradient norm (0 when None) as floats: the step's one read of the device."""
        names = [f.name for f in fields(self)]
        norm = grad_norm.detach().reshape(()).to(self.loss) if grad_norm is not None else self.loss.new_zeros(())
        values = torch.stack([getattr(self, n) for n in names] + [norm]).tolist()
        return dict(zip(names + ["grad_norm"], values))


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


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(s: StepState, batches: Iterator[dict], accum: int) -> dict:
    """One optimizer step over ``accum`` micro-batches from ``batches`` (moved to the model's
    device here): forward/backward, clipping, ``optimizer.step()``, ``scheduler.step()``. When the
    loss or the gradient norm is not finite the optimizer step is skipped (``"skipped": True``;
    gradients dropped, the schedule advances).

    Returns floats: ``loss`` and ``loss_gen`` (means over micro-batches and ranks), ``loss_align``
    (None without SEA), ``pairs`` (global), ``pairs_local`` (this rank's), ``tau``, ``lr`` (the rate
    this step used), ``grad_norm`` (None without clipping), ``tokens`` and ``skipped_images`` (over
    ranks: images that could not be read, replaced by other samples), ``skipped_examples`` (this
    rank's, up to three)."""
    device = next(iter(s.params)).device if s.params else torch.device("cpu")
    sums = StepSums.zeros(device)
    align_n, skipped, examples = 0, 0, []
    for micro in range(accum):
        batch = _to_device(next(batches), device)
        out = forward_backward_step(s, batch, accum=accum, last=micro == accum - 1)
        sums.add(out, batch["attention_mask"])
        align_n += out.loss_align is not None
        skipped, examples = skipped + batch.get("skipped", 0), examples + batch.get("skipped_examples", [])
    sums.skipped_images += skipped
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, s.grad_clip) if s.grad_clip > 0 else None
    if s.dist.world > 1:
        sums.reduce_over_ranks()
    if hasattr(grad_norm, "full_tensor"):  # a DTensor (FSDP2)
        grad_norm = grad_norm.full_tensor()
    read = sums.read(grad_norm)
    lr = s.optimizer.param_groups[0]["lr"]
    finite = math.isfinite(read["loss"]) and math.isfinite(read["grad_norm"])  # the same on every rank
    if finite:  # else skipped: weights and optimizer state stay as they are
        s.optimizer.step()
    if s.scheduler is not None:
        s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    n = accum * s.dist.world
    return {
        "loss": read["loss"] / n,
        "loss_gen": read["loss_gen"] / n,
        "loss_align": read["loss_align"] / align_n if align_n else None,
        "pairs": int(read["pairs"]),
        "pairs_local": int(read["pairs_local"]),
        "tau": read["tau"] if align_n else None,
        "lr": lr,
        "grad_norm": read["grad_norm"] if grad_norm is not None else None,
        "tokens": read["tokens"],
        "skipped_images": int(read["skipped_images"]),
        "skipped_examples": examples[:3],
        "skipped": not finite,
    }


# --------------------------------------------------------------------------- a fresh run's state


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


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to 0 (HF ``get_cosine_schedule_with_warmup``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_step_state(model, engine, t: TrainConfig, total_steps: int, dist: Dist, device, bf16: bool) -> StepState:
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
