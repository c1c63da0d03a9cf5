"""Checkpointer: the files of a checkpoint, a save/load round trip of every stateful object, pruning,
replacing a step, cleaning partial saves, resolving, and the LLaVA adapter export (no training loop)."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import stat

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from sea_model.config import RunConfig, TrainConfig  # noqa: E402
from sea_model.model import build_model  # noqa: E402
from sea_model.training import checkpoint as ckpt  # noqa: E402
from sea_model.training.loop import Progress  # noqa: E402
from sea_model.training.step import cosine_with_warmup, param_groups  # noqa: E402
from tests import tiny  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    tok = tiny.tiny_word_tokenizer()
    config = tiny.tiny_model_config(tok, cache_dir=tmp / "cache", backend="reference")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, tok = build_model(config, tok, progress=False)
    model.freeze_for_stage(1)
    return {"model": model, "tok": tok, "run": RunConfig(model=config).to_dict()}


def objects(built, out_dir, *, keep_last=2, seed=0):
    """A checkpointer with fresh optimizer, scheduler, generator and progress for ``built``'s model."""
    model = built["model"]
    optimizer = torch.optim.AdamW(param_groups(model, TrainConfig(lr=1e-2)), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(2, 10))
    generator = torch.Generator().manual_seed(seed)
    progress = Progress(total_steps=10, global_batch_size=4, dataset_size=8, world_size=1)
    return ckpt.Checkpointer(
        out_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        progress=progress,
        tokenizer=built["tok"],
        run_config=built["run"],
        stage=1,
        keep_last=keep_last,
    )


def fake_step(c: ckpt.Checkpointer) -> None:
    """An optimizer step on a made-up loss, the schedule and progress advanced, every RNG drawn."""
    loss = sum((p.float() ** 2).sum() for p in c.optimizer.param_groups[0]["params"])
    loss.backward()
    c.optimizer.step()
    c.scheduler.step()
    c.optimizer.zero_grad()
    c.progress.advance()
    torch.rand(1), random.random(), np.random.rand(), torch.rand(1, generator=c.generator)


def draws(c: ckpt.Checkpointer) -> list[float]:
    return [torch.rand(1).item(), random.random(), float(np.random.rand()), torch.rand(1, generator=c.generator).item()]


def test_a_checkpoint_holds_the_documented_files(built, tmp_path):
    c = objects(built, tmp_path)
    fake_step(c)
    path = c.save(1)
    assert path == tmp_path / "checkpoint-0000001" and c.last == path
    names = {p.name for p in path.iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer", "optimizer.pt", "trainer_state.json"} | {
        "rng_state_0.pt",
        "mm_projector.bin",
        "checksums.json",
    }
    info = ckpt.read_info(path)
    assert (info["format"], info["version"], info["stage"], info["step"]) == ("sea-checkpoint", 1, 1, 1)
    run = json.loads(json.dumps(built["run"]))  # tuples read back as lists
    assert info["run"] == run and info["model"] == run["model"]
    assert RunConfig.from_dict(info["run"]).to_dict() == built["run"]  # and back through the deserializer
    assert info["weights"] == ckpt.saved_parameter_names(built["model"])
    state = json.loads((path / "trainer_state.json").read_text())
    assert {k: state[k] for k in ("step", "samples_seen", "epoch", "total_steps", "world_size")} == {
        "step": 1,
        "samples_seen": 4,
        "epoch": 0.5,
        "total_steps": 10,
        "world_size": 1,
    }
    assert "lr_lambdas" not in state["scheduler"] and state["scheduler"]["last_epoch"] == 1


def test_save_then_load_restores_every_stateful_object(built, tmp_path):
    c = objects(built, tmp_path)
    for _ in range(3):
        fake_step(c)
    c.save(3)
    after_save = draws(c)
    opt_state = {k: v.clone() for k, v in c.optimizer.state_dict()["state"][0].items()}
    lr = c.optimizer.param_groups[0]["lr"]

    fresh = objects(built, tmp_path, seed=123)  # other generator seed, zero progress, empty optimizer
    state = fresh.load(tmp_path / "checkpoint-0000003")
    assert state["step"] == 3 and (fresh.progress.step, fresh.progress.samples_seen) == (3, 12)
    assert fresh.optimizer.param_groups[0]["lr"] == lr and fresh.scheduler.last_epoch == 3
    loaded = fresh.optimizer.state_dict()["state"][0]
    assert all(torch.equal(loaded[k], v) for k, v in opt_state.items())
    assert draws(fresh) == after_save  # torch, Python, NumPy and SEA's generator continue as saved


