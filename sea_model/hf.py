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
...)``, in :mod:`sea_model.hf_trainer`, importable from here) adds SEA's loss with the right weight
under gradient accumulation, optimizes the temperature without weight decay, keeps it in step
over DDP ranks, logs ``L_gen``, ``L_align``, ``pairs`` and ``tau``, and saves and restores the
temperature with every checkpoint (``sea.safetensors``).
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from .sea_head import SEAHead
from .vision import ClipBundle, HFJointHead
from .vocab import WordList, build_vocabulary, load_words

SEA_WEIGHTS = "sea.safetensors"
_ATTACHED = "_sea_attached"  # on the Llava model: a weakref to its LlavaSEA


class LlavaSEA(nn.Module):
    """SEA's loss, temperature, vocabulary and joint-space head for one Llava model.

    Args:
        llava: a ``LlavaForConditionalGeneration`` (its vision tower a Hugging Face CLIP or SigLIP),
            or a ``PeftModel`` over one (before or after ``get_peft_model``, with or without
            ``modules_to_save``: the hooks follow the projector that actually runs).
        clip: the ``CLIPModel`` / ``CLIPVisionModelWithProjection`` / ``SiglipModel`` of the same
            checkpoint as the tower (image size, patch size and width are checked): its head is
            copied (small), its text tower embeds the words once (then cached); the model itself is not kept.
        clip_tokenizer: the CLIP model's tokenizer (for the words).
        tokenizer: Llava's tokenizer (the words' LLM token ids): a word it maps to ``<unk>`` only is an
            error; words it maps to nothing are dropped with a warning.
        words: a word-list file, a list of words, or None (wordfreq's ``vocab_size`` most frequent).
        weight: ``lambda`` in ``L_gen + lambda * L_align``.
        vocab_size, template, cache_dir, progress: as :func:`sea_model.vocab.build_vocabulary`.
        **loss_options: ``top_n`` (at most the number of words), ``window``, ``negate``, ``dedup``,
            ``init_log_scale``, ``max_scale``, ``backend`` of :class:`sea_kernels.SEAAlignmentLoss`.

    One ``LlavaSEA`` per model: a second one on the same model is a ``ValueError`` until the first
    one's :meth:`remove` is called.
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
        llava = _llava_of(llava)
        if getattr(llava, _ATTACHED, None) is not None:
            raise ValueError(
                "this Llava model already has a LlavaSEA attached: call .remove() on it before attaching another"
            )
        self.weight = float(weight)
        self.enabled = True  # False: the hooks capture nothing and align() gives a zero loss
        _check_clip(llava, clip)
        self.head = HFJointHead(clip)
        self.grid, skip_rows = _layout(llava, self.head)
        self.loss_fn = SEAHead(skip_rows=skip_rows, **loss_options)
        words = _usable_words(load_words(_as_source(words), size=vocab_size).words, tokenizer)
        if self.loss_fn.top_n > len(words):
            raise ValueError(f"top_n={self.loss_fn.top_n} is more than the {len(words)} words of SEA's vocabulary")
        vocab = build_vocabulary(
            ClipBundle.from_hf(clip, clip_tokenizer),
            tokenizer,
            words,
            template=template,
            cache_dir=cache_dir,
            progress=progress,
        )
        _check_unknown(vocab.words, vocab.token_ids, tokenizer)
        embedding = llava.get_input_embeddings().weight
        self.loss_fn.set_vocabulary(vocab.features, vocab.token_ids, embedding, feature_dim=self.head.feature_dim)
        self.words = vocab.words
        self.llava = [llava]  # not a submodule: SEA's state is its temperature only
        self._captured: dict[str, torch.Tensor] = {}
        self._forward: dict[str, bool] | None = None  # how the last Llava forward ran (see align)
        self._hooked: dict[str, tuple[nn.Module, Any]] = {}
        self._hooks = [llava.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)]
        self._follow_modules()
        setattr(llava, _ATTACHED, weakref.ref(self))
        self.to(embedding.device)

    @property
    def vocab_features(self) -> torch.Tensor:
        return self.loss_fn.vocab_features

    @property
    def word_token_ids(self) -> torch.Tensor:
        return self.loss_fn.word_token_ids

    def remove(self) -> None:
        """Detach the hooks (the Llava model is left as it was; another LlavaSEA may then be attached)."""
        for h in self._hooks:
            h.remove()
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooks, self._hooked = [], {}
        llava = self.llava[0]
        ref = getattr(llava, _ATTACHED, None)
        if ref is not None and ref() is self:
            delattr(llava, _ATTACHED)

    # ----------------------------------------------------------------- hooks

    def _follow_modules(self) -> None:
        """Hook the tower and projector Llava runs now: PEFT's ``modules_to_save`` swaps the projector
        for a wrapper after construction, so this runs before every Llava forward."""
        inner = self.llava[0].model
        for key, module, hook in (
            ("last", inner.vision_tower, self._capture_tower),
            ("visual", inner.multi_modal_projector, self._capture_projector),
        ):
            old = self._hooked.get(key)
            if old is None or old[0] is not module:
                if old is not None:
                    old[1].remove()
                self._hooked[key] = (module, module.register_forward_hook(hook))

    def _before_forward(self, module, args, kwargs) -> None:
        if self.enabled:
            self._follow_modules()
            pixels = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
            self._forward = {
                "training": self.llava[0].training,
                "grad": torch.is_grad_enabled(),
                "images": pixels is not None,
            }

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
        once per forward: the captured tensors are released.

        Raises ``RuntimeError`` when that forward had images but SEA captured nothing: Llava in
        eval mode (call ``llava.train()``), gradients disabled, or no Llava forward since the last call.
        ``group``: a process group, to gather the negatives over its ranks."""
        last, visual = self._captured.pop("last", None), self._captured.pop("visual", None)
        self._captured.clear()
        forward, self._forward = self._forward, None
        if self.enabled and (last is None or visual is None):
            _check_forward(forward)
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


