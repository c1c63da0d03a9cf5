"""One small adaptor per tower family: what :class:`~sea_model.vision.tower.VisionTower` needs of it.

Each adaptor knows its tower's geometry (blocks, width, patch grid, tokens before the patches),
runs one pass (the selected layer's tokens for the adapter, the last layer's for the head) and
applies the tower's joint-space head to every patch token as if that token were the only one pooled:

* :class:`OpenClipViT`: open_clip ``VisionTransformer`` (CLS or average pooling): the last layer,
  ``ln_post``, ``@ proj`` on every patch token, exactly what ``encode_image`` does to the CLS token.
* :class:`TimmViT`: a timm ViT without prefix tokens in open_clip's ``TimmModel`` (SigLIP, MAP
  head): the head on a one-token sequence per patch. Attention over a single key has weight 1, so
  this is the head's value path, MaskCLIP-style dense features (SEA's ``negate=True`` default was
  chosen for CLIP patch tokens, not for these).
* :class:`HFClip`, :class:`HFSiglip`: Hugging Face ``CLIPModel`` / ``CLIPVisionModel[WithProjection]``
  and ``SiglipModel`` / ``SiglipVisionModel``, selected as Llava's ``get_image_features`` selects
  (``vision_feature_layer``, ``vision_feature_select_strategy``); :class:`HFJointHead` is such a
  model's head copied out of it, for :class:`~sea_model.hf.LlavaSEA`.

An adaptor holds references to the tower's modules; :class:`VisionTower` registers them under
their usual names (``visual``, ``visual_projection``), so parameter names do not depend on it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def hf_family(model: nn.Module) -> str | None:
    """``"clip"`` or ``"siglip"`` for a Hugging Face CLIP/SigLIP model (whole or vision part), else None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) if config is not None else None
    if not isinstance(model_type, str) or not hasattr(hf_vision_part(model), "encoder"):
        return None
    if model_type.startswith("clip"):
        return "clip"
    if model_type.startswith("siglip") and not model_type.startswith("siglip2"):
        return "siglip"
    return None


def hf_vision_part(model: nn.Module) -> nn.Module:
    """The module that runs the image: ``model.vision_model`` for ``CLIPModel``/``SiglipModel``/
    ``CLIPVisionModelWithProjection``, the model itself where it is that (``CLIPVisionModel`` in
    transformers 5)."""
    return getattr(model, "vision_model", model)


