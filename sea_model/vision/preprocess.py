"""Image preprocessing: a PIL image to the normalised ``(3, H, W)`` tensor a tower takes, with
open_clip's own eval transforms and LLaVA-1.5's padding to a square."""

from __future__ import annotations

import torch

from ..config import ASPECT_RATIOS


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
