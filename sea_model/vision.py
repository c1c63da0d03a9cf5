"""The vision side: an open_clip image tower that yields, in one forward pass, both what the
adapter reads and what SEA labels.

One pass over the tower gives:

* ``hidden`` ``(B, P, C)``: the hidden states of layer ``select_layer`` with the CLS token
  dropped, as LLaVA-1.5 feeds its projector (``mm_vision_select_layer=-2``,
  ``mm_vision_select_feature="patch"``). Layers are indexed like Hugging Face
  ``hidden_states``: index 0 is the embedding output (after ``ln_pre``), index ``i`` the output
  of block ``i``, so -2 is the output of the second-to-last block.
* ``patch_features`` ``(B, P, d)``: the joint-space feature of every patch token, used to label
  patches against the CLIP text features of the vocabulary (SEA Eq. 4-6). It is the tower's
  pooling head applied to each patch token as if that token were the only one pooled:

  - CLIP ViTs (open_clip ``VisionTransformer``, CLS or average pooling): the last layer,
    ``ln_post``, ``@ proj`` applied to every patch token, exactly what ``encode_image`` does to
    the CLS token.
  - timm towers without prefix tokens (SigLIP: MAP attention-pool head, no per-token projection):
    the head run on a one-token sequence per patch. For the MAP head, attention over a single
    key has weight 1, so this is the head's value path (``kv`` value half -> ``proj`` -> ``+ mlp(norm)``),
    MaskCLIP-style dense features. They live in the same space as ``encode_image`` outputs,
    which is the text joint space up to how well the value path approximates the pooled one;
    note SEA's ``negate=True`` default was chosen for CLIP patch tokens (CLIP Surgery), not for these.
* ``pooled`` ``(B, d)``: the tower's own pooled image embedding (equal to ``encode_image``).
* ``grid`` ``(H, W)``: the patch grid (``H * W == P``), for ``patch_labels(grid=)``.

Models are named as open_clip names them (``ViT-L-14-336-quickgelu`` with ``pretrained="openai"``
is LLaVA-1.5's tower), with ``pretrained`` a tag or a local checkpoint file, or given as a
plain open_clip model config dict (tests build tiny random ones, no download).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn

ASPECT_RATIOS = ("pad", "square", "crop")


@dataclass
class VisionConfig:
    """How to build the vision tower (a plain dataclass, JSON-serialisable with ``asdict``).

    Args:
        name: an open_clip model name (``"ViT-L-14-336-quickgelu"``), or an ``hf-hub:`` /
            ``local-dir:`` identifier; with ``model_cfg`` it is only a label.
        pretrained: a pretrained tag (``"openai"``; downloads), a local checkpoint file, or None
            for random weights.
        model_cfg: an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``)
            used instead of the built-in config of ``name``.
        preprocess_cfg: overrides of open_clip's preprocessing config (``mean``, ``std``,
            ``interpolation``, ...).
        select_layer: the hidden-state layer the adapter reads (HF indexing, default -2).
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5: expand to a square with the mean colour, then
            resize), ``"square"`` (resize to a square, ignoring the aspect ratio) or ``"crop"``
            (open_clip's default: resize the short side, centre crop).
    """

    name: str = "ViT-L-14-336-quickgelu"
    pretrained: str | None = "openai"
    model_cfg: dict | None = None
    preprocess_cfg: dict = field(default_factory=dict)
    select_layer: int = -2
    image_aspect_ratio: str = "pad"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        return cls(**d)


class TowerOutput(NamedTuple):
    hidden: torch.Tensor  # (B, P, C): layer `select_layer`, CLS dropped (adapter input)
    patch_features: torch.Tensor | None  # (B, P, d): joint-space patch features (for labels)
    pooled: torch.Tensor | None  # (B, d): the tower's pooled embedding (= encode_image)
    # (the last two are None from ``forward(..., joint_space=False)``)
    grid: tuple[int, int]  # (H, W), H * W == P


# --------------------------------------------------------------------------- loading


@dataclass
class ClipBundle:
    """A whole open_clip model (both towers) with its tokenizer and preprocessing config.

    The text tower is needed only to compute the vocabulary's text features (once, then
    cached); the vision tower goes into :class:`VisionTower`.
    """

    model: nn.Module
    tokenizer: Callable
    preprocess_cfg: dict
    config: VisionConfig

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Joint-space text features ``(n, d)`` (not normalised), float32 on the CPU."""
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts)).to(device)
        return self.model.encode_text(tokens).float().cpu()

    def key(self) -> str:
        """A string identifying architecture and weights (for cache keys).

        Named weights are identified by tag, or by path, size and mtime for a file; random
        weights (``pretrained=None``) by a hash of the text tower's parameters.
        """
        cfg = self.config
        parts = [cfg.name, json.dumps(cfg.model_cfg, sort_keys=True)]
        if cfg.pretrained and os.path.isfile(cfg.pretrained):
            st = os.stat(cfg.pretrained)
            parts.append(f"file:{os.path.abspath(cfg.pretrained)}:{st.st_size}:{st.st_mtime_ns}")
        elif cfg.pretrained:
            parts.append(f"tag:{cfg.pretrained}")
        else:
            parts.append(f"random:{_text_tower_fingerprint(self.model)}")
        return "|".join(parts)