def hf_joint_features(
    last_hidden_state: torch.Tensor, *, norm=None, proj=None, head=None, pooled: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(pooled, patches)`` joint-space features from a Hugging Face tower's ``last_hidden_state``.

    CLIP (``norm`` = ``post_layernorm``, ``proj`` = ``visual_projection``): every token through
    both; pooled is the CLS token's (exactly ``get_image_features``), patches the tokens after it.
    SigLIP (``head``: the attention-pool head; its ``last_hidden_state`` is already normed): pooled
    is the head on all tokens (``get_image_features``), patches the head on each token alone.
    ``pooled=False``: None for pooled, and SigLIP's head is not run on all tokens.
    """
    if head is None:
        x = norm(last_hidden_state)
        if proj is not None:
            x = proj(x)
        return (x[:, 0] if pooled else None), x[:, 1:]
    B, T, C = last_hidden_state.shape
    patches = head(last_hidden_state.reshape(B * T, 1, C)).reshape(B, T, -1)
    return (head(last_hidden_state) if pooled else None), patches


class HFJointHead(nn.Module):
    """A Hugging Face CLIP/SigLIP model's joint-space head, copied out of it (frozen, small):
    ``forward(last_hidden_state, *, pooled=True) -> (pooled, patch_features)`` as :func:`hf_joint_features`.

    Takes ``CLIPModel`` / ``CLIPVisionModelWithProjection`` (``post_layernorm`` +
    ``visual_projection``) or ``SiglipModel`` / ``SiglipVisionModel`` with its head.
    ``prefix_tokens``: tokens before the patches (CLIP's CLS); ``feature_dim``: the joint space's.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        family = hf_family(model)
        if family is None:
            raise ValueError(f"expected a Hugging Face CLIP or SigLIP model; got {type(model).__name__}")
        vm = hf_vision_part(model)
        self.family = family
        self.norm = self.proj = self.head = None
        if family == "clip":
            if getattr(model, "visual_projection", None) is None:
                raise ValueError(
                    f"{type(model).__name__} has no visual_projection (the joint space): pass the CLIPModel "
                    "or CLIPVisionModelWithProjection of the same checkpoint"
                )
            self.norm, self.proj = copy.deepcopy(vm.post_layernorm), copy.deepcopy(model.visual_projection)
            self.feature_dim = int(self.proj.out_features)
        else:
            if getattr(vm, "head", None) is None:
                raise ValueError("this SigLIP vision model has no attention-pool head (vision_use_head=False)")
            self.head = copy.deepcopy(vm.head)
            self.feature_dim = int(getattr(model.config, "vision_config", model.config).hidden_size)
        self.prefix_tokens = 1 if family == "clip" else 0
        self.requires_grad_(False)
        self.eval()

    def forward(
        self, last_hidden_state: torch.Tensor, *, pooled: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        p = next(self.parameters())
        x = last_hidden_state.to(p.dtype)
        return hf_joint_features(x, norm=self.norm, proj=self.proj, head=self.head, pooled=pooled)


# --------------------------------------------------------------------------- the adaptors


class Family:
    """What a tower family gives :class:`~sea_model.vision.tower.VisionTower`.

    ``kind``: ``"clip"`` (open_clip ViT), ``"timm"`` or ``"hf"``; ``name``: the Hugging Face family
    (``"clip"``, ``"siglip"``) or None; ``modules``: what the tower registers, by name;
    ``n_layers``, ``width``, ``grid``; ``prefix_tokens``: rows before the patches in what
    :meth:`run` selects with ``select_strategy="full"``; ``has_joint_space``: whether :meth:`head`
    gives joint-space features."""

    kind: str
    name: str | None = None
    prefix_tokens: int = 0
    has_joint_space: bool = True
    modules: dict
    n_layers: int
    width: int
    grid: tuple[int, int]

    def check_selection(self, select_layer, select_strategy: str) -> None:
        """Refuse what only Hugging Face towers select: several layers, or every token (``"full"``)."""
        if select_strategy != "default" or not isinstance(select_layer, int):
            raise ValueError(
                "select_strategy='full' and list-valued select_layer are for Hugging Face towers; "
                "open_clip towers take one layer and drop CLS"
            )

    def check_layers(self, layers: list[int]) -> None:
        """Refuse selected layers (indices into [embeddings, block 1, ..., block n]) it cannot give."""

    def dropped_tokens(self, select_strategy: str) -> int:
        """Leading rows :meth:`run` drops under ``select_strategy`` (open_clip towers drop CLS themselves)."""
        return 0

    def run(self, pixel_values: torch.Tensor, layers: list[int], select_strategy: str, stop_early: bool):
        """One pass: ``(selected tokens, last layer's tokens before the head, or None with stop_early)``."""
        raise NotImplementedError

    def head(self, final: torch.Tensor, pooled: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The tower's head on the last layer's tokens: ``(pooled or None, patch features)``."""
        raise NotImplementedError


class OpenClipViT(Family):
    """open_clip's ``VisionTransformer`` (CLIP ViTs, CLS or average pooling, no attentional pooler)."""

    kind = "clip"

    def __init__(self, visual: nn.Module):
        if visual.attn_pool is not None:
            raise ValueError("vision tower: open_clip ViTs with an attentional pooler (CoCa) are not supported")
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise ValueError("vision tower: patch dropout must be off (the patch grid must be complete)")
        self.visual, self.modules = visual, {"visual": visual}
        self.grid = tuple(int(g) for g in visual.grid_size)
        self.n_layers, self.width = len(visual.transformer.resblocks), visual.transformer.width

    def run(self, pixel_values, layers, select_strategy, stop_early):
        v, layer = self.visual, layers[0]
        x = v._embeds(pixel_values)  # conv1, CLS, positions, (no) patch dropout, ln_pre
        if layer == 0:
            final, selected = (None if stop_early else v.transformer(x)), x
        else:
            final, inter = v.transformer.forward_intermediates(x, indices=[layer - 1], stop_early=stop_early)
            selected = inter[0]
        return selected[:, 1:], (None if stop_early else final)  # CLS dropped

    def head(self, final, pooled):
        v, pool = self.visual, None
        if pooled:
            plain = v.pool_type == "tok" and not v.final_ln_after_pool
            pool = v.ln_post(final[:, 0]) if plain else v._pool(final)[0]
        patches = v.ln_post(final[:, 1:])
        if v.proj is not None:
            pool, patches = (pool @ v.proj if pooled else None), patches @ v.proj
        return pool, patches


class TimmViT(Family):
    """open_clip's ``TimmModel`` around a timm ViT without prefix tokens (SigLIP-style towers)."""

    kind = "timm"

    def __init__(self, visual: nn.Module):
        trunk = visual.trunk
        if not hasattr(trunk, "blocks") or not hasattr(trunk, "forward_intermediates"):
            raise ValueError(f"vision tower: timm trunk {type(trunk).__name__} is not a ViT")
        if getattr(trunk, "num_prefix_tokens", 0):
            raise ValueError(
                "vision tower: timm ViTs with prefix (CLS/register) tokens are not supported; "
                "SigLIP-style towers (no prefix tokens) are"
            )
        self.visual, self.modules = visual, {"visual": visual}
        self.grid = tuple(int(g) for g in trunk.patch_embed.grid_size)
        self.n_layers, self.width = len(trunk.blocks), trunk.embed_dim

    def check_layers(self, layers):
        if layers[0] == 0:
            raise ValueError("select_layer: the embedding output (layer 0) is not available for timm towers")

    def run(self, pixel_values, layers, select_strategy, stop_early):
        final, inter = self.visual.trunk.forward_intermediates(
            pixel_values, indices=[layers[0] - 1], output_fmt="NLC", norm=False, stop_early=stop_early
        )
        # no prefix tokens; `final` went through the trunk's final norm
        return inter[0], (None if stop_early else final)

    def head(self, final, pooled):
        v = self.visual
        B, P, C = final.shape
        # The head on one-token sequences: for a MAP head, the value path of each token.
        patches = v.head(v.trunk.forward_head(final.reshape(B * P, 1, C))).reshape(B, P, -1)
        return (v.head(v.trunk.forward_head(final)) if pooled else None), patches


class _HFVision(Family):
    """A Hugging Face CLIP/SigLIP model: only its vision part (and CLIP's projection) is kept."""

    kind = "hf"

    def __init__(self, model: nn.Module, projection: nn.Module | None):
        self.visual = hf_vision_part(model)  # the text tower of a CLIPModel/SiglipModel is not kept
        self.projection = projection
        self.modules = {"visual": self.visual, "visual_projection": projection}
        cfg = getattr(model.config, "vision_config", model.config)
        side = int(cfg.image_size) // int(cfg.patch_size)
        self.grid = (side, side)
        self.n_layers, self.width = int(cfg.num_hidden_layers), int(cfg.hidden_size)

    def check_selection(self, select_layer, select_strategy):
        pass  # any layer or list of layers, either strategy (Llava's options)

    def dropped_tokens(self, select_strategy):
        return 1 if select_strategy == "default" else 0

    def run(self, pixel_values, layers, select_strategy, stop_early):
        """Llava's ``get_image_features`` selection (before the projector), and ``last_hidden_state``."""
        out = self.visual(pixel_values=pixel_values, output_hidden_states=True)
        selected = [out.hidden_states[i] for i in layers]
        if select_strategy == "default":
            selected = [h[:, 1:] for h in selected]
        return torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0], out.last_hidden_state


class HFClip(_HFVision):
    """Hugging Face CLIP: CLS first; the joint space is ``post_layernorm`` + ``visual_projection``
    (a ``CLIPVisionModel`` has no projection: the adapter input only)."""

    name, prefix_tokens = "clip", 1

    def __init__(self, model: nn.Module):
        super().__init__(model, getattr(model, "visual_projection", None))
        self.has_joint_space = self.projection is not None

    def head(self, final, pooled):
        return hf_joint_features(final, norm=self.visual.post_layernorm, proj=self.projection, pooled=pooled)


class HFSiglip(_HFVision):
    """Hugging Face SigLIP: no CLS; the joint space is the attention-pool head's value path per token."""

    name, prefix_tokens = "siglip", 0

    def __init__(self, model: nn.Module):
        super().__init__(model, None)
        self.has_joint_space = self.visual.head is not None

    def head(self, final, pooled):
        return hf_joint_features(final, head=self.visual.head, pooled=pooled)


def family_of(visual: nn.Module) -> Family:
    """The adaptor of a tower module: an open_clip visual tower or a Hugging Face CLIP/SigLIP model."""
    hf = hf_family(visual)
    if hf is not None:
        return HFClip(visual) if hf == "clip" else HFSiglip(visual)
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return OpenClipViT(visual)
    if isinstance(visual, TimmModel):
        return TimmViT(visual)
    raise ValueError(f"vision tower: unsupported visual module {type(visual).__name__}")
