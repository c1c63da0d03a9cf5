""":class:`SEATrainer`: ``transformers.Trainer`` with SEA (needs ``transformers`` and ``accelerate``).

Import it from :mod:`sea_model.hf` (``from sea_model.hf import SEATrainer``): the class is made on
first access, so that importing :mod:`sea_model.hf` stays cheap (Trainer pulls in accelerate).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .hf import LlavaSEA
from .sea_head import weighted_sum


def _world():
    """The default process group when torch.distributed runs with more than one rank, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _accumulate(sums: dict, loss: torch.Tensor, align, scaled: bool, steps: int) -> None:
    """Add one micro-batch's L_gen, L_align and pairs, as shares of the optimizer step, to ``sums``
    (tensors on the device, read at log time); ``steps`` sums to the optimizer steps taken."""
    for key, value in (
        ("L_gen", loss.detach().float() * (1.0 if scaled else 1.0 / steps)),
        ("L_align", align.loss.detach().float() / steps),
        ("pairs", align.pair_count.float() / steps),
        ("steps", torch.tensor(1.0 / steps, device=loss.device)),
    ):
        sums[key] = sums.get(key, 0.0) + value


def sync_temperature_grads(sea: LlavaSEA, group=None) -> None:
    """Average SEA's parameter gradients over the ranks of ``group`` (the default group when None),
    as DDP does for the model's: the temperature lives outside the DDP-wrapped model. A rank
    without a gradient contributes zeros. No-op without torch.distributed or with one rank."""
    import torch.distributed as dist

    group = group if group is not None else _world()
    params = [p for p in sea.parameters() if p.requires_grad]
    if group is None or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def zero_temperature_grads(sea: LlavaSEA) -> None:
    """What Trainer's ``model.zero_grad()`` does for the model, for SEA's parameters."""
    for p in sea.parameters():
        p.grad = None


class _SEAGradients(TrainerCallback):
    """Averages the temperature's gradient over ranks before each optimizer step and zeroes it after."""

    def __init__(self, sea: LlavaSEA):
        self.sea = sea

    def on_train_begin(self, args, state, control, **kwargs):
        zero_temperature_grads(self.sea)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        sync_temperature_grads(self.sea)

    def on_step_end(self, args, state, control, **kwargs):
        zero_temperature_grads(self.sea)


class SEATrainer(Trainer):
    """``transformers.Trainer`` with SEA: ``SEATrainer(model=llava, sea=LlavaSEA(...), args=..., ...)``.

    * Loss: ``L_gen + weight * L_align`` per micro-batch, SEA's term divided by the
      accumulation steps whenever Trainer does not (Llava's forward takes ``**kwargs``, so
      Trainer normalizes ``L_gen`` by the step's token count instead), so SEA weighs the same
      with any accumulation. The two terms are logged as ``L_gen`` and ``L_align`` (means per
      optimizer step since the last log, over ranks), with ``pairs`` (per micro-batch) and ``tau``.
    * The temperature is an extra optimizer group without weight decay (Trainer's own
      optimizer only; with ``optimizers=(...)`` add ``sea.parameters()`` yourself), is not
      gradient-clipped, and is saved as ``sea.safetensors`` in every checkpoint and
      ``save_model`` folder and read back by ``resume_from_checkpoint``.
    * Several processes (``torchrun`` / ``accelerate launch``, DDP): the temperature's gradient is
      averaged over ranks before each optimizer step (as DDP does for the model) and zeroed after
      it; SEA's negatives are gathered over all ranks (``sea_gather_negatives=False``: each rank's own).
    * Evaluation runs without SEA.
    """

    def __init__(self, *args, sea: LlavaSEA, sea_gather_negatives: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.sea = sea.to(next(self.model.parameters()).device)
        self.sea_gather_negatives = bool(sea_gather_negatives)
        self._sea_sums: dict[str, Any] = {}
        self.add_callback(_SEAGradients(self.sea))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        params = [p for p in self.sea.parameters() if p.requires_grad]
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if params and not any(id(p) in known for p in params):
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and torch.is_grad_enabled():
            loss = self._add_sea(loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _add_sea(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        steps = self.current_gradient_accumulation_steps
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        align = self.sea.align(group=_world() if self.sea_gather_negatives else None)
        # Trainer divides the returned loss by `steps` unless it is already scaled for accumulation.
        per_step = 1.0 / steps if scaled else 1.0
        _accumulate(self._sea_sums, loss, align, scaled, steps)
        return weighted_sum(loss, align.loss, self.sea.weight * per_step)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._sea_sums:
            sums, self._sea_sums = self._sea_sums, {}
            keys = sorted(sums)
            values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys])
            group = _world()
            if group is not None:  # Trainer logs on every rank: the means over ranks, as for `loss`
                import torch.distributed as dist

                dist.all_reduce(values, group=group)
                values /= dist.get_world_size(group)
            means = dict(zip(keys, values.tolist()))
            steps = means.pop("steps")
            for key, value in means.items():
                logs[key] = round(value / steps, 6)
            logs["tau"] = self.sea.temperature
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir=None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.sea.save(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.sea.load(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        if self.state.best_model_checkpoint:
            self.sea.load(self.state.best_model_checkpoint)
