"""The vision side: a CLIP tower whose one forward pass yields both the adapter's input and SEA's
joint-space patch features (:mod:`.tower`), one adaptor per tower family (:mod:`.families`),
loading CLIP models (:mod:`.loading`) and image preprocessing (:mod:`.preprocess`)."""

from __future__ import annotations

from .families import HFJointHead, hf_family, hf_joint_features, hf_vision_part
from .loading import ClipBundle, hf_preprocess_cfg, hf_text_features, load_clip
from .preprocess import ImageProcessor, expand2square
from .tower import TowerOutput, VisionTower

__all__ = [
    "ClipBundle",
    "HFJointHead",
    "ImageProcessor",
    "TowerOutput",
    "VisionTower",
    "expand2square",
    "hf_family",
    "hf_joint_features",
    "hf_preprocess_cfg",
    "hf_text_features",
    "hf_vision_part",
    "load_clip",
]
