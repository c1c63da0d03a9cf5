"""How big a ``sea lab`` run is (:data:`SIZES`: the default and ``--quick``), the world's image and
patch sizes, and the ablations of the SEA arm."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LabSize:
    train: int  # training scenes (CLIP, stage 1, stage 2)
    val: int  # scenes for choosing the labeler setting
    heldout: int  # evaluation scenes
    clip: tuple[int, int, float]  # steps, batch, lr
    llm: tuple[int, int, float]  # text pretraining: steps, batch, lr
    stage1: tuple[int, int, float]
    stage2: tuple[int, int, float]
    seeds: tuple[int, ...]
    evals: int  # evaluations along each stage
    ablations: tuple[str, ...]  # run with the first seed only, unless --full


SIZES = {
    "default": LabSize(
        train=1500,
        val=48,
        heldout=100,
        clip=(300, 128, 2e-3),
        llm=(150, 32, 3e-3),
        stage1=(80, 32, 2e-3),
        stage2=(200, 32, 2e-3),
        seeds=(0, 1, 2),
        evals=5,
        ablations=("tau_init", "lambda=10", "top_n"),
    ),
    "quick": LabSize(
        train=96,
        val=16,
        heldout=16,
        clip=(20, 32, 2e-3),
        llm=(10, 16, 3e-3),
        stage1=(6, 16, 2e-3),
        stage2=(6, 16, 2e-3),
        seeds=(0, 1),
        evals=2,
        ablations=("lambda=10",),
    ),
}
ALL_ABLATIONS = ("lambda=0.1", "lambda=10", "tau_init", "negate", "top_n")
IMAGE_SIZE, PATCH = 64, 16
PATCHES = (IMAGE_SIZE // PATCH) ** 2  # visual tokens per image
DISTRACTORS = 200  # wordfreq words in the SEA vocabulary besides the world's own


def ablation_options(name: str, chosen: dict) -> dict:
    """SEAConfig overrides of the SEA arm for ablation ``name``."""
    if name.startswith("lambda="):
        return {"weight": float(name.split("=", 1)[1])}
    if name == "tau_init":  # CLIP's tau = 0.07 instead of the paper's log-scale 0 (tau = 1)
        return {"init_log_scale": math.log(1 / 0.07)}
    if name == "negate":
        return {"negate": not chosen["negate"]}
    if name == "top_n":
        return {"top_n": 1 if chosen["top_n"] == 10 else 10}
    raise ValueError(f"unknown ablation {name!r}; known: {', '.join(ALL_ABLATIONS)}")
