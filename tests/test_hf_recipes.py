"""The claims of docs/training.md's Hugging Face section not tested elsewhere: SEA's loss compiles
whole in place (``sea.loss_fn.compile(fullgraph=True)``) while Llava's forward and the backward
stay eager, and ``remove_unused_columns=False`` keeps the fields a collator needs. (PEFT:
tests/test_hf_peft.py; DDP: tests/test_hf_ddp.py; the word-list checks: tests/test_hf_checks.py.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from sea_model import tiny_models as shipped  # noqa: E402
from tests import tiny  # noqa: E402

WORDS = tiny.WORDS[:24]


def build():
    return tiny.llava_sea(WORDS)


def test_loss_fn_compiles_in_place_with_fullgraph():
    tok, llava, sea = build()
    batch = shipped.collate_padded(shipped.llava_caption_samples(tok, llava, WORDS, 2))
    projector = llava.model.multi_modal_projector.linear_1.weight
    results = []
    for compiled in (False, True):
        if compiled:  # in place: sea.align() calls the module, so it runs the compiled forward
            sea.loss_fn.compile(fullgraph=True, backend="aot_eager")  # fullgraph: a graph break would raise
        projector.grad = sea.loss_fn.log_scale.grad = None
        out = llava(**batch)  # Llava's forward: eager
        align = sea.align()
        (out.loss + align.loss).backward()  # the backward: eager, outside the compiled function
        results.append((align.loss.detach(), int(align.pairs), projector.grad.clone(), sea.loss_fn.log_scale.grad))
    assert sea.loss_fn._compiled_call_impl is not None
    (le, pe, *ge), (lc, pc, *gc) = results
    assert pe == pc > 0
    torch.testing.assert_close(lc, le)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_remove_unused_columns_false_keeps_the_collators_fields(tmp_path):
    """Trainer drops sample fields that Llava's forward does not take before the collator sees them."""
    pytest.importorskip("accelerate")

    from sea_model.hf import SEATrainer

    tok, llava, sea = build()
    samples = [
        {**s, "source": f"img{i}.jpg"} for i, s in enumerate(shipped.llava_caption_samples(tok, llava, WORDS, 2))
    ]

    def collate(rows):  # a collator that needs a field Llava's forward does not take
        assert all(r["source"].endswith(".jpg") for r in rows)
        return shipped.collate_padded([{k: v for k, v in r.items() if k != "source"} for r in rows])

    def run(remove: bool):
        args = tiny.trainer_args(
            tmp_path / str(remove), per_device_train_batch_size=2, learning_rate=5e-5, max_grad_norm=1.0, seed=42
        )
        args.remove_unused_columns = remove
        SEATrainer(model=llava, sea=sea, args=args, train_dataset=samples, data_collator=collate).train()

    with pytest.raises(KeyError, match="source"):
        run(True)  # Trainer's default
    run(False)
