"""SEATrainer's state across steps: the temperature's gradient is zeroed every optimizer step (a
40-step run equals a hand-written loop), and the first log after a resume averages over the
steps since the resume, not since step 0."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from sea_model import tiny_models as shipped  # noqa: E402
from tests import tiny  # noqa: E402

WORDS = tiny.WORDS[:24]


def build(**sea_options):
    tok, llava, sea = tiny.llava_sea(WORDS, **sea_options)
    return llava, sea, shipped.llava_caption_samples(tok, llava, WORDS, 8)


def trainer(llava, sea, samples, out, **kw):

    from sea_model.hf import SEATrainer

    base = dict(learning_rate=0.02, lr_scheduler_type="constant", train_sampling_strategy="sequential", max_steps=-1)
    args = tiny.trainer_args(out, **{**base, **kw})
    return SEATrainer(model=llava, sea=sea, args=args, train_dataset=samples, data_collator=shipped.collate_padded)


def test_forty_steps_equal_a_loop_with_zeroed_gradients(tmp_path):
    steps = 40
    llava, sea, samples = build(weight=2.0)
    start = {k: v.clone() for k, v in llava.state_dict().items()}
    trainer(llava, sea, samples, tmp_path, max_steps=steps, logging_steps=10).train()
    got_tau, got_proj = sea.temperature, llava.model.multi_modal_projector.linear_2.weight.detach().clone()

    # The same 40 steps by hand: AdamW (Trainer's defaults, no weight decay), every gradient zeroed each step.
    llava.load_state_dict(start)
    with torch.no_grad():
        sea.loss_fn.log_scale.fill_(0.0)  # the initial log-scale (init_log_scale's default)
    params = [p for p in llava.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([*params, *sea.parameters()], lr=0.02, weight_decay=0.0)
    for step in range(steps):
        batch = shipped.collate_padded([samples[step % len(samples)]])
        out = llava(**batch)
        loss = out.loss + sea.weight * sea.align().loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert sea.temperature == pytest.approx(got_tau, rel=1e-5)
    torch.testing.assert_close(llava.model.multi_modal_projector.linear_2.weight, got_proj, rtol=1e-4, atol=1e-6)
    assert abs(got_tau - 1.0) > 1e-3  # it trained


def test_first_log_after_resume_averages_the_steps_since_the_resume(tmp_path):
    """Also the documented resume recipe: transformers 5.25's ``resume_from_checkpoint`` saves Llava's
    weights under legacy key names that it does not map back (it warns "missing keys"); the weights are
    loaded with ``from_pretrained(checkpoint)``, which maps them; the optimizer state, data position and
    SEA's temperature come from the checkpoint."""
    from transformers import LlavaForConditionalGeneration

    llava, sea, samples = build()
    kw = dict(max_steps=6, logging_steps=2, save_strategy="steps", save_steps=4)
    first = trainer(llava, sea, samples, tmp_path, **kw)
    first.train()
    want = [h for h in first.state.log_history if "L_align" in h and h["step"] == 6][0]
    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path / "checkpoint-4")
    llava.load_state_dict(saved.state_dict())
    resumed = trainer(llava, sea, samples, tmp_path, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    got = [h for h in resumed.state.log_history if "L_align" in h and h["step"] == 6][0]
    assert got["pairs"] > 0
    for key in ("L_gen", "L_align", "pairs", "tau", "loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
