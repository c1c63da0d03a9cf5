"""Loading a CLIP model (both towers), its tokenizer and preprocessing: open_clip by name, from a
plain config dict (tests build tiny random ones, no download) or a local checkpoint; Hugging Face
CLIP/SigLIP models by hub name or folder.

Models are named as open_clip names them (``ViT-L-14-336-quickgelu`` with ``pretrained="openai"``
is LLaVA-1.5's tower). The text tower is needed only for the vocabulary's text features
(:mod:`sea_model.vocab`, cached under :meth:`ClipBundle.key`); the vision tower goes into
:class:`~sea_model.vision.tower.VisionTower`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import ASPECT_RATIOS, VisionConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipBundle:
    """A whole CLIP model (both towers) with its tokenizer and preprocessing config.

    ``model`` is an open_clip model, or a Hugging Face ``CLIPModel`` / ``SiglipModel`` (build
    one from models you already hold with :meth:`from_hf`). The text tower is needed only to
    compute the vocabulary's text features (once, then cached); the vision tower goes into
    :class:`VisionTower`.
    """

    model: nn.Module
    tokenizer: Callable
    preprocess_cfg: dict
    config: VisionConfig

    @classmethod
    def from_hf(cls, model: nn.Module, tokenizer, **config) -> ClipBundle:
        """A bundle around a Hugging Face CLIP/SigLIP model and its tokenizer (``config``: VisionConfig fields)."""
        config.setdefault("name", getattr(model, "name_or_path", "") or type(model).__name__)
        config = VisionConfig(library="transformers", **config)
        return cls(model, tokenizer, hf_preprocess_cfg(model, config.name), config)

    @property
    def is_hf(self) -> bool:
        return self.config.resolved_library() == "transformers"

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Joint-space text features ``(n, d)`` (not normalised), float32 on the CPU."""
        device = next(self.model.parameters()).device
        if self.is_hf:
            return hf_text_features(self.model, self.tokenizer, list(texts)).float().cpu()
        tokens = self.tokenizer(list(texts)).to(device)
        return self.model.encode_text(tokens).float().cpu()

    def key(self) -> str:
        """A string identifying architecture and weights (for cache keys).

        Named weights are identified by tag, or by path, size and mtime for a file (the weight
        files of a local Hugging Face folder); random weights (``pretrained=None``) by a hash of
        the text tower's parameters.
        """
        cfg = self.config
        parts = [cfg.name, json.dumps(cfg.model_cfg, sort_keys=True)]
        files = _weight_files(cfg)
        if files:
            for f in files:
                st = os.stat(f)
                parts.append(f"file:{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}")
        elif cfg.pretrained:
            parts.append(f"tag:{cfg.pretrained}")
        else:
            parts.append(f"random:{_text_tower_fingerprint(self.model)}")
        return "|".join(parts)


def _weight_files(cfg: VisionConfig) -> list[str]:
    """Local weight files behind ``cfg`` (empty for tags, hub names and random weights)."""
    if not cfg.pretrained:
        return []
    if cfg.resolved_library() == "transformers":
        if not os.path.isdir(cfg.name):
            return []
        return sorted(os.path.join(cfg.name, f) for f in os.listdir(cfg.name) if f.endswith((".safetensors", ".bin")))
    return [cfg.pretrained] if os.path.isfile(cfg.pretrained) else []


def _text_tower_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(("visual.", "vision_model.", "visual_projection.")):
            continue
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init(asked: bool):
    """open_clip warns (root logger) when it builds a model without weights: no news when ``pretrained``
    is None on purpose (random towers for tests and benchmarks)."""
    if not asked:
        yield
        return
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_clip(config: VisionConfig, *, device: str | torch.device = "cpu") -> ClipBundle:
    """Build the CLIP model of ``config`` (open_clip: patch dropout off; eval mode, frozen)."""
    if config.image_aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}; got {config.image_aspect_ratio!r}")
    if config.resolved_library() == "transformers":
        return _load_hf(config, device)
    import open_clip

    if config.model_cfg is None:
        with _quiet_random_init(config.pretrained is None):
            model = open_clip.create_model(
                config.name,
                pretrained=config.pretrained,
                force_patch_dropout=0.0,
                force_preprocess_cfg=config.preprocess_cfg or None,
                device=device,
            )
        preprocess_cfg = dict(model.visual.preprocess_cfg)
        tokenizer = open_clip.get_tokenizer(config.name)
    else:
        model, preprocess_cfg, tokenizer = _from_model_cfg(config)
        model.to(device)
    model.eval().requires_grad_(False)
    return ClipBundle(model, tokenizer, preprocess_cfg, config)