def test_keep_last_replace_and_partial_saves(built, tmp_path):
    c = objects(built, tmp_path, keep_last=2)
    partial = tmp_path / ".checkpoint-0000009.tmp"  # a save killed half-way
    partial.mkdir()
    for step in (1, 2, 3):
        fake_step(c)
        c.save(step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000003"]
    assert not partial.exists()
    before = (tmp_path / "checkpoint-0000003" / "trainer_state.json").read_text()
    fake_step(c)
    c.save(3)  # a rerun of step 3 replaces it
    assert (tmp_path / "checkpoint-0000003" / "trainer_state.json").read_text() != before
    assert not list(tmp_path.glob(".checkpoint-*"))
    assert ckpt.resolve("latest", tmp_path) == ckpt.resolve(tmp_path) == tmp_path / "checkpoint-0000003"


def test_weights_and_adapter_export_round_trip(built, tmp_path):
    c = objects(built, tmp_path)
    fake_step(c)
    path = c.save(1)
    model = built["model"]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        other, _ = build_model(model.model_config, built["tok"], progress=False)
    assert not torch.equal(other.adapter[0].weight, model.adapter[0].weight)
    loaded = ckpt.load_weights(other, path, require_trainable_for_stage=1)
    assert set(loaded) == set(ckpt.saved_parameter_names(model))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    other.adapter[0].weight.data.zero_()
    ckpt.load_mm_projector(other.adapter, path / "mm_projector.bin")
    assert torch.equal(other.adapter[0].weight, model.adapter[0].weight)
    wrong = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ckpt.CheckpointError, match="mm_projector.bin: does not fit this adapter"):
        ckpt.load_mm_projector(wrong, path / "mm_projector.bin")


def test_resolve_errors_name_the_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="latest: no checkpoint-\\* directories in"):
        ckpt.resolve("latest", tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="'latest' needs an output directory"):
        ckpt.resolve("latest")
    with pytest.raises(ckpt.CheckpointError, match="nowhere: no such checkpoint or output directory"):
        ckpt.resolve(tmp_path / "nowhere")


def test_flipped_bytes_are_caught_by_the_checksum(built, tmp_path):
    c = objects(built, tmp_path)
    fake_step(c)
    path = c.save(1)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: checksum mismatch"):
        ckpt.load_weights(built["model"], path)
    tok_file = next((path / "tokenizer").iterdir())
    tok_file.write_bytes(tok_file.read_bytes() + b" ")
    with pytest.raises(ckpt.CheckpointError, match=rf"tokenizer/{tok_file.name}: checksum mismatch"):
        ckpt.load_tokenizer(path)
    state = path / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 1', '"step": 2'))
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.json: checksum mismatch"):
        objects(built, tmp_path).load(path)


def test_files_get_the_modes_of_a_plain_open(built, tmp_path):
    c = objects(built, tmp_path)
    path = c.save(0)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in path.rglob("*")}
    files = {k: m for k, m in modes.items() if (path / k).is_file()}
    assert set(files.values()) == {0o666 & ~umask}, files  # safetensors alone would write 0600
    assert {m for k, m in modes.items() if k not in files} <= {0o777 & ~umask}


def test_a_full_disk_removes_the_partial_checkpoint_and_says_what_is_needed(built, tmp_path, monkeypatch):
    import safetensors.torch

    c = objects(built, tmp_path, keep_last=2)
    for step in (1, 2):
        fake_step(c)
        c.save(step)
    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a partial file, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    fake_step(c)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint-0000003 in .*: no space left") as err:
        c.save(3)
    assert re.search(r"needs about [\d.,]+ MiB, [\d.,]+ MiB free", str(err.value)) and "--resume latest" in str(
        err.value
    )
    assert not list(tmp_path.glob(".checkpoint-*"))  # the partial checkpoint is gone
    # keep_last 2: the oldest was pruned before writing, so only keep_last copies ever need room
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000002"]
    monkeypatch.setattr(safetensors.torch, "save_file", real)  # space again: the next save works
    c.save(3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000003"]
    assert ckpt.resolve("latest", tmp_path).name == "checkpoint-0000003"


def test_non_finite_weights_are_never_checkpointed(built, tmp_path):
    c = objects(built, tmp_path)
    c.save(1)
    model = built["model"]
    saved = model.adapter[0].weight.detach().clone()
    try:
        with torch.no_grad():
            model.adapter[0].weight[0, 0] = float("nan")
        with pytest.raises(ckpt.CheckpointError, match=r"not saving checkpoint-0000002: 1 parameter\(s\) hold NaN"):
            c.save(2)
    finally:
        with torch.no_grad():
            model.adapter[0].weight.copy_(saved)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000001"]
    assert not list(tmp_path.glob(".checkpoint-*"))
