"""SEA attached to Hugging Face Llava: one forward for both losses, Trainer weighting under gradient
accumulation, the temperature's optimizer group, checkpoints and resume, evaluation without SEA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from sea_model import tiny_models as shipped  # noqa: E402
from sea_model.hf import LlavaSEA  # noqa: E402
from sea_model.vision import VisionTower  # noqa: E402
from tests import tiny  # noqa: E402

WORDS = tiny.WORDS[:24]


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def build(tok, family="clip", layer=-2, strategy="default", **sea_options):
    torch.manual_seed(0)
    clip = shipped.tiny_hf_clip(family)
    llava = shipped.tiny_hf_llava(clip, tok, vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    llava.requires_grad_(False)
    llava.model.multi_modal_projector.requires_grad_(True)
    options = {"backend": "reference", "cache_dir": False, "progress": False, **sea_options}
    sea = LlavaSEA(llava, clip, tok, tok, WORDS, **options)
    return llava.train(), clip, sea


@pytest.mark.parametrize(
    "family, layer, strategy", [("clip", -2, "default"), ("clip", [-3, -1], "full"), ("siglip", -1, "full")]
)
def test_one_forward_gives_lm_loss_and_sea_inputs(tok, family, layer, strategy):
    llava, clip, sea = build(tok, family, layer, strategy)
    batch = shipped.collate_padded(shipped.llava_caption_samples(tok, llava, WORDS, 3))
    out = llava(**batch)
    got = sea.align(generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(out.loss) and got.pairs > 0
    # The same loss from inputs computed without hooks: Llava's image features, the tower's patch features.
    with torch.no_grad():
        visual = torch.stack(list(llava.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
        tower = VisionTower.from_hf(clip, select_strategy="default" if family == "clip" else "full")
        patches = tower(batch["pixel_values"]).patch_features
    visual = visual[:, 1:] if (family, strategy) == ("clip", "full") else visual
    expected = sea.loss_fn(
        visual,
        patches,
        sea.vocab_features,
        sea.word_token_ids,
        llava.get_input_embeddings().weight,
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(got.loss.detach(), expected.loss)
    assert got.pairs == expected.pairs
    (out.loss + sea.weight * got.loss).backward()
    assert llava.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert sea.loss_fn.log_scale.grad is not None


def test_eval_and_generate_skip_sea(tok):
    llava, _, sea = build(tok)
    batch = shipped.collate_padded(shipped.llava_caption_samples(tok, llava, WORDS, 2))
    llava.eval()
    llava(**batch)
    assert not sea._captured  # nothing computed for SEA; align() after it says why (llava.train())
    with pytest.raises(RuntimeError, match=r"eval mode.*llava\.train\(\)"):
        sea.align()
    llava.train()
    with torch.no_grad():
        llava(**batch)
    assert not sea._captured
    with pytest.raises(RuntimeError, match="without gradients"):
        sea.align()
    llava(**batch)
    assert sea.align().pairs > 0
    with pytest.raises(RuntimeError, match="no Llava forward since the last align"):
        sea.align()
    # A text-only training batch: a zero loss connected to the temperature, no error.
    text_only = {k: v for k, v in batch.items() if k != "pixel_values"}
    text_only["input_ids"] = text_only["input_ids"].masked_fill(
        text_only["input_ids"] == llava.config.image_token_id, 5
    )
    llava(**text_only)
    out = sea.align()
    assert out.pairs == 0 and out.loss.item() == 0.0 and out.loss.requires_grad


def test_siglip_default_strategy_is_refused(tok):
    with pytest.raises(ValueError, match="'full'"):
        build(tok, "siglip", -1, "default")


# --------------------------------------------------------------------------- Trainer


def make_trainer(llava, sea, samples, args, *callbacks):
    from sea_model.hf import SEATrainer

    return SEATrainer(
        model=llava,
        sea=sea,
        args=args,
        train_dataset=samples,
        data_collator=shipped.collate_padded,
        callbacks=list(callbacks),
    )


class GradsAtFirstStep:
    """A callback keeping the trainable gradients just before the first optimizer step."""

    def __new__(cls, llava, sea):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            grads = None

            def on_pre_optimizer_step(self, args, state, control, **kw):
                if self.grads is None:
                    named = [*llava.named_parameters(), *(("sea." + n, p) for n, p in sea.named_parameters())]
                    self.grads = {n: p.grad.clone() for n, p in named if p.grad is not None}

        return _Callback()


def manual_grads(llava, sea, samples, micro_batch, weight):
    """The objective by hand: sum over micro-batches of CE_sum / N_tokens + weight * L_align / n_micro."""
    params = [p for p in [*llava.parameters(), *sea.parameters()] if p.requires_grad]
    for p in params:
        p.grad = None
    batches = [shipped.collate_padded(samples[i : i + micro_batch]) for i in range(0, len(samples), micro_batch)]
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        out = llava(**b, num_items_in_batch=torch.tensor(n_items))
        (out.loss + weight * sea.align().loss / len(batches)).backward()
    return {
        n: p.grad.clone()
        for n, p in [*llava.named_parameters(), *(("sea." + n, p) for n, p in sea.named_parameters())]
        if p.grad is not None
    }


@pytest.mark.parametrize("micro_batch, accumulation", [(1, 4), (4, 1)])
def test_trainer_weights_sea_right_under_gradient_accumulation(tok, tmp_path, micro_batch, accumulation):
    """Labels are deterministic here (window 1, top-1, no dedup), so the Trainer's gradients can be
    compared with the objective computed by hand; with SEA off, 1 x 4 and 4 x 1 agree too."""

    grads = {}
    for weight in (0.0, 2.0):
        llava, _, sea = build(tok, window=1, top_n=1, dedup=False, weight=weight)
        samples = shipped.llava_caption_samples(tok, llava, WORDS, 4)
        cb = GradsAtFirstStep(llava, sea)
        args = tiny.trainer_args(
            tmp_path / f"w{weight}",
            per_device_train_batch_size=micro_batch,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.0,  # the weights stay as they were, for the computation by hand below
        )
        trainer = make_trainer(llava, sea, samples, args, cb)
        trainer.train()
        expected = manual_grads(llava, sea, samples, micro_batch, weight)
        assert cb.grads.keys() == expected.keys() and "sea.loss_fn.log_scale" in expected
        for name, g in expected.items():
            torch.testing.assert_close(cb.grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
        grads[weight] = cb.grads
        log = [h for h in trainer.state.log_history if "L_align" in h]
        assert log and log[0]["pairs"] > 0 and log[0]["tau"] > 0
    wrong = grads[2.0]["model.multi_modal_projector.linear_1.weight"]
    assert not torch.allclose(wrong, grads[0.0]["model.multi_modal_projector.linear_1.weight"])


def test_sea_off_1x4_equals_4x1(tok, tmp_path):

    grads = []
    for micro_batch, accumulation in ((1, 4), (4, 1)):
        llava, _, sea = build(tok, weight=0.0)
        samples = shipped.llava_caption_samples(tok, llava, WORDS, 4)
        cb = GradsAtFirstStep(llava, sea)
        args = tiny.trainer_args(
            tmp_path / str(micro_batch),
            per_device_train_batch_size=micro_batch,
            gradient_accumulation_steps=accumulation,
        )
        make_trainer(llava, sea, samples, args, cb).train()
        grads.append(cb.grads["model.multi_modal_projector.linear_2.weight"])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_temperature_optimized_without_decay_saved_and_resumed(tok, tmp_path):
    from transformers import TrainerCallback

    llava, _, sea = build(tok)
    samples = shipped.llava_caption_samples(tok, llava, WORDS, 8)
    args = tiny.trainer_args(
        tmp_path, max_steps=3, save_strategy="steps", save_steps=2, weight_decay=0.5, learning_rate=0.05
    )
    seen = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen[state.global_step] = sea.loss_fn.log_scale.item()

        def on_train_begin(self, args, state, control, **kw):
            seen["begin"] = sea.loss_fn.log_scale.item()

    trainer = make_trainer(llava, sea, samples, args, Record())
    trainer.train()
    groups = [g for g in trainer.optimizer.param_groups if any(p is sea.loss_fn.log_scale for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 1
    assert seen[1] != 0.0 and seen[2] != seen[1]  # it trains
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "sea.safetensors").is_file()
    logs = [h for h in trainer.state.log_history if "L_align" in h]
    assert {"L_gen", "L_align", "pairs", "tau", "loss"} <= logs[0].keys()
    assert abs(logs[-1]["tau"] - 1.0 / min(torch.tensor(seen[3]).exp().item(), 100.0)) < 1e-5

    # Resume into a fresh temperature: it is read back from the checkpoint.
    with torch.no_grad():
        sea.loss_fn.log_scale.fill_(3.0)
    seen.clear()
    trainer = make_trainer(llava, sea, samples, args, Record())
    trainer.train(resume_from_checkpoint=str(ckpt))
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "sea.safetensors"))["loss_fn.log_scale"].item()
    assert seen["begin"] == pytest.approx(saved)
    assert 3 in seen and seen[3] != 3.0


# --------------------------------------------------------------------------- the example


def test_example_runs_offline_and_prints_the_losses(tmp_path):
    """``examples/hf_llava_stage1.py`` as a user runs it (a fresh process, hub access disabled)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("accelerate")
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "SEA_CACHE_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    script = root / "examples" / "hf_llava_stage1.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "2", "--backend", "reference"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"L_gen=(\S+) L_align=(\S+) tau=(\S+)", last)
    assert m, last
    l_gen, l_align, tau = map(float, m.groups())
    assert l_gen > 0 and l_align > 0 and 0 < tau <= 1.1
    assert "plain loop step 2:" in out.stdout
