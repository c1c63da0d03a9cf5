"""``sea export --format llava-hf``: a checkpoint of the project's trainer as a Hugging Face
``LlavaForConditionalGeneration`` folder, which ``from_pretrained`` loads and tools that read
llava-hf folders (lmms-eval's ``llava_hf``) can evaluate."""

from __future__ import annotations

import os

from torch import nn

from ..training.checkpoint import load_for_inference
from ..vision import hf_vision_part


def export_llava_hf(checkpoint: str | os.PathLike, out: str | os.PathLike) -> str:
    """Write a ``LlavaForConditionalGeneration`` folder (config, safetensors weights, tokenizer,
    ``LlavaProcessor`` with a padding ``LlavaImageProcessor``) from a checkpoint of the project's
    trainer whose tower is a Hugging Face CLIP/SigLIP model and whose adapter is ``mlp2x_gelu``
    (Llava's projector). Returns ``out``. Greedy answers match ``sea generate`` for prompts that
    ``sea_model.prompts.prompt_ids`` builds (the ``<image>`` token expanded to the tower's patches).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    model, tokenizer, _ = load_for_inference(checkpoint)
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
    llava.save_pretrained(out)
    _llava_processor(tower, tokenizer).save_pretrained(out)
    return str(out)


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
