"""LlavaSEA with PEFT: a PeftModel or its base model, attached before or after ``get_peft_model``,
with or without ``modules_to_save=["multi_modal_projector"]``. SEA must read the projector that
actually runs (PEFT's ``modules_to_save`` swaps in a wrapper around a trained copy), so every
combination gives pairs > 0, L_align > 0, and a gradient on the projector weights that train."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from sea_model import tiny_models as shipped  # noqa: E402
from sea_model.hf import LlavaSEA  # noqa: E402
from tests import tiny  # noqa: E402

WORDS = tiny.WORDS[:24]
LM_LORA = r".*language_model.*\.(q_proj|v_proj)"
LM_AND_PROJECTOR_LORA = r".*(language_model.*\.(q_proj|v_proj)|multi_modal_projector\.linear_[12])"


def models():
    tok = tiny.tiny_tokenizer()
    torch.manual_seed(0)
    clip = shipped.tiny_hf_clip("clip")
    return tok, clip, shipped.tiny_hf_llava(clip, tok)


def attach(tok, clip, model):
    return LlavaSEA(model, clip, tok, tok, WORDS, backend="reference", cache_dir=False, progress=False)


def peft_of(llava, modules_to_save: bool):
    from peft import LoraConfig, get_peft_model

    if modules_to_save:
        config = LoraConfig(r=4, target_modules=LM_LORA, modules_to_save=["multi_modal_projector"])
    else:
        config = LoraConfig(r=4, target_modules=LM_AND_PROJECTOR_LORA)
    return get_peft_model(llava, config)


def trained_projector_grads(peft_model) -> dict[str, torch.Tensor]:
    return {
        n: p.grad
        for n, p in peft_model.named_parameters()
        if p.requires_grad and "multi_modal_projector" in n and p.grad is not None
    }


@pytest.mark.parametrize("modules_to_save", [True, False], ids=["modules_to_save", "lora_on_projector"])
@pytest.mark.parametrize("order", ["sea_first", "peft_first", "peft_first_base"])
def test_sea_follows_the_projector_that_runs(order, modules_to_save):
    tok, clip, llava = models()
    if order == "sea_first":
        sea = attach(tok, clip, llava)
        model = peft_of(llava, modules_to_save)
    else:
        model = peft_of(llava, modules_to_save)
        sea = attach(tok, clip, model if order == "peft_first" else model.get_base_model())
    model.train()
    batch = shipped.collate_padded(shipped.llava_caption_samples(tok, llava, WORDS, 3))
    out = model(**batch)
    align = sea.align()
    assert align.pairs > 0 and align.loss.item() > 0
    (out.loss + align.loss).backward()
    grads = trained_projector_grads(model)
    assert grads, "no trainable projector weight got a gradient"
    if modules_to_save:
        assert any("modules_to_save" in n for n in grads)
        assert any(g.abs().sum() > 0 for n, g in grads.items() if "modules_to_save" in n)
    else:
        assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    # SEA's share of the gradient reaches the trained projector: without L_align it differs.
    model.zero_grad()
    model(**batch).loss.backward()
    sea.align()
    without = trained_projector_grads(model)
    assert any(not torch.allclose(grads[n], without[n]) for n in grads if n in without)


def test_peft_model_trains_with_sea_trainer(tmp_path):
    """SEATrainer over a PeftModel (LoRA on the LM, the projector in modules_to_save): SEA's terms logged."""
    pytest.importorskip("accelerate")

    from sea_model.hf import SEATrainer

    tok, clip, llava = models()
    model = peft_of(llava, True)
    sea = attach(tok, clip, model)
    args = tiny.trainer_args(tmp_path, per_device_train_batch_size=2, max_steps=2, max_grad_norm=1.0, seed=42)
    samples = shipped.llava_caption_samples(tok, llava, WORDS, 4)
    trainer = SEATrainer(model=model, sea=sea, args=args, train_dataset=samples, data_collator=shipped.collate_padded)
    before = model.base_model.model.model.multi_modal_projector.modules_to_save["default"].linear_2.weight.clone()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "L_align" in h]
    assert logs and all(h["pairs"] > 0 and h["L_align"] > 0 for h in logs)
    after = model.base_model.model.model.multi_modal_projector.modules_to_save["default"].linear_2.weight
    assert not torch.equal(before, after)
