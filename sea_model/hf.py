"""SEA for Hugging Face ``LlavaForConditionalGeneration`` training (needs ``transformers``).

:class:`LlavaSEA` attaches SEA to a Llava model you already have, plus the CLIP (or SigLIP) model
of its vision tower, whose joint-space head and text tower SEA needs. It installs two forward
hooks, so one ordinary Llava forward gives both the LM loss and SEA's inputs:

* on ``llava.model.vision_tower``: the tower's ``last_hidden_state``, from which the copied head
  (:class:`~sea_model.vision.HFJointHead`) makes the joint-space patch features;
* on ``llava.model.multi_modal_projector``: its outputs, the visual tokens that SEA aligns (the
  projector rows of CLIP's CLS token are skipped under ``vision_feature_select_strategy="full"``).

Any ``vision_feature_layer`` (int or list) works: SEA reads the projector's outputs, whatever
they were computed from. Hooks capture only in training mode with gradients enabled, so
evaluation and ``generate`` never compute SEA.

Plain loop (``L = L_gen + weight * L_align``)::

    sea = LlavaSEA(llava, clip, clip_tokenizer, tokenizer, words="2of12.txt")
    optimizer = torch.optim.AdamW([*trainable_llava_params, *sea.parameters()], lr=1e-3)
    out = llava(**batch)
    loss = out.loss + sea.weight * sea.align().loss   # SEA of that forward

With ``transformers.Trainer``: :class:`SEATrainer` (``SEATrainer(model=llava, sea=sea, args=...,
...)``) adds SEA's loss with the right weight under gradient accumulation, optimizes the
temperature without weight decay, logs ``L_gen``, ``L_align``, ``pairs`` and ``tau``, and saves
and restores the temperature with every checkpoint (``sea.safetensors``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .sea_head import SEAHead, weighted_sum
from .vision import ClipBundle, HFJointHead
from .vocab import build_vocabulary

SEA_WEIGHTS = "sea.safetensors"


class LlavaSEA(nn.Module):
    """SEA's loss, temperature, vocabulary and joint-space head for one Llava model.

    Args:
        llava: a ``LlavaForConditionalGeneration`` (its vision tower a Hugging Face CLIP or SigLIP).
        clip: the ``CLIPModel`` / ``CLIPVisionModelWithProjection`` / ``SiglipModel`` of the same
            checkpoint as the tower: its head is copied (small), its text tower embeds the words
            once (then cached); the model itself is not kept.
        clip_tokenizer: the CLIP model's tokenizer (for the words).
        tokenizer: Llava's tokenizer (the words' LLM token ids).
        words: a word-list file, a list of words, or None (wordfreq's ``vocab_size`` most frequent).
        weight: ``lambda`` in ``L_gen + lambda * L_align``.
        vocab_size, template, cache_dir, progress: as :func:`sea_model.vocab.build_vocabulary`.
        **loss_options: ``top_n``, ``window``, ``negate``, ``dedup``, ``init_log_scale``,
            ``max_scale``, ``backend`` of :class:`sea_kernels.SEAAlignmentLoss`.
    """

    def __init__(
        self,
        llava: nn.Module,
        clip: nn.Module,
        clip_tokenizer,
        tokenizer,
        words=None,
        *,
        weight: float = 1.0,
        vocab_size: int = 41_242,
        template: str = "{}",
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
        **loss_options,
    ):
        super().__init__()
        self.weight = float(weight)
        self.enabled = True  # False: the hooks capture nothing and align() gives a zero loss
        self.head = HFJointHead(clip)
        self.grid, skip_rows = _layout(llava, self.head)
        self.loss_fn = SEAHead(skip_rows=skip_rows, **loss_options)
        vocab = build_vocabulary(
            ClipBundle.from_hf(clip, clip_tokenizer),
            tokenizer,
            words,
            size=vocab_size,
            template=template,
            cache_dir=cache_dir,
            progress=progress,
        )
        embedding = llava.get_input_embeddings().weight
        self.loss_fn.set_vocabulary(vocab.features, vocab.token_ids, embedding, feature_dim=self.head.feature_dim)
        self.words = vocab.words
        self.llava = [llava]  # not a submodule: SEA's state is its temperature only
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = [
            llava.model.vision_tower.register_forward_hook(self._capture_tower),
            llava.model.multi_modal_projector.register_forward_hook(self._capture_projector),
        ]
        self.to(embedding.device)

    @property
    def vocab_features(self) -> torch.Tensor:
        return self.loss_fn.vocab_features

    @property
    def word_token_ids(self) -> torch.Tensor:
        return self.loss_fn.word_token_ids

    def remove(self) -> None:
        """Detach the hooks (the Llava model is left as it was)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ----------------------------------------------------------------- hooks

    def _capturing(self, module: nn.Module) -> bool:
        return self.enabled and self.llava[0].training and torch.is_grad_enabled()

    def _capture_tower(self, module, args, output) -> None:
        if self._capturing(module):
            self._captured["last"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _capture_projector(self, module, args, output) -> None:
        if self._capturing(module):
            self._captured["visual"] = output

    # ----------------------------------------------------------------- the loss

    def align(self, *, generator: torch.Generator | None = None, group=None):
        """``SEAAlignmentOutput`` (``loss``, ``pairs``, ``scale``, ...) for the images of the last
        training forward; a zero loss connected to the temperature when it had no image. Call it
        once per forward: the captured tensors are released."""
        last, visual = self._captured.pop("last", None), self._captured.pop("visual", None)
        self._captured.clear()
        patches = None
        if last is not None and visual is not None:
            with torch.no_grad():
                _, patches = self.head(last, pooled=False)
        embedding = self.llava[0].get_input_embeddings().weight
        return self.loss_fn.align(visual, patches, embedding, grid=self.grid, generator=generator, group=group)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.loss_fn.scale().detach())

    # ----------------------------------------------------------------- checkpoints

    def save(self, folder: str | os.PathLike) -> None:
        """Write the temperature (SEA's only trained state) to ``folder/sea.safetensors``."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k.startswith("loss_fn.")}
        save_file(state, os.path.join(folder, SEA_WEIGHTS))

    def load(self, folder: str | os.PathLike) -> bool:
        """Read ``folder/sea.safetensors`` when it exists; returns whether it did."""
        from safetensors.torch import load_file

        path = os.path.join(folder, SEA_WEIGHTS)
        if not os.path.isfile(path):
            return False
        self.load_state_dict(load_file(path), strict=False)
        return True


def _layout(llava: nn.Module, head: HFJointHead) -> tuple[tuple[int, int], int]:
    """``(patch grid, projector rows before the first patch)`` from Llava's config."""
    cfg = llava.config
    vision = cfg.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    dropped = 1 if cfg.vision_feature_select_strategy == "default" else 0
    skip_rows = head.prefix_tokens - dropped  # projector row j is tower token j + dropped: patch j + dropped - prefix
    if skip_rows < 0:
        raise ValueError(
            "vision_feature_select_strategy='default' drops a real patch of a SigLIP tower (it has no CLS): "
            "SEA needs every patch; use 'full' as llava-hf's SigLIP checkpoints do"
        )
    return (side, side), skip_rows


def _accumulate(sums: dict, loss: torch.Tensor, align, scaled: bool, steps: int) -> None:
    """Add one micro-batch's L_gen, L_align and pairs, as shares of the optimizer step, to ``sums``
    (tensors on the device, read at log time)."""
    for key, value in (
        ("L_gen", loss.detach() * (1.0 if scaled else 1.0 / steps)),
        ("L_align", align.loss.detach() / steps),
        ("pairs", align.pair_count.float() / steps),
    ):
        sums[key] = sums.get(key, 0.0) + value


# What SEATrainer adds to transformers.Trainer. The class itself is made on first access (module
# __getattr__), so that importing this module stays cheap (Trainer pulls in accelerate).
class _SEATrainerMethods:
    """``transformers.Trainer`` with SEA: ``SEATrainer(model=llava, sea=LlavaSEA(...), args=..., ...)``.

    * Loss: ``L_gen + weight * L_align`` per micro-batch, SEA's term divided by the
      accumulation steps whenever Trainer does not (Llava's forward takes ``**kwargs``, so
      Trainer normalizes ``L_gen`` by the step's token count instead), so SEA weighs the same
      with any accumulation. The two terms are logged as ``L_gen`` and ``L_align`` (means per
      optimizer step), with ``pairs`` (per micro-batch) and ``tau``.
    * The temperature is an extra optimizer group without weight decay (Trainer's own
      optimizer only; with ``optimizers=(...)`` add ``sea.parameters()`` yourself), is not
      gradient-clipped, and is saved as ``sea.safetensors`` in every checkpoint and
      ``save_model`` folder and read back by ``resume_from_checkpoint``.
    * Evaluation runs without SEA.
    """

    def __init__(self, *args, sea: LlavaSEA, **kwargs):
        super().__init__(*args, **kwargs)
        self.sea = sea.to(next(self.model.parameters()).device)
        self._sea_sums: dict[str, Any] = {}
        self._sea_logged_step = 0

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
        align = self.sea.align()
        # Trainer divides the returned loss by `steps` unless it is already scaled for accumulation.
        per_step = 1.0 / steps if scaled else 1.0
        _accumulate(self._sea_sums, loss, align, scaled, steps)
        return weighted_sum(loss, align.loss, self.sea.weight * per_step)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        steps = self.state.global_step - self._sea_logged_step
        if "loss" in logs and self._sea_sums and steps > 0:
            for key, value in self._sea_sums.items():
                logs[key] = round(float(value) / steps, 6)
            logs["tau"] = self.sea.temperature
            self._sea_sums, self._sea_logged_step = {}, self.state.global_step
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


def _trainer_class() -> type:
    """``SEATrainer``: :class:`_SEATrainerMethods` over ``transformers.Trainer``."""
    from transformers import Trainer

    cls = type("SEATrainer", (_SEATrainerMethods, Trainer), {"__doc__": _SEATrainerMethods.__doc__})
    cls.__module__, cls.__qualname__ = __name__, "SEATrainer"
    return cls


def __getattr__(name: str):
    if name == "SEATrainer":
        cls = _trainer_class()
        globals()["SEATrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
