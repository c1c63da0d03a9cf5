"""A LLaVA-style model with SEA: vision tower -> adapter -> any causal LM, plus ``L_align``.

``SEAModel.forward`` embeds ``input_ids``, overwrites the embeddings at ``<image>`` positions with
the adapter's outputs (each image sample carries exactly ``tower.num_patches`` consecutive
``<image>`` ids, as :mod:`sea_model.prompts` produces), runs the LM for ``L_gen`` and, when SEA is
on, computes ``L_align`` from the same forward (:class:`~sea_model.sea_head.SEAHead`: the adapter
outputs, the tower's joint-space patch features, the vocabulary, ``llm.get_input_embeddings().weight``).
``loss = L_gen + weight * L_align``.

Dtypes: tower and LM run in ``ModelConfig.dtype``; the adapter and SEA's log-scale are kept in
float32 (the small trainable parts), with casts at their boundaries. The vocabulary features are
stored in the tower's dtype (the patch features' dtype), so the labels kernel scores 16-bit x
16-bit (see ``SEAAlignmentLoss``'s mixed-dtype policy).

Build from a plain :class:`ModelConfig` with :func:`build_model`, so that a saved config
(``ModelConfig.to_dict``) rebuilds the same architecture.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sea_kernels._common import DTYPES

from .config import MODEL_DTYPES, ModelConfig, SEAConfig
from .prompts import IGNORE_INDEX, add_image_token, prompt_ids
from .sea_head import SEAHead, weighted_sum
from .vision import VisionTower, load_clip
from .vocab import build_vocabulary


def default_attn_implementation(dtype: torch.dtype) -> str:
    """``flash_attention_2`` when CUDA, the flash-attn package and fp16/bf16 are all there, else ``sdpa``."""
    if (
        torch.cuda.is_available()
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn")
    ):
        return "flash_attention_2"
    return "sdpa"


# --------------------------------------------------------------------------- adapter


def build_adapter(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``mlp{n}x_gelu``: Linear(in, out), then (GELU, Linear(out, out)) n-1 times (LLaVA-1.5's
    ``mlp2x_gelu`` for n=2); ``linear``: one Linear; ``identity``: nothing (needs in == out)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"adapter 'identity' needs equal dims; vision {in_dim} != llm {out_dim}")
        return nn.Identity()
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"adapter must be 'mlp<n>x_gelu' (n >= 1), 'linear' or 'identity'; got {kind!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- model


@dataclass
class SEAModelOutput:
    """What :meth:`SEAModel.forward` returns; the tensors stay on the device (``pairs`` and
    ``temperature`` read them, waiting for the device)."""

    loss: torch.Tensor  # L_gen + weight * L_align (L_gen alone when SEA is off)
    loss_gen: torch.Tensor
    loss_align: torch.Tensor | None  # None when SEA is off
    pair_count: torch.Tensor | None  # 0-d int64: pairs that entered L_align (None when SEA is off)
    scale: torch.Tensor | None  # 0-d: 1 / tau of SEA's contrastive loss, detached (None when SEA is off)
    logits: torch.Tensor
    align: Any = None  # the SEAAlignmentOutput (labels, keep, ...) when computed

    @property
    def pairs(self) -> int:
        """Pairs that entered ``L_align`` (0 when SEA is off or there was no image)."""
        return 0 if self.pair_count is None else int(self.pair_count)

    @property
    def temperature(self) -> float | None:
        """``tau = 1 / scale`` of SEA's contrastive loss (None when SEA is off)."""
        return None if self.scale is None else float(1.0 / self.scale)


