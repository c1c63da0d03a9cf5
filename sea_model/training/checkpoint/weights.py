"""A checkpoint's weights: which parameters are saved, loading them into a model, LLaVA's
``mm_projector.bin``, and a whole model rebuilt for inference.

Saved are the parameters that cannot be rebuilt from their source: the trainable ones (adapter,
SEA's log-scale, the LLM in stage 2, the tower with ``vision_lr``) and those of a randomly
initialised LLM or tower (an ``llm`` config dict, ``vision.pretrained`` None).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...config import ModelConfig
from ...model import build_model
from .format import WEIGHTS, CheckpointError, load_tokenizer, read_info, read_weights, resolve, torch_load


def saved_parameter_names(model) -> list[str]:
    """Trainable parameters, adapter and SEA always, and randomly initialised LLM / tower."""
    cfg = model.model_config
    random_llm = cfg is not None and isinstance(cfg.llm, dict)
    random_tower = cfg is not None and not cfg.vision.pretrained
    names = []
    for n, p in model.named_parameters():  # tied weights appear once
        if (
            p.requires_grad
            or n.startswith(("adapter.", "sea."))
            or (random_llm and n.startswith("llm."))
            or (random_tower and n.startswith("tower."))
        ):
            names.append(n)
    return names


def load_weights(
    model, ckpt: str | os.PathLike, *, require_trainable_for_stage: int | None = None, vision: bool = False
) -> list[str]:
    """Copy ``model.safetensors`` into ``model``'s parameters; returns the names loaded.

    Every tensor must be a parameter of the model with the same shape (``sea.*`` is skipped when
    the model has SEA off). With ``require_trainable_for_stage`` (resume), every parameter that
    stage trains must be in the file."""
    path = Path(ckpt) / WEIGHTS
    tensors = read_weights(path)
    params = dict(model.named_parameters())
    if any(n.startswith("adapter.") for n in params) and not any(n.startswith("adapter.") for n in tensors):
        raise CheckpointError(
            f"{path}: holds no adapter.* tensors (found {sorted(tensors)[:4]}...); not a sea checkpoint"
        )
    loaded = []
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in params:
                if name.startswith("sea.") and model.sea is None:
                    continue  # SEA is off in this model
                raise CheckpointError(
                    f"{path}: tensor {name!r} is not a parameter of this model (a checkpoint of another architecture?)"
                )
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}; the model's is {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
            loaded.append(name)
    if require_trainable_for_stage is not None:
        prefixes = (
            ["adapter.", "sea."]
            + (["llm."] if require_trainable_for_stage == 2 else [])
            + (["tower."] if vision else [])
        )
        missing = [n for n in params if n.startswith(tuple(prefixes)) and n not in tensors]
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} trained parameter(s) missing, e.g. {missing[0]!r}")
    return loaded


def mm_projector_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors under LLaVA's names: ``adapter.0.weight`` -> ``model.mm_projector.0.weight``."""
    return {"model.mm_projector." + k[len("adapter.") :]: v for k, v in weights.items() if k.startswith("adapter.")}


def load_mm_projector(adapter: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a LLaVA ``mm_projector.bin`` (or ours) into ``adapter``."""
    path = Path(path)
    sd = torch_load(path)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    sub = {k.split("mm_projector.", 1)[1]: v for k, v in sd.items() if "mm_projector." in k}
    if not sub:
        raise CheckpointError(f"{path}: no mm_projector.* keys (found {sorted(sd)[:4]})")
    try:
        adapter.load_state_dict(sub, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit this adapter: {err}") from None


def load_for_inference(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """``(model, tokenizer, info)`` rebuilt from a checkpoint (or output directory): the saved
    model config with SEA off (answering needs no vocabulary), its tokenizer and weights."""
    ckpt = resolve(path)
    info = read_info(ckpt)
    config = ModelConfig.from_dict(info["model"])
    config.sea.enabled = False
    tokenizer = load_tokenizer(ckpt)
    model, tokenizer = build_model(config, tokenizer, device=device, progress=False)
    load_weights(model, ckpt)
    model.eval()
    return model, tokenizer, info