def _check_forward(forward: dict[str, bool] | None) -> None:
    """Why a training step's SEA would be empty: raise unless the last forward simply had no image."""
    if forward is None:
        raise RuntimeError("LlavaSEA.align(): no Llava forward since the last align() (one align() per forward)")
    if not forward["images"]:
        return  # a text-only batch: a zero loss
    if not forward["training"]:
        raise RuntimeError(
            "LlavaSEA.align(): the last Llava forward ran in eval mode and SEA captured nothing: "
            "call llava.train() before training forwards"
        )
    if not forward["grad"]:
        raise RuntimeError(
            "LlavaSEA.align(): the last Llava forward ran without gradients (torch.no_grad) and SEA captured nothing"
        )
    raise RuntimeError("LlavaSEA.align(): the last Llava forward had images but SEA captured no visual tokens")


def _llava_of(model: nn.Module) -> nn.Module:
    """The ``LlavaForConditionalGeneration`` inside ``model`` (itself, or a PeftModel's base model)."""
    if hasattr(model, "get_base_model"):  # a PeftModel
        model = model.get_base_model()
    inner = getattr(model, "model", None)
    if not (hasattr(inner, "vision_tower") and hasattr(inner, "multi_modal_projector")):
        raise ValueError(
            f"LlavaSEA needs a LlavaForConditionalGeneration (or a PeftModel over one); got {type(model).__name__}"
        )
    return model


def _check_clip(llava: nn.Module, clip: nn.Module) -> None:
    """The CLIP model must be the tower's checkpoint: same image size, patch size and width."""
    tower = llava.config.vision_config
    given = getattr(clip.config, "vision_config", clip.config)
    for field in ("image_size", "patch_size", "hidden_size"):
        a, b = getattr(given, field, None), getattr(tower, field, None)
        if a != b:
            raise ValueError(
                f"clip: its vision {field} is {a}, Llava's vision tower's is {b}: "
                "give the CLIP model of the tower's own checkpoint"
            )


def _as_source(words):
    return words if words is None or isinstance(words, (str, os.PathLike, WordList)) else list(words)


def _usable_words(words: list[str], tokenizer) -> list[str]:
    """``words`` without those the LLM tokenizer maps to no token (a warning counts them); an empty list is an error."""
    if not words:
        raise ValueError("words: the word list is empty; SEA needs at least top_n words")
    ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    kept = [w for w, i in zip(words, ids) if i and i != space]
    if len(kept) < len(words):
        keep = set(kept)
        dropped = [w for w in words if w not in keep]
        warnings.warn(
            f"words: {len(dropped)} of {len(words)} words give no LLM token and are dropped (e.g. {dropped[:3]})",
            stacklevel=3,
        )
    if not kept:
        raise ValueError("words: none of the words gives an LLM token")
    return kept


def _check_unknown(words: list[str], token_ids: torch.Tensor, tokenizer) -> None:
    """No word may be only ``<unk>`` to the LLM tokenizer (a tokenizer that is not Llava's, or lacks the words)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    valid = token_ids >= 0
    only_unk = ((token_ids == unk) | ~valid).all(dim=1) & valid.any(dim=1)
    if bool(only_unk.any()):
        bad = [w for w, b in zip(words, only_unk.tolist()) if b]
        raise ValueError(
            f"words: {len(bad)} of {len(words)} words are only <unk> to Llava's tokenizer (e.g. {bad[:3]}): "
            "give Llava's own tokenizer, or drop those words"
        )


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


def __getattr__(name: str):
    if name == "SEATrainer":
        from .hf_trainer import SEATrainer

        globals()["SEATrainer"] = SEATrainer
        return SEATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
