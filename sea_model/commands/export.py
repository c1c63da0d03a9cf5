"""``sea export --format llava-hf``: a checkpoint of the project's trainer as a Hugging Face
``LlavaForConditionalGeneration`` folder, which ``from_pretrained`` loads and tools that read
llava-hf folders (lmms-eval's ``llava_hf``) can evaluate.

The output folder is written atomically (into ``.<name>.export-tmp`` beside it, then renamed). A folder
that is (or is inside) a checkpoint, or holds a training run, is refused; a non-empty folder too,
unless ``overwrite``. A failed write (a full disk) is a :class:`~sea_model.errors.WriteError` naming
the folder, the space needed and free; nothing partial is left."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from ..errors import UserError, remove, writing
from ..training.checkpoint import CONFIG, STATE, list_checkpoints, load_for_inference
from ..training.metrics import METRICS_FILE
from ..training.run_config import CONFIG_FILE
from ..vision import hf_vision_part

_RUN_FILES = (CONFIG_FILE, METRICS_FILE, ".lock")


def _is_checkpoint(folder: Path) -> bool:
    return (folder / STATE).is_file() or ((folder / CONFIG).is_file() and (folder / "checksums.json").is_file())


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` when it is a file, is or is inside a checkpoint, holds a run or checkpoints,
    or is a non-empty folder (unless ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"export: {out} exists and is not a folder; choose a new folder")
    inside = next((p for p in out.absolute().parents if _is_checkpoint(p)), None)
    if _is_checkpoint(out) or inside is not None:
        raise UserError(
            f"export: {out} is {'inside ' + str(inside) if inside else 'a checkpoint'}; writing there would "
            f"change a checkpoint. Choose a new folder"
        )
    found = list_checkpoints(out)
    run = [name for name in _RUN_FILES if (out / name).exists()]
    if found or run:
        what = f"checkpoints ({found[0].name} ...)" if found else f"a training run ({run[0]})"
        raise UserError(f"export: {out} holds {what}; writing there would mix the export into it. Choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"export: {out} is not empty; choose a new folder, or --overwrite to replace its contents")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out`` (an existing ``out`` moved aside first, then removed)."""
    old = out.parent / f".{out.name}.export-old"
    if out.is_dir():
        remove(old)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export_llava_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write a ``LlavaForConditionalGeneration`` folder (config, safetensors weights, tokenizer,
    ``LlavaProcessor`` with a padding ``LlavaImageProcessor``) from a checkpoint of the project's
    trainer whose tower is a Hugging Face CLIP/SigLIP model and whose adapter is ``mlp2x_gelu``
    (Llava's projector); ``out`` is checked first (:func:`check_out`) and written atomically.
    Returns ``out``. Greedy answers match ``sea generate`` for prompts that
    ``sea_model.prompts.prompt_ids`` builds (the ``<image>`` token expanded to the tower's patches).
    """
    out = Path(out)
    check_out(out, overwrite)
    model, tokenizer, _ = load_for_inference(checkpoint)
    llava = _llava_model(model, tokenizer)
    processor = _llava_processor(model.tower, tokenizer)
    need = sum(t.numel() * t.element_size() for t in llava.state_dict().values())
    tmp = out.parent / f".{out.name}.export-tmp"
    remove(tmp)
    with writing(out, need=need, partial=tmp):
        out.parent.mkdir(parents=True, exist_ok=True)
        llava.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _publish(tmp, out)
    return str(out)


def _llava_model(model, tokenizer):
    """The ``LlavaForConditionalGeneration`` holding ``model``'s tower, adapter and LLM."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tower, adapter, llm = model.tower, model.adapter, model.llm
    if getattr(tower, "kind", None) != "hf":
        raise ValueError("export --format llava-hf needs a checkpoint trained with a Hugging Face tower (vision.name)")
    linears = [m for m in adapter.modules() if isinstance(m, nn.Linear)]
    if not (isinstance(adapter, nn.Sequential) and len(adapter) == 3 and len(linears) == 2):
        raise ValueError("export --format llava-hf needs the adapter 'mlp2x_gelu' (Llava's projector)")
    vocab = llm.get_input_embeddings().weight.shape[0]
    if model.image_token_id >= vocab:
        llm.resize_token_embeddings(model.image_token_id + 1)  # Llava embeds the image ids before replacing them
    config = LlavaConfig(
        vision_config=tower.visual.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=model.image_token_id,
        vision_feature_layer=tower.select_layer,
        vision_feature_select_strategy=tower.select_strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=linears[0].bias is not None,
    )
    llava = LlavaForConditionalGeneration(config).eval()
    hf_vision_part(llava.model.vision_tower).load_state_dict(tower.visual.state_dict())
    projector = llava.model.multi_modal_projector
    projector.linear_1.load_state_dict(linears[0].state_dict())
    projector.linear_2.load_state_dict(linears[1].state_dict())
    llava.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    llava.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    llava.generation_config.suppress_tokens = [model.image_token_id]  # never generate <image>
    llava.generation_config.eos_token_id = tokenizer.eos_token_id
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    return llava


def _llava_processor(tower, tokenizer):
    from transformers import LlavaImageProcessor, LlavaProcessor

    cfg = tower.preprocess_cfg
    size = tower.image_size[0]
    images = LlavaImageProcessor(
        do_pad=tower.image_aspect_ratio == "pad",
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        resample=3 if cfg.get("interpolation", "bicubic") == "bicubic" else 2,
        image_mean=list(cfg["mean"]),
        image_std=list(cfg["std"]),
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=tower.visual.config.patch_size,
        vision_feature_select_strategy=tower.select_strategy,
        num_additional_image_tokens=1 if tower.family == "clip" else 0,
        image_token="<image>",
    )
