"""The vision tower: one frozen forward pass that yields both what the adapter reads and what SEA labels.

* ``hidden`` ``(B, P, C)``: the hidden states of layer ``select_layer`` with the CLS token dropped,
  as LLaVA-1.5 feeds its projector (``mm_vision_select_layer=-2``, ``mm_vision_select_feature="patch"``).
  Layers are indexed like Hugging Face ``hidden_states``: 0 is the embedding output (after
  ``ln_pre``), ``i`` the output of block ``i``, so -2 is the output of the second-to-last block.
* ``patch_features`` ``(B, P, d)``: the joint-space feature of every patch token, which SEA labels
  against the CLIP text features of its vocabulary (Eq. 4-6): the tower's head on each patch token
  (:mod:`.families`).
* ``pooled`` ``(B, d)``: the tower's own pooled image embedding (equal to ``encode_image``).
* ``grid`` ``(H, W)``: the patch grid (``H * W == P``), for ``patch_labels(grid=)``.

Hugging Face towers follow Llava: ``select_layer`` as ``vision_feature_layer`` (an int, or a list
whose layers are concatenated on the feature axis) and ``select_strategy`` as
``vision_feature_select_strategy`` (``"default"`` drops the first token, ``"full"`` keeps them all).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..config import SELECT_STRATEGIES, VisionConfig
from .families import family_of, hf_family
from .loading import ClipBundle, hf_preprocess_cfg, load_clip
from .preprocess import ImageProcessor


class TowerOutput(NamedTuple):
    hidden: torch.Tensor  # (B, P, C): layer `select_layer`, CLS dropped (adapter input)
    patch_features: torch.Tensor | None  # (B, P, d): joint-space patch features (for labels)
    pooled: torch.Tensor | None  # (B, d): the tower's pooled embedding (= encode_image)
    # (the last two are None from ``forward(..., joint_space=False)``)
    grid: tuple[int, int]  # (H, W), H * W == P


class VisionTower(nn.Module):
    """A frozen image tower returning :class:`TowerOutput` from one forward pass.

    Build with :meth:`from_clip` (or :meth:`from_config`, :meth:`from_hf`). Supported: open_clip
    ``VisionTransformer`` (CLIP ViTs, CLS or average pooling, no attentional pooler) and
    ``TimmModel`` wrapping a timm ViT without prefix tokens (SigLIP); Hugging Face
    ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``, ``SiglipVisionModel`` and
    ``SiglipModel`` (only the vision part and the projection are kept). The tower's weights are
    kept frozen; ``forward`` runs without autograd unless some tower parameter requires grad.

    ``hidden`` has ``num_tokens`` rows per image: the patches (``num_patches``), plus CLIP's CLS
    first with ``select_strategy="full"``, minus SigLIP's first patch with ``"default"`` (Llava's
    semantics). ``tokens_are_patches`` says whether row ``i`` is patch ``i`` (what SEA needs).
    ``kind`` names the family (``"clip"``: open_clip ViT, ``"timm"``, ``"hf"``; ``family``: the
    Hugging Face one, ``"clip"`` or ``"siglip"``).
    """

    def __init__(
        self,
        visual: nn.Module,
        preprocess_cfg: dict,
        *,
        select_layer: int | list[int] = -2,
        image_aspect_ratio: str = "pad",
        select_strategy: str = "default",
    ):
        super().__init__()
        if select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"select_strategy must be one of {SELECT_STRATEGIES}; got {select_strategy!r}")
        adaptor = family_of(visual)
        adaptor.check_selection(select_layer, select_strategy)
        for name, module in adaptor.modules.items():  # registered under the usual names: `visual`, ...
            setattr(self, name, module)
        self.adaptor, self.kind, self.family = adaptor, adaptor.kind, adaptor.name
        self.grid, self.has_joint_space = adaptor.grid, adaptor.has_joint_space
        n_layers = adaptor.n_layers
        layers = list(select_layer) if isinstance(select_layer, (list, tuple)) else [select_layer]
        if not layers or any(
            isinstance(x, bool) or not isinstance(x, int) or not -(n_layers + 1) <= x <= n_layers for x in layers
        ):
            raise ValueError(
                f"select_layer must be an int (or, for Hugging Face towers, a list of ints) in "
                f"[{-(n_layers + 1)}, {n_layers}] for {n_layers} blocks; got {select_layer}"
            )
        self.layers = [x % (n_layers + 1) for x in layers]  # indices into [embeddings, block 1, ..., block n]
        self.layer = self.layers[0]
        adaptor.check_layers(self.layers)
        self.n_layers, self.select_layer, self.select_strategy = n_layers, select_layer, select_strategy
        self.hidden_size = adaptor.width * len(layers)
        self.num_patches = self.grid[0] * self.grid[1]
        dropped = adaptor.dropped_tokens(select_strategy)
        self.num_tokens = self.num_patches + adaptor.prefix_tokens - dropped
        self.tokens_are_patches = dropped == adaptor.prefix_tokens
        self.preprocess_cfg = dict(preprocess_cfg)
        self.image_aspect_ratio = image_aspect_ratio
        self.feature_dim = None  # None: this tower has no joint space (CLIPVisionModel)
        if self.has_joint_space:
            with torch.no_grad():
                probe = torch.zeros(1, 3, *self.image_size, device=self._param().device, dtype=self._param().dtype)
                final = adaptor.run(probe, self.layers, select_strategy, stop_early=False)[1]
                self.feature_dim = int(adaptor.head(final, pooled=False)[1].shape[-1])
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_clip(cls, clip: ClipBundle) -> VisionTower:
        c = clip.config
        return cls(
            clip.model if clip.is_hf else clip.model.visual,
            clip.preprocess_cfg,
            select_layer=c.select_layer,
            image_aspect_ratio=c.image_aspect_ratio,
            select_strategy=c.select_strategy,
        )

    @classmethod
    def from_hf(
        cls,
        model: nn.Module,
        *,
        select_layer: int | list[int] = -2,
        select_strategy: str = "default",
        image_aspect_ratio: str = "pad",
        name: str | None = None,
    ) -> VisionTower:
        """A tower around a Hugging Face CLIP/SigLIP model, e.g. a Llava's ``model.vision_tower``
        with ``select_layer=config.vision_feature_layer``, ``select_strategy=config.vision_feature_select_strategy``."""
        if hf_family(model) is None:
            raise ValueError(f"expected a Hugging Face CLIP or SigLIP model; got {type(model).__name__}")
        return cls(
            model,
            hf_preprocess_cfg(model, name),
            select_layer=select_layer,
            image_aspect_ratio=image_aspect_ratio,
            select_strategy=select_strategy,
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

    def forward(self, pixel_values: torch.Tensor, *, joint_space: bool = True, pooled: bool = True) -> TowerOutput:
        """``joint_space=False``: the adapter input only (``patch_features`` and ``pooled`` None), and
        the blocks after ``select_layer`` are not run: what a model without SEA needs. ``pooled=False``:
        ``pooled`` is None and the head runs on the patch tokens only (what SEA needs)."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(
                f"pixel_values must be (B, 3, {self.image_size[0]}, {self.image_size[1]}); got "
                f"{tuple(pixel_values.shape)}"
            )
        if joint_space and not self.has_joint_space:
            raise ValueError(
                "vision tower: this CLIPVisionModel has no visual_projection, so no joint-space patch features for "
                "SEA; build the tower from the CLIPModel or CLIPVisionModelWithProjection of the same checkpoint"
            )
        pixel_values = pixel_values.to(device=self._param().device, dtype=self._param().dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            stop_early = not joint_space
            hidden, final = self.adaptor.run(pixel_values, self.layers, self.select_strategy, stop_early)
            pool, patches = self.adaptor.head(final, pooled) if joint_space else (None, None)
        return TowerOutput(hidden, patches, pool, self.grid)