def _text_tower_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("visual."):
            continue
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_clip(config: VisionConfig, *, device: str | torch.device = "cpu") -> ClipBundle:
    """Build the open_clip model of ``config`` (patch dropout off, eval mode, frozen)."""
    import open_clip

    if config.image_aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}; got {config.image_aspect_ratio!r}")
    if config.model_cfg is None:
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


# --------------------------------------------------------------------------- preprocessing


def expand2square(image, background_color: tuple[int, ...]):
    """LLaVA's ``expand2square``: paste ``image`` centred on a square of ``background_color``."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


class ImageProcessor:
    """PIL image -> normalised ``(3, H, W)`` tensor, with open_clip's own eval transforms.

    ``aspect`` ``"pad"`` expands to a square with the mean colour first (LLaVA-1.5),
    ``"square"`` resizes straight to a square (open_clip ``resize_mode="squash"``), ``"crop"``
    is open_clip's default (shortest side resize + centre crop). Picklable for DataLoader workers.
    """

    def __init__(self, preprocess_cfg: dict, aspect: str = "pad"):
        from open_clip.transform import PreprocessCfg, image_transform_v2

        if aspect not in ASPECT_RATIOS:
            raise ValueError(f"aspect must be one of {ASPECT_RATIOS}; got {aspect!r}")
        cfg = dict(preprocess_cfg)
        cfg["resize_mode"] = "squash" if aspect == "square" else "shortest"
        self.cfg, self.aspect = PreprocessCfg(**cfg), aspect
        self.fill = tuple(int(round(m * 255)) for m in self.cfg.mean)
        self.transform = image_transform_v2(self.cfg, is_train=False)

    def __call__(self, image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.aspect == "pad":
            image = expand2square(image, self.fill)
        return self.transform(image)


# --------------------------------------------------------------------------- the tower


class VisionTower(nn.Module):
    """A frozen open_clip image tower returning :class:`TowerOutput` from one forward pass.

    Build with :meth:`from_clip` (or :meth:`from_config`). Supported: open_clip
    ``VisionTransformer`` (CLIP ViTs, CLS or average pooling, no attentional pooler) and
    ``TimmModel`` wrapping a timm ViT without prefix tokens (SigLIP). The tower's weights are
    kept frozen; ``forward`` runs without autograd unless some tower parameter requires grad.
    """

    def __init__(
        self, visual: nn.Module, preprocess_cfg: dict, *, select_layer: int = -2, image_aspect_ratio: str = "pad"
    ):
        super().__init__()
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        self.visual = visual
        if isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None:
                raise ValueError("vision tower: open_clip ViTs with an attentional pooler (CoCa) are not supported")
            if not isinstance(visual.patch_dropout, nn.Identity):
                raise ValueError("vision tower: patch dropout must be off (the patch grid must be complete)")
            self.kind = "clip"
            n_layers = len(visual.transformer.resblocks)
            self.hidden_size = visual.transformer.width
            self.grid = tuple(int(g) for g in visual.grid_size)
        elif isinstance(visual, TimmModel):
            trunk = visual.trunk
            if not hasattr(trunk, "blocks") or not hasattr(trunk, "forward_intermediates"):
                raise ValueError(f"vision tower: timm trunk {type(trunk).__name__} is not a ViT")
            if getattr(trunk, "num_prefix_tokens", 0):
                raise ValueError(
                    "vision tower: timm ViTs with prefix (CLS/register) tokens are not supported; "
                    "SigLIP-style towers (no prefix tokens) are"
                )
            self.kind = "timm"
            n_layers = len(trunk.blocks)
            self.hidden_size = trunk.embed_dim
            self.grid = tuple(int(g) for g in trunk.patch_embed.grid_size)
        else:
            raise ValueError(f"vision tower: unsupported open_clip visual module {type(visual).__name__}")
        if not -(n_layers + 1) <= select_layer <= n_layers:
            raise ValueError(
                f"select_layer must be in [{-(n_layers + 1)}, {n_layers}] for {n_layers} blocks; got {select_layer}"
            )
        self.layer = select_layer % (n_layers + 1)  # index into [embeddings, block 1, ..., block n]
        if self.kind == "timm" and self.layer == 0:
            raise ValueError("select_layer: the embedding output (layer 0) is not available for timm towers")
        self.n_layers = n_layers
        self.select_layer = select_layer
        self.num_patches = self.grid[0] * self.grid[1]
        self.preprocess_cfg = dict(preprocess_cfg)
        self.image_aspect_ratio = image_aspect_ratio
        with torch.no_grad():
            probe = torch.zeros(1, 3, *self.image_size, device=self._param().device, dtype=self._param().dtype)
            self.feature_dim = int(self._pooled_and_patches(self._run(probe)[1])[0].shape[-1])
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_clip(cls, clip: ClipBundle) -> VisionTower:
        c = clip.config
        return cls(
            clip.model.visual, clip.preprocess_cfg, select_layer=c.select_layer, image_aspect_ratio=c.image_aspect_ratio
        )

    @classmethod
    def from_config(cls, config: VisionConfig, *, device="cpu") -> VisionTower:
        return cls.from_clip(load_clip(config, device=device))

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.preprocess_cfg.get("size", 224)
        return (size, size) if isinstance(size, int) else tuple(size)

    def image_processor(self) -> ImageProcessor:
        """The preprocessing for this tower (PIL image -> ``(3, H, W)`` tensor)."""
        return ImageProcessor(self.preprocess_cfg, self.image_aspect_ratio)

    def train(self, mode: bool = True):
        # Frozen: always eval (no dropout), whatever the parent module's mode.
        return super().train(False)

    def _param(self) -> torch.Tensor:
        return next(self.visual.parameters())

    def _run(self, pixel_values: torch.Tensor, stop_early: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass: (layer ``select_layer`` patch tokens, last-layer tokens before the head);
        with ``stop_early`` the blocks after ``select_layer`` are skipped and the second is None."""
        if self.kind == "clip":
            v = self.visual
            x = v._embeds(pixel_values)  # conv1, CLS, positions, (no) patch dropout, ln_pre
            if self.layer == 0:
                final, selected = (None if stop_early else v.transformer(x)), x
            else:
                final, inter = v.transformer.forward_intermediates(x, indices=[self.layer - 1], stop_early=stop_early)
                selected = inter[0]
            return selected[:, 1:], (None if stop_early else final)
        final, inter = self.visual.trunk.forward_intermediates(
            pixel_values, indices=[self.layer - 1], output_fmt="NLC", norm=False, stop_early=stop_early
        )
        # no prefix tokens; `final` went through the trunk's final norm
        return inter[0], (None if stop_early else final)

    def _pooled_and_patches(self, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "clip":
            v = self.visual
            if v.pool_type == "tok" and not v.final_ln_after_pool:
                pooled = v.ln_post(final[:, 0])
            else:
                pooled, _ = v._pool(final)
            patches = v.ln_post(final[:, 1:])
            if v.proj is not None:
                pooled, patches = pooled @ v.proj, patches @ v.proj
            return pooled, patches
        v = self.visual
        pooled = v.head(v.trunk.forward_head(final))
        B, P, C = final.shape
        # The head on one-token sequences: for a MAP head, the value path of each token.
        patches = v.head(v.trunk.forward_head(final.reshape(B * P, 1, C))).reshape(B, P, -1)
        return pooled, patches

    def forward(self, pixel_values: torch.Tensor, *, joint_space: bool = True) -> TowerOutput:
        """``joint_space=False``: the adapter input only (``patch_features`` and ``pooled`` None), and
        the blocks after ``select_layer`` are not run: what a model without SEA needs."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(
                f"pixel_values must be (B, 3, {self.image_size[0]}, {self.image_size[1]}); got "
                f"{tuple(pixel_values.shape)}"
            )
        pixel_values = pixel_values.to(device=self._param().device, dtype=self._param().dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            hidden, final = self._run(pixel_values, stop_early=not joint_space)
            pooled, patches = self._pooled_and_patches(final) if joint_space else (None, None)
        return TowerOutput(hidden, patches, pooled, self.grid)