def _load_hf(config: VisionConfig, device) -> ClipBundle:
    """A Hugging Face CLIP/SigLIP model (and its tokenizer when the folder has one) from ``config.name``."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        if config.pretrained is None:
            model = AutoModel.from_config(AutoConfig.from_pretrained(config.name))
        else:
            model = AutoModel.from_pretrained(config.name)
    except OSError as exc:
        raise ValueError(f"vision.name: cannot load a Hugging Face model from {config.name!r} ({exc})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.name)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a vision-only folder: the vocabulary needs a CLIP text tower elsewhere
    model.to(device).eval().requires_grad_(False)
    return ClipBundle(model, tokenizer, hf_preprocess_cfg(model, config.name), config)


def hf_preprocess_cfg(model: nn.Module, name: str | None = None) -> dict:
    """open_clip preprocessing equivalent to the model's ``CLIPImageProcessor``/``SiglipImageProcessor``
    (read from ``name`` when it holds one, else the model family's defaults)."""
    vision = getattr(model.config, "vision_config", model.config)
    if not hasattr(vision, "image_size"):
        return {}  # a text tower alone (for the vocabulary only)
    size = int(vision.image_size)
    siglip = "siglip" in vision.model_type
    mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (OPENAI_MEAN, OPENAI_STD)
    proc = None
    if name and (os.path.isdir(name) or ("/" in name and not os.path.exists(name))):  # a folder or a hub name
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError, TypeError):
            proc = None
    if proc is not None:
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    return {
        "size": size,
        "mean": tuple(mean),
        "std": tuple(std),
        "interpolation": "bilinear" if siglip else "bicubic",
    }


def hf_text_features(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Joint-space text features of a Hugging Face CLIP/SigLIP model (``get_text_features``), or
    of its text tower alone (``CLIPTextModelWithProjection``, ``SiglipTextModel``).

    SigLIP is fed as it was trained: padded to ``max_length`` (64 unless the tokenizer says
    otherwise), no attention mask; CLIP gets padding to the longest text and its attention mask.
    """
    if tokenizer is None:
        raise ValueError(
            "the Hugging Face CLIP model has no tokenizer: pass one (ClipBundle.from_hf(model, tokenizer))"
        )
    device = next(model.parameters()).device
    text_cfg = getattr(model.config, "text_config", model.config)
    limit = int(getattr(text_cfg, "max_position_embeddings", 77))
    if "siglip" in text_cfg.model_type:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=min(64, limit), return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"].to(device)}
    else:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
    if hasattr(model, "get_text_features"):  # CLIPModel, SiglipModel
        out = model.get_text_features(**inputs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    out = model(**inputs)  # CLIPTextModelWithProjection (text_embeds), SiglipTextModel (pooler_output)
    return out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output


def _from_model_cfg(config: VisionConfig):
    """An open_clip model from a plain config dict (what ``create_model`` does for built-ins)."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
    from open_clip.transform import PreprocessCfg

    cfg = copy.deepcopy(config.model_cfg)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"model_cfg must have key {key!r} (an open_clip model config); got keys {sorted(cfg)}")
    if "multimodal_cfg" in cfg:
        raise ValueError("model_cfg: CoCa models (multimodal_cfg) are not supported as SEA vision towers")
    text_cfg = cfg["text_cfg"]
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    if "timm_model_name" not in cfg["vision_cfg"]:
        cfg["vision_cfg"]["patch_dropout"] = 0.0
    model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)
    if config.pretrained:
        if not os.path.isfile(config.pretrained):
            raise ValueError(
                f"pretrained must be a local checkpoint file when model_cfg is given; got {config.pretrained!r}"
            )
        open_clip.load_checkpoint(model, config.pretrained)
    preprocess_cfg = asdict(PreprocessCfg())
    preprocess_cfg.update(config.preprocess_cfg or {})
    preprocess_cfg["size"] = model.visual.image_size
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    else:
        tokenizer = SimpleTokenizer(context_length=context_length)
    return model, preprocess_cfg, tokenizer
