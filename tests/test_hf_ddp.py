"""SEATrainer under DDP: 2 gloo processes (torch.multiprocessing, as ``torchrun`` sets them up) train
the projector and SEA's temperature; the result must match one process over the same global batch.

Labels are deterministic (window 1, top-1, no dedup) and the samples are taken in order, so rank r
of 2 with one sample per step sees exactly the half of the single process's two-sample batch.
With negatives gathered over ranks (the default) the loss is the single process's, so tau and the
projector agree to float32 rounding; with ``sea_gather_negatives=False`` each rank's loss differs,
yet the ranks must still hold the same tau (its gradient is averaged, like DDP's)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3


def _run(out_dir, per_device, gather=True, tag="run"):
    from sea_model import tiny_models as shipped
    from sea_model.hf import SEATrainer
    from tests import tiny

    words = tiny.WORDS[:24]
    tok, llava, sea = tiny.llava_sea(words)
    samples = shipped.llava_caption_samples(tok, llava, words, 2 * STEPS)
    args = tiny.trainer_args(
        os.path.join(out_dir, tag),
        per_device_train_batch_size=per_device,
        max_steps=STEPS,
        learning_rate=0.05,
        train_sampling_strategy="sequential",
    )
    trainer = SEATrainer(
        model=llava.train(),
        sea=sea,
        sea_gather_negatives=gather,
        args=args,
        train_dataset=samples,
        data_collator=shipped.collate_padded,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "L_align" in h]
    return {
        "log_scale": sea.loss_fn.log_scale.detach().clone(),
        "grad": sea.loss_fn.log_scale.grad,
        "projector": {k: v.detach().clone() for k, v in llava.model.multi_modal_projector.state_dict().items()},
        "logs": logs,
    }


def _worker(rank, port, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    result = {"gathered": _run(out_dir, 1, True, "gathered"), "local": _run(out_dir, 1, False, "local")}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("hf_ddp")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = _run(str(tmp), WORLD, True, "single")
    return ranks, single


def test_ddp_matches_one_process_over_the_global_batch(runs):
    ranks, single = runs
    for r in ranks:
        got = r["gathered"]
        assert got["log_scale"].item() != 0.0  # it trained
        torch.testing.assert_close(got["log_scale"], single["log_scale"], rtol=1e-5, atol=1e-6)
        for name, w in single["projector"].items():
            torch.testing.assert_close(got["projector"][name], w, rtol=1e-5, atol=1e-6, msg=name)
        assert got["grad"] is None  # zeroed after every optimizer step
        # Logged over ranks: the single process's L_align and pairs (negatives and pairs are global).
        for a, b in zip(got["logs"], single["logs"]):
            assert a["L_align"] == pytest.approx(b["L_align"], rel=1e-4)
            assert a["L_gen"] == pytest.approx(b["L_gen"], rel=1e-4)
            assert a["pairs"] == b["pairs"]  # pairs are counted over the ranks with gathered negatives
            assert a["tau"] == pytest.approx(b["tau"], rel=1e-5)


def test_local_negatives_keep_ranks_in_step(runs):
    ranks, single = runs
    local = [r["local"] for r in ranks]
    assert torch.equal(local[0]["log_scale"], local[1]["log_scale"])  # no drift apart
    for name, w in local[0]["projector"].items():
        assert torch.equal(local[1]["projector"][name], w), name
    assert local[0]["log_scale"].item() != pytest.approx(single["log_scale"].item(), abs=1e-7)
