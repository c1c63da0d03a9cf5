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

Hugging Face towers work the same way (``VisionConfig.library="transformers"``, or
:meth:`VisionTower.from_hf`): ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``,
``CLIPModel``, ``SiglipVisionModel`` and ``SiglipModel``. ``select_layer`` then follows Llava's
``vision_feature_layer`` (an int or a list of ints: the selected layers concatenated on the
feature axis) and ``select_strategy`` its ``vision_feature_select_strategy`` (``"default"`` drops
the first token, ``"full"`` keeps every token), so ``hidden`` is what Llava's
``get_image_features`` feeds its projector. Patch features come from the model's own head
(:class:`HFJointHead`): CLIP ``post_layernorm`` + ``visual_projection`` on every patch token
(``CLIPVisionModel`` has no projection: it gives ``hidden`` only), SigLIP the attention-pool head's
value path per token.

Models are named as open_clip names them (``ViT-L-14-336-quickgelu`` with ``pretrained="openai"``
is LLaVA-1.5's tower), with ``pretrained`` a tag or a local checkpoint file, or given as a
plain open_clip model config dict (tests build tiny random ones, no download).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn

ASPECT_RATIOS = ("pad", "square", "crop")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LIBRARIES = ("auto", "open_clip", "transformers")
SELECT_STRATEGIES = ("default", "full")


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
        else:
            if getattr(vm, "head", None) is None:
                raise ValueError("this SigLIP vision model has no attention-pool head (vision_use_head=False)")
            self.head = copy.deepcopy(vm.head)
        self.prefix_tokens = 1 if family == "clip" else 0
        self.requires_grad_(False)
        self.eval()

    def forward(
        self, last_hidden_state: torch.Tensor, *, pooled: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        p = next(self.parameters())
        x = last_hidden_state.to(p.dtype)
        return hf_joint_features(x, norm=self.norm, proj=self.proj, head=self.head, pooled=pooled)


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
        family = hf_family(visual)
        if family is not None:
            n_layers, width, prefix = self._setup_hf(visual, family)
        else:
            if select_strategy != "default" or not isinstance(select_layer, int):
                raise ValueError(
                    "select_strategy='full' and list-valued select_layer are for Hugging Face towers; "
                    "open_clip towers take one layer and drop CLS"
                )
            n_layers, width, prefix = self._setup_open_clip(visual)
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
        if self.kind == "timm" and self.layer == 0:
            raise ValueError("select_layer: the embedding output (layer 0) is not available for timm towers")
        self.n_layers, self.select_layer, self.select_strategy = n_layers, select_layer, select_strategy
        self.hidden_size = width * len(layers)
        self.num_patches = self.grid[0] * self.grid[1]
        dropped = 1 if (self.kind == "hf" and select_strategy == "default") else 0  # (open_clip: CLS already gone)
        self.num_tokens = self.num_patches + prefix - dropped
        self.tokens_are_patches = dropped == prefix
        self.preprocess_cfg = dict(preprocess_cfg)
        self.image_aspect_ratio = image_aspect_ratio
        self.feature_dim = None  # None: this tower has no joint space (CLIPVisionModel)
        if self.has_joint_space:
            with torch.no_grad():
                probe = torch.zeros(1, 3, *self.image_size, device=self._param().device, dtype=self._param().dtype)
                self.feature_dim = int(self._pooled_and_patches(self._run(probe)[1], False)[1].shape[-1])
        self.requires_grad_(False)
        self.eval()

    def _setup_open_clip(self, visual: nn.Module) -> tuple[int, int, int]:
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        self.visual = visual
        self.has_joint_space = True
        if isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None:
                raise ValueError("vision tower: open_clip ViTs with an attentional pooler (CoCa) are not supported")
            if not isinstance(visual.patch_dropout, nn.Identity):
                raise ValueError("vision tower: patch dropout must be off (the patch grid must be complete)")
            self.kind = "clip"
            self.grid = tuple(int(g) for g in visual.grid_size)
            return len(visual.transformer.resblocks), visual.transformer.width, 0  # CLS is dropped in _run
        if isinstance(visual, TimmModel):
            trunk = visual.trunk
            if not hasattr(trunk, "blocks") or not hasattr(trunk, "forward_intermediates"):
                raise ValueError(f"vision tower: timm trunk {type(trunk).__name__} is not a ViT")
            if getattr(trunk, "num_prefix_tokens", 0):
                raise ValueError(
                    "vision tower: timm ViTs with prefix (CLS/register) tokens are not supported; "
                    "SigLIP-style towers (no prefix tokens) are"
                )
            self.kind = "timm"
            self.grid = tuple(int(g) for g in trunk.patch_embed.grid_size)
            return len(trunk.blocks), trunk.embed_dim, 0
        raise ValueError(f"vision tower: unsupported visual module {type(visual).__name__}")

    def _setup_hf(self, model: nn.Module, family: str) -> tuple[int, int, int]:
        self.kind, self.family = "hf", family
        self.visual = hf_vision_part(model)  # the text tower of a CLIPModel/SiglipModel is not kept
        self.visual_projection = getattr(model, "visual_projection", None) if family == "clip" else None
        self.has_joint_space = self.visual_projection is not None if family == "clip" else self.visual.head is not None
        cfg = getattr(model.config, "vision_config", model.config)
        side = int(cfg.image_size) // int(cfg.patch_size)
        self.grid = (side, side)
        return int(cfg.num_hidden_layers), int(cfg.hidden_size), 1 if family == "clip" else 0

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

    def _run(self, pixel_values: torch.Tensor, stop_early: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass: (layer ``select_layer`` patch tokens, last-layer tokens before the head);
        with ``stop_early`` the blocks after ``select_layer`` are skipped and the second is None."""
        if self.kind == "hf":
            return self._run_hf(pixel_values)
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

    def _run_hf(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Llava's ``get_image_features`` selection (before the projector), and ``last_hidden_state``."""
        out = self.visual(pixel_values=pixel_values, output_hidden_states=True)
        selected = [out.hidden_states[i] for i in self.layers]
        if self.select_strategy == "default":
            selected = [h[:, 1:] for h in selected]
        return torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0], out.last_hidden_state

    def _pooled_and_patches(self, final: torch.Tensor, pooled: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The tower's head on the last layer's tokens: ``(pooled or None, patch features)``."""
        if self.kind == "hf":
            if self.family == "clip":
                return hf_joint_features(
                    final, norm=self.visual.post_layernorm, proj=self.visual_projection, pooled=pooled
                )
            return hf_joint_features(final, head=self.visual.head, pooled=pooled)
        v = self.visual
        if self.kind == "clip":
            pool = None
            if pooled:
                plain = v.pool_type == "tok" and not v.final_ln_after_pool
                pool = v.ln_post(final[:, 0]) if plain else v._pool(final)[0]
            patches = v.ln_post(final[:, 1:])
            if v.proj is not None:
                pool, patches = (pool @ v.proj if pooled else None), patches @ v.proj
            return pool, patches
        B, P, C = final.shape
        # The head on one-token sequences: for a MAP head, the value path of each token.
        patches = v.head(v.trunk.forward_head(final.reshape(B * P, 1, C))).reshape(B, P, -1)
        return (v.head(v.trunk.forward_head(final)) if pooled else None), patches

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
            hidden, final = self._run(pixel_values, stop_early=not joint_space)
            pool, patches = self._pooled_and_patches(final, pooled) if joint_space else (None, None)
        return TowerOutput(hidden, patches, pool, self.grid)