class SEAModel(nn.Module):
    """Vision tower + adapter + causal LM (+ SEA: :class:`~sea_model.sea_head.SEAHead` with its vocabulary).

    Args:
        tower: a :class:`~sea_model.vision.VisionTower` (frozen).
        llm: any HF ``AutoModelForCausalLM`` model.
        image_token_id: the tokenizer id of ``<image>`` (may be >= the LM's vocabulary size).
        adapter: see :func:`build_adapter`.
        sea: :class:`~sea_model.config.SEAConfig`; None or ``enabled=False`` turns SEA off.
        vocab_features, word_token_ids: ``(q, d)`` and ``(q, L)`` (``Vocabulary.features`` /
            ``.token_ids``), required when SEA is on; kept as non-persistent buffers.
    """

    def __init__(
        self,
        tower: VisionTower,
        llm: nn.Module,
        *,
        image_token_id: int,
        adapter: str = "mlp2x_gelu",
        sea: SEAConfig | None = None,
        vocab_features: torch.Tensor | None = None,
        word_token_ids: torch.Tensor | None = None,
    ):
        super().__init__()
        if not getattr(tower, "tokens_are_patches", True):
            raise ValueError(
                "SEAModel: the tower's adapter input must be one row per patch: vision select_strategy "
                "'default' for CLIP towers (drops CLS), 'full' for SigLIP towers (no CLS to drop)"
            )
        self.tower, self.llm = tower, llm
        self.image_token_id = int(image_token_id)
        llm_dim = llm.get_input_embeddings().weight.shape[1]
        self.adapter = build_adapter(adapter, tower.hidden_size, llm_dim).float()
        self.sea_config = sea if sea is not None else SEAConfig(enabled=False)
        self.sea = None
        if self.sea_config.enabled:
            if vocab_features is None or word_token_ids is None:
                raise ValueError("vocab_features and word_token_ids are required when SEA is enabled")
            self.sea = SEAHead(**self.sea_config.loss_kwargs())
            self.set_vocabulary(vocab_features, word_token_ids)
        self.model_config: ModelConfig | None = None  # set by build_model

    @property
    def vocab_features(self) -> torch.Tensor | None:
        """SEA's word features ``(q, d)`` (None when SEA is off)."""
        return None if self.sea is None else self.sea.vocab_features

    @property
    def word_token_ids(self) -> torch.Tensor | None:
        """SEA's words' LM token ids ``(q, L)`` (None when SEA is off)."""
        return None if self.sea is None else self.sea.word_token_ids

    def set_vocabulary(self, vocab_features: torch.Tensor, word_token_ids: torch.Tensor) -> None:
        """Install SEA's vocabulary (checked against the tower and the LM), in the tower's compute
        dtype: the dtype its patch features come in (see SEAAlignmentLoss's mixed-dtype policy;
        under autocast the loss casts it once more and caches that)."""
        if self.sea is None:
            raise ValueError("SEA is off in this model (sea.enabled=False): it has no vocabulary")
        self.sea.set_vocabulary(
            vocab_features,
            word_token_ids,
            self.llm.get_input_embeddings().weight,
            feature_dim=self.tower.feature_dim,
            dtype=next(self.tower.parameters()).dtype,
        )

    # ----------------------------------------------------------------- training helpers

    def freeze_for_stage(self, stage: int) -> list[str]:
        """Stage 1: only the adapter and SEA's log-scale train. Stage 2: adapter, log-scale and
        the LM. The tower is always frozen. Returns the trainable parameter names."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2; got {stage!r}")
        self.requires_grad_(False)
        self.adapter.requires_grad_(True)
        if self.sea is not None:
            self.sea.requires_grad_(True)
        if stage == 2:
            self.llm.requires_grad_(True)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ----------------------------------------------------------------- forward

    def _image_rows(self, input_ids, pixel_values, has_image):
        """Check placeholder counts; return (is_image mask (B, T), has_image (B,), images (n, 3, H, W))."""
        P = self.tower.num_patches
        is_img = input_ids == self.image_token_id
        counts = is_img.sum(1)
        bad = ((counts != 0) & (counts != P)).nonzero()
        if len(bad):
            b = int(bad[0])
            raise ValueError(
                f"input_ids: sample {b} has {int(counts[b])} <image> tokens; expected 0 or {P} (tower.num_patches)"
            )
        inferred = counts > 0
        if has_image is not None and not torch.equal(has_image.to(inferred.device).bool(), inferred):
            raise ValueError(
                f"has_image {has_image.tolist()} disagrees with the <image> tokens in input_ids {inferred.tolist()}"
            )
        n = int(inferred.sum())
        if n == 0:
            return is_img, inferred, None
        if pixel_values is None:
            raise ValueError(f"pixel_values is required: {n} sample(s) have <image> tokens")
        if pixel_values.shape[0] == input_ids.shape[0] and n != input_ids.shape[0]:
            pixel_values = pixel_values[inferred.to(pixel_values.device)]  # one row per sample given
        if pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} images for {n} samples with <image> tokens")
        return is_img, inferred, pixel_values

    def embed(self, input_ids, pixel_values=None, has_image=None):
        """``(inputs_embeds, is_image, visual_tokens, tower_output)``; the last two are None without images."""
        is_img, _, images = self._image_rows(input_ids, pixel_values, has_image)
        emb = self.llm.get_input_embeddings()
        embeds = emb(input_ids.masked_fill(is_img, 0))  # <image> ids may lie beyond the table
        if images is None:
            return embeds, is_img, None, None
        out = self.tower(images, joint_space=self.sea is not None, pooled=False)  # patch features only for SEA
        param = next(self.adapter.parameters(), None)
        visual = self.adapter(out.hidden.to(param.dtype if param is not None else out.hidden.dtype))
        embeds = embeds.masked_scatter(is_img.unsqueeze(-1), visual.to(embeds.dtype))
        return embeds, is_img, visual, out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        group=None,
        **_: Any,
    ) -> SEAModelOutput:
        """``input_ids``/``attention_mask``/``labels`` ``(B, T)``, ``pixel_values`` ``(n_images, 3, H, W)``
        (or one row per sample), ``has_image`` ``(B,)`` optional check. ``generator`` drives SEA's
        sampling; ``group`` its cross-rank negatives. Extra keys (a collator's ``ids``...) are ignored."""
        embeds, is_img, visual, tower_out = self.embed(input_ids, pixel_values, has_image)
        if labels is None:
            labels = (
                input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX) if attention_mask is not None else input_ids
            )
        labels = labels.masked_fill(is_img, IGNORE_INDEX)
        if bool((labels[:, 1:] != IGNORE_INDEX).any()):
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
            loss_gen = out.loss
        else:  # nothing supervised: the LM's mean would be NaN
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
            loss_gen = out.logits.sum() * 0.0
        loss = loss_gen
        if visual is None and self.training:
            # Keep trainable adapter weights in the graph (DDP expects a gradient for every one).
            loss = loss + sum(p.sum() for p in self.adapter.parameters()) * 0.0
        loss_align, pair_count, scale, align = None, None, None, None
        if self.sea is not None:
            images = tower_out is not None
            result = self.sea.align(
                visual,
                tower_out.patch_features if images else None,
                self.llm.get_input_embeddings().weight,
                grid=tower_out.grid if images else None,
                generator=generator,
                group=group,
            )
            loss_align, pair_count, scale = result.loss, result.pair_count, result.scale
            align = result if images else None  # no labels without images
            loss = weighted_sum(loss, loss_align, self.sea_config.weight)
        return SEAModelOutput(loss, loss_gen, loss_align, pair_count, scale, out.logits, align)

    # ----------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding from prompt ids (``<image>`` blocks expanded); returns only the new
        tokens ``(B, n)``. Batched prompts must be left-padded with an ``attention_mask``."""
        embeds, _, _, _ = self.embed(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = eos_token_id if eos_token_id is not None else self.llm.config.eos_token_id
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=pad_token_id if pad_token_id is not None else eos,
        )


def answer(
    model: SEAModel, tokenizer, question: str, image=None, *, template: str = "auto", max_new_tokens: int = 32
) -> str:
    """Ask ``question`` about a PIL ``image`` (or none) and return the greedy answer text.

    ``template`` as in :mod:`sea_model.data` (``"plain"`` for a stage-1 model: the image alone
    is the prompt and the answer is a caption). Prompt and answer must fit the model's positions
    (``max_position_embeddings``): a larger ``max_new_tokens`` is a ``ValueError``."""
    device = model.llm.get_input_embeddings().weight.device
    ids = prompt_ids(
        question,
        tokenizer,
        template=template,
        image=image is not None,
        image_token_id=model.image_token_id,
        num_image_tokens=model.tower.num_patches,
    )
    positions = getattr(model.llm.config, "max_position_embeddings", None) or float("inf")
    if not 1 <= max_new_tokens <= positions - len(ids):
        raise ValueError(
            f"max_new_tokens must be in [1, {positions - len(ids)}]: the model has {positions} positions and the "
            f"prompt takes {len(ids)}; got {max_new_tokens}"
        )
    pixel_values = model.tower.image_processor()(image).unsqueeze(0).to(device) if image is not None else None
    new = model.generate(
        torch.tensor([ids], device=device),
        pixel_values,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- building


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    source = config.tokenizer or (config.llm if isinstance(config.llm, str) else None)
    if source is None:
        raise ValueError(
            "tokenizer: ModelConfig.llm is a config dict, so ModelConfig.tokenizer (or a tokenizer object) is required"
        )
    return AutoTokenizer.from_pretrained(source)


def load_llm(
    spec: str | dict, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> nn.Module:
    """An ``AutoModelForCausalLM`` from a hub name / directory, or from a config dict (random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = attn_implementation or default_attn_implementation(dtype)
    if isinstance(spec, dict):
        spec = dict(spec)
        if "model_type" not in spec:
            raise ValueError(f"llm: a config dict needs 'model_type'; got keys {sorted(spec)}")
        cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    if not isinstance(spec, str):
        raise TypeError(f"llm must be a model name/path or a config dict; got {type(spec).__name__}")
    return AutoModelForCausalLM.from_pretrained(spec, attn_implementation=attn, dtype=dtype)


def build_model(config: ModelConfig, tokenizer=None, *, device: str | torch.device = "cpu", progress: bool = True):
    """Build ``(SEAModel, tokenizer)`` from ``config``: tower, LM, adapter and, with SEA on, the
    vocabulary (text features cached on disk, see :mod:`sea_model.vocab`).

    ``tokenizer`` (else loaded from the config) gets ``<image>`` added and, when it has no pad
    token, ``unk`` (or ``eos``) as pad. The CLIP text tower is dropped after the vocabulary.
    """
    if config.dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(MODEL_DTYPES)}; got {config.dtype!r}")
    dtype = DTYPES[config.dtype]
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
    image_token_id = add_image_token(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    clip = load_clip(config.vision, device=device)
    tower = VisionTower.from_clip(clip)
    feats = ids = None
    if config.sea.enabled:
        s = config.sea
        vocab = build_vocabulary(
            clip, tokenizer, s.words, size=s.vocab_size, template=s.template, cache_dir=s.cache_dir, progress=progress
        )
        feats, ids = vocab.features, vocab.token_ids
    del clip
    llm = load_llm(config.llm, dtype=dtype, attn_implementation=config.attn_implementation).to(device)
    tower.to(device=device, dtype=dtype)
    model = SEAModel(
        tower,
        llm,
        image_token_id=image_token_id,
        adapter=config.adapter,
        sea=config.sea,
        vocab_features=feats,
        word_token_ids=ids,
    ).to(device)
    model.model_config = config
    return model, tokenizer
