"""Trainer: configuration, data stream, exact resume, freezing, LLaVA export, stage 1 -> 2,
checkpoint errors, and a 2-process DDP run on gloo whose SEA loss gathers across ranks."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from sea_model import tiny_models as shipped  # noqa: E402
from sea_model.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from sea_model.errors import UserError  # noqa: E402
from sea_model.model import build_adapter, build_model  # noqa: E402
from sea_model.training import checkpoint as ckpt  # noqa: E402
from sea_model.training.loop import train  # noqa: E402
from sea_model.training.run_config import load_run_config, parse_overrides  # noqa: E402
from sea_model.training.sampler import StreamSampler  # noqa: E402
from tests import tiny  # noqa: E402

COMPARED = ("loss", "loss_gen", "loss_align", "pairs", "tau", "lr", "grad_norm")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and it keeps a shared 2-core machine usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = tiny.tiny_word_tokenizer()
    names = tiny.make_images(root / "images", 10)
    tiny.write_json(root / "pretrain.json", tiny.pretrain_entries(names))
    tiny.write_json(root / "finetune.json", tiny.finetune_entries(names[:6]))
    model_config = tiny.tiny_model_config(tok, cache_dir=root / "cache", backend="reference")  # no C++ build in tests
    # adapter 32 -> 48 (in and out dims differ); dropout makes the global RNG matter for resume
    model_config.llm.update(hidden_size=48, intermediate_size=96, attention_dropout=0.1)
    return {"root": root, "tok": tok, "model": model_config}


def config(setup, out, *, stage=1, **train_kw) -> RunConfig:
    json_path = setup["root"] / ("pretrain.json" if stage == 1 else "finetune.json")
    train_kw = {
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "max_steps": 6,
        "save_every": 2,
        "progress": False,
        **train_kw,
    }
    return RunConfig(
        model=copy.deepcopy(setup["model"]),
        data=DataConfig(
            json_path=str(json_path), image_folder=str(setup["root"] / "images"), num_workers=0, max_length=128
        ),
        train=TrainConfig(stage=stage, out_dir=str(out), **train_kw),
    )


@pytest.fixture(scope="module")
def stage1(setup):
    """An uninterrupted 6-step stage-1 run (10 samples, global batch 4: steps cross epochs)."""
    return train(config(setup, setup["root"] / "full"), tokenizer=setup["tok"])


# --------------------------------------------------------------------------- configuration


def test_config_file_overrides_and_stage_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  llm: {model_type: llama, hidden_size: 32}\ntrain:\n  lr: 1e-3\n  epochs: 2\n")
    overrides = parse_overrides(
        [
            "--model.sea.enabled",
            "false",
            "--train.max_steps=7",
            "--model.llm.hidden_size",
            "48",
            "--train.betas",
            "[0.9, 0.95]",
        ]
    )
    cfg = load_run_config(path, overrides)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML reads "1e-3" as a string
    assert cfg.train.epochs == 2.0 and cfg.train.max_steps == 7 and cfg.train.betas == (0.9, 0.95)
    assert cfg.model.sea.enabled is False and cfg.model.llm == {"model_type": "llama", "hidden_size": 48}
    one, two = cfg.resolved(), load_run_config(None, [("train.stage", "2")]).resolved()
    assert (one.train.global_batch_size, one.train.micro_batch_size, one.data.template) == (256, 32, "plain")
    assert (two.train.lr, two.train.global_batch_size, two.train.micro_batch_size, two.data.template) == (
        2e-5,
        128,
        16,
        "auto",
    )
    with pytest.raises(ValueError, match="unknown key train.lrr; valid keys of train: stage"):
        load_run_config(path, [("train.lrr", "1")])
    with pytest.raises(ValueError, match="train.max_steps: cannot read 'many'"):
        load_run_config(path, [("train.max_steps", "many")])
    with pytest.raises(ValueError, match="model.adapter is 'mlp2x_gelu', not a section"):
        load_run_config(path, [("model.adapter.depth", "2")])


def test_stream_sampler_resumes_and_splits_ranks():
    def take(sampler, k):
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    whole = sum(take(StreamSampler(10, 2, 0, 1, seed=3), 10), [])
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:]) == list(range(10))  # one permutation per epoch
    assert whole[:10] != whole[10:]
    assert sum(take(StreamSampler(10, 2, 0, 1, seed=3, start=6), 7), []) == whole[6:]  # continues mid-epoch and across
    r0, r1 = take(StreamSampler(10, 2, 0, 2, seed=3), 5), take(StreamSampler(10, 2, 1, 2, seed=3), 5)
    assert sum((a + b for a, b in zip(r0, r1)), []) == whole  # ranks interleave the same stream


# --------------------------------------------------------------------------- training and resume


def test_resume_after_a_crash_repeats_the_same_losses(setup, stage1, tmp_path):
    full = stage1.history
    assert [h["step"] for h in full] == [1, 2, 3, 4, 5, 6] and all(h["pairs"] > 0 for h in full)
    assert len({h["loss"] for h in full}) == 6

    def crash(step, metrics, model):
        if step == 5:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(config(setup, tmp_path), tokenizer=setup["tok"], callback=crash)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000004"]
    resumed = train(config(setup, tmp_path, resume="latest"))  # tokenizer from the checkpoint
    assert [h["step"] for h in resumed.history] == [5, 6]
    for mine, ref in zip(resumed.history, full[4:]):
        assert {k: mine[k] for k in COMPARED} == {k: ref[k] for k in COMPARED}
    # the metrics file holds each step once, equal to the uninterrupted run's
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in COMPARED} for r in rows] == [{k: h[k] for k in COMPARED} for h in full]
    # and the final checkpoints agree: weights and optimizer state
    a, b = stage1.checkpoint, resumed.checkpoint
    assert a.name == b.name == "checkpoint-0000006"
    wa, wb = ckpt.read_weights(a / ckpt.WEIGHTS), ckpt.read_weights(b / ckpt.WEIGHTS)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = ckpt.torch_load(a / ckpt.OPTIMIZER), ckpt.torch_load(b / ckpt.OPTIMIZER)
    assert all(torch.equal(oa["state"][k]["exp_avg_sq"], ob["state"][k]["exp_avg_sq"]) for k in oa["state"])
    assert ckpt.resolve("latest", tmp_path) == b and ckpt.resolve(tmp_path) == b


def test_resume_and_init_from_take_their_configuration_from_the_checkpoint(stage1, tmp_path):
    saved = ckpt.read_info(stage1.checkpoint)
    cfg = load_run_config(None, [("train.resume", str(stage1.checkpoint)), ("train.lr", "5e-4")])
    assert cfg.model.to_dict() == saved["model"] and cfg.data.json_path == saved["run"]["data"]["json_path"]
    assert cfg.train.max_steps == 6 and cfg.train.lr == 5e-4  # the saved run, then the command line
    copied = tmp_path / stage1.checkpoint.name
    shutil.copytree(stage1.checkpoint, copied)
    saved["run"]["train"]["stop_after"] = 3  # how that run was invoked is not inherited
    (copied / ckpt.CONFIG).write_text(json.dumps(saved))
    (copied / ckpt.CHECKSUMS).unlink()  # edited by hand: loads as a checkpoint written before checksums
    assert load_run_config(None, [("train.resume", str(copied))]).train.stop_after is None
    two = load_run_config(None, [("train.stage", "2"), ("train.init_from", str(stage1.out_dir))])
    assert two.model.to_dict() == saved["model"] and two.train.max_steps is None and two.data.json_path is None


def test_stage1_changes_only_adapter_and_temperature(setup, stage1):
    with torch.random.fork_rng():
        torch.manual_seed(0)  # train.seed: the same random initialisation
        before, _ = build_model(copy.deepcopy(setup["model"]), setup["tok"], progress=False)
    after = stage1.model
    for part in ("llm", "tower"):
        sa, sb = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert not torch.equal(before.adapter[0].weight, after.adapter[0].weight)
    assert before.sea.log_scale.item() != after.sea.log_scale.item()
    # Saved: trainable parts, plus the random LLM and tower (they cannot be rebuilt from a hub name).
    names = ckpt.saved_parameter_names(after)
    assert {n.split(".")[0] for n in names} == {"adapter", "sea", "llm", "tower"}
    pretrained = copy.copy(after)
    pretrained.model_config = copy.deepcopy(after.model_config)
    pretrained.model_config.llm, pretrained.model_config.vision.pretrained = "lmsys/vicuna-7b-v1.5", "openai"
    assert sorted(ckpt.saved_parameter_names(pretrained)) == sorted(
        ["sea.log_scale"] + [f"adapter.{k}" for k in after.adapter.state_dict()]
    )


def test_mm_projector_has_llava_names_and_shapes(stage1):
    sd = torch.load(stage1.mm_projector, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "model.mm_projector.0.weight": (48, 32),
        "model.mm_projector.0.bias": (48,),
        "model.mm_projector.2.weight": (48, 48),
        "model.mm_projector.2.bias": (48,),
    }
    adapter = stage1.model.adapter
    assert all(torch.equal(sd[f"model.mm_projector.{k}"], v) for k, v in adapter.state_dict().items())
    # LLaVA's --pretrain_mm_mlp_adapter: keys after 'mm_projector.' into its mlp2x_gelu Sequential
    llava = build_adapter("mlp2x_gelu", 32, 48)
    llava.load_state_dict({k.split("mm_projector.")[1]: v for k, v in sd.items() if "mm_projector" in k})
    x = torch.randn(3, 32)
    torch.testing.assert_close(llava(x), adapter(x), rtol=0, atol=0)


def test_stage2_starts_from_the_stage1_output(setup, stage1, tmp_path):
    start = {}

    def record(step, metrics, model):
        if step == 1:  # warmup: the first step runs at lr 0, so weights are still the loaded ones
            assert metrics["lr"] == 0.0
            start.update(
                {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(("adapter.", "llm."))}
            )

    cfg = config(setup, tmp_path, stage=2, init_from=str(stage1.out_dir), max_steps=3, save_every=0)
    cfg.model.sea.enabled = False  # as in the paper: SEA in stage 1 only
    result = train(cfg, callback=record)
    final = stage1.model.state_dict()
    assert start and all(torch.equal(start[k], final[k]) for k in start)  # adapter and LLM came from stage 1
    trained = result.model.state_dict()
    assert not torch.equal(
        trained["llm.model.layers.0.mlp.up_proj.weight"], final["llm.model.layers.0.mlp.up_proj.weight"]
    )
    assert all(torch.equal(trained[k], final[k]) for k in final if k.startswith("tower."))
    info = ckpt.read_info(result.checkpoint)
    assert info["stage"] == 2 and not (result.checkpoint / ckpt.MM_PROJECTOR).exists()
    assert all(h["loss_align"] is None and h["pairs"] == 0 for h in result.history)


def test_bad_checkpoints_are_named(setup, stage1, tmp_path):
    good = stage1.checkpoint
    bad = tmp_path / "checkpoint-0000006"
    shutil.copytree(good, bad)
    weights = (bad / ckpt.WEIGHTS).read_bytes()
    (bad / ckpt.WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: not a readable safetensors file .*truncated"):
        train(config(setup, tmp_path / "again", resume=str(bad)))
    optimizer = (bad / ckpt.OPTIMIZER).read_bytes()
    (bad / ckpt.OPTIMIZER).write_bytes(optimizer[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.pt: cannot be read"):
        ckpt.torch_load(bad / ckpt.OPTIMIZER)
    torch.save({"state": shutil.Error("an arbitrary object")}, bad / ckpt.OPTIMIZER)  # never unpickled
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.pt: cannot be read as tensors and plain data"):
        ckpt.torch_load(bad / ckpt.OPTIMIZER)
    (bad / ckpt.CONFIG).write_text('{"format": "sea-checkpoint", "version": 1, "sta')
    with pytest.raises(ckpt.CheckpointError, match=r"config\.json: not valid JSON"):
        ckpt.read_info(bad)
    foreign = tmp_path / "hf-model"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ckpt.CheckpointError, match=r"hf-model/config\.json: not a sea checkpoint \(format None"):
        ckpt.read_info(foreign)
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(foreign / ckpt.WEIGHTS))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: not a sea checkpoint's weights"):
        ckpt.load_weights(stage1.model, foreign)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ckpt.CheckpointError, match=r"empty: not a sea checkpoint \(no config\.json\) and no checkpoint-\* directories"
    ):
        ckpt.resolve(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds another run's checkpoints .*--resume latest.*--overwrite"):
        train(config(setup, stage1.out_dir))


# --------------------------------------------------------------------------- one step function


def test_trainer_and_stage1_benchmark_share_one_step(setup, tmp_path, monkeypatch):
    """Both call sea_model.training.step.forward_backward_step through train_step: a copy in either breaks this."""
    from sea_model.bench import stage1 as bench_stage1
    from sea_model.training import step as trainer

    seen = []
    real = trainer.forward_backward_step

    def spy(s, batch, **kw):
        out = real(s, batch, **kw)
        seen.append((kw["accum"], out.loss.detach().clone()))
        return out

    monkeypatch.setattr(trainer, "forward_backward_step", spy)
    params = dict(tower="demo", llm="demo", batch=2, text=4, q=50, word_tokens=2, top_n=3, dtype="float32")
    try:
        step, (batch,) = bench_stage1.stage1_case("sea-reference", "cpu", warmup_steps=0, **params)
        loss = step(batch)
    finally:
        bench_stage1.clear_cache()
    assert len(seen) == 1 and seen[0][0] == 1 and loss == pytest.approx(seen[0][1].item(), rel=1e-12)
    seen.clear()
    result = train(config(setup, tmp_path, max_steps=2, save_every=0, plot=False), tokenizer=setup["tok"])
    assert [a for a, _ in seen] == [2] * 4  # 2 steps x 2 micro-batches (global 4, micro 2)
    assert result.history[0]["loss"] == pytest.approx(sum(v.item() for _, v in seen[:2]) / 2, rel=1e-6)


# --------------------------------------------------------------------------- distributed


def _ddp_worker(rank, init_file, cfg_dict, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    start = {}

    def record(step, metrics, model):
        if step == 1:  # the first step runs at lr 0 (warmup): the initial adapter
            start.update({k: v.detach().clone() for k, v in model.adapter.state_dict().items()})

    try:
        result = train(RunConfig.from_dict(cfg_dict), tokenizer=tiny.tiny_word_tokenizer(), callback=record)
        adapter = {k: v.detach().clone() for k, v in result.model.adapter.state_dict().items()}
        log_scale = result.model.sea.log_scale.detach().clone()
        torch.save(
            {"history": result.history, "start": start, "adapter": adapter, "log_scale": log_scale},
            f"{out}/rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_share_sea_negatives_and_weights(setup, tmp_path):
    import torch.multiprocessing as mp

    cfg = config(setup, tmp_path / "run", max_steps=3, save_every=0)
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for a, b in zip(r0["history"], r1["history"]):
        assert a["loss_align"] == b["loss_align"] and a["loss"] == b["loss"] and a["pairs"] == b["pairs"]
        assert a["pairs"] == a["pairs_local"] + b["pairs_local"] and min(a["pairs_local"], b["pairs_local"]) > 0
    assert len(r0["history"]) == 3
    assert r0["adapter"].keys() == r1["adapter"].keys() and all(
        torch.equal(r0["adapter"][k], r1["adapter"][k]) for k in r0["adapter"]
    )
    assert torch.equal(r0["log_scale"], r1["log_scale"])
    assert r0["history"][0]["lr"] == 0.0 and torch.equal(r0["start"]["0.weight"], r1["start"]["0.weight"])
    assert not torch.equal(r0["start"]["0.weight"], r0["adapter"]["0.weight"])  # and it trained
    final = ckpt.list_checkpoints(tmp_path / "run")[-1]
    assert final.name == "checkpoint-0000003" and {"rng_state_0.pt", "rng_state_1.pt"} <= {
        p.name for p in final.iterdir()
    }


# --------------------------------------------------------------------------- runs that survive (issue 14)


def strict_rows(path):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def poison(monkeypatch, bad: dict):
    """Make optimizer step ``k`` (1-based) non-finite for each ``k: "grad" | "loss"`` of ``bad``:
    NaN gradients, or an infinite loss."""
    from sea_model.training import step as trainer

    real, calls = trainer.forward_backward_step, []

    def forward_backward(s, batch, *, accum, last):
        out = real(s, batch, accum=accum, last=last)
        calls.append(1)
        what = bad.get(len(calls) // accum) if last else None
        if what == "grad":
            for p in s.params:
                p.grad.fill_(float("nan"))
        elif what == "loss":
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(trainer, "forward_backward_step", forward_backward)


def test_non_finite_steps_are_skipped_and_logged_as_strict_json(setup, stage1, tmp_path, monkeypatch, caplog):
    poison(monkeypatch, {3: "grad", 4: "loss"})
    weights = {}
    result = train(
        config(setup, tmp_path),
        tokenizer=setup["tok"],
        callback=lambda step, m, model: weights.__setitem__(step, model.adapter[0].weight.detach().clone()),
    )
    assert result.step == 6 and result.checkpoint is not None
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert [r.get("skipped", False) for r in rows] == [False, False, True, True, False, False]
    assert rows[2]["grad_norm"] is None and rows[2]["nonfinite"] == ["grad_norm"]
    assert rows[3]["loss"] is None and rows[3]["nonfinite"] == ["loss"]
    assert torch.equal(weights[2], weights[3]) and torch.equal(weights[3], weights[4])  # nothing applied
    assert not torch.equal(weights[4], weights[5])  # and training goes on
    assert "step 3: the grad_norm is not finite; step skipped" in caplog.text
    assert "step 4: the loss is not finite; step skipped" in caplog.text
    # the save at step 4 (save_every 2) waited for step 5, the first finite step after the streak
    assert "step 4: checkpoint postponed" in caplog.text
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000005", "checkpoint-0000006"]
    assert [r["loss"] for r in rows[:2]] == [h["loss"] for h in stage1.history[:2]]


def test_a_diverging_run_stops_with_the_step_and_a_hint(setup, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, dict.fromkeys(range(3, 7), "grad"))
    cfg = config(setup, tmp_path, max_bad_steps=1)
    with pytest.raises(
        UserError, match=r"step 4: the grad_norm was not finite for 2 step\(s\) in a row .*Lower train.lr"
    ):
        train(cfg, tokenizer=setup["tok"])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000002"]  # step 4 never saved
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["skipped"]


def test_the_temperature_has_a_lower_clamp():
    from sea_kernels import SEAAlignmentLoss

    loss = SEAAlignmentLoss(min_scale=0.01, max_scale=100.0)
    with torch.no_grad():
        loss.log_scale.fill_(float("-inf"))
    assert loss.scale().item() == pytest.approx(0.01)
    with torch.no_grad():
        loss.log_scale.fill_(float("inf"))
    assert loss.scale().item() == 100.0
    with pytest.raises(ValueError, match="min_scale must be in"):
        SEAAlignmentLoss(min_scale=0.0)


def test_the_data_is_checked_before_the_model_is_built(setup, tmp_path, monkeypatch):
    import sea_model.training.loop

    def never(*a, **k):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(sea_model.training.loop, "build_model", never)
    cfg = config(setup, tmp_path / "a")
    cfg.data.image_folder = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        train(cfg, tokenizer=setup["tok"])
    cfg = config(setup, tmp_path / "b")
    (tmp_path / "bad.json").write_bytes(b'[{"id": "\xff"}]')
    cfg.data.json_path = str(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"bad.json: not UTF-8 text"):
        train(cfg, tokenizer=setup["tok"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file: exists and is not a folder"):
        train(config(setup, tmp_path / "file"), tokenizer=setup["tok"])


def test_one_run_per_folder(setup, stage1, tmp_path):
    from sea_model.training import run_dir

    held = run_dir.lock(tmp_path)  # another sea train (a separate open: flock conflicts)
    try:
        with pytest.raises(ValueError, match=rf"in use by another sea train \(pid {os.getpid()} on"):
            train(config(setup, tmp_path), tokenizer=setup["tok"])
    finally:
        held.close()
    shutil.copytree(stage1.out_dir, tmp_path / "other", ignore=shutil.ignore_patterns(".lock"))
    with pytest.raises(ValueError, match="holds another run's checkpoints"):
        train(config(setup, tmp_path / "other"), tokenizer=setup["tok"])
    fresh = train(config(setup, tmp_path / "other", max_steps=2, overwrite=True), tokenizer=setup["tok"])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "other")] == ["checkpoint-0000002"]
    assert [r["step"] for r in strict_rows(tmp_path / "other" / "metrics.jsonl")] == [1, 2]
    assert (
        fresh.checkpoint.name == "checkpoint-0000002" and fresh.mm_projector == tmp_path / "other" / "mm_projector.bin"
    )


def test_a_rollback_becomes_the_branch_that_latest_continues(setup, stage1, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stage1.out_dir, out)  # checkpoints 4 and 6 (keep_last 2), metrics 1-6
    branch = train(config(setup, out, resume=str(out / "checkpoint-0000004"), stop_after=5))
    assert [h["step"] for h in branch.history] == [5] and branch.checkpoint is None
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-0000004"]
    aside = next(out.glob("abandoned-*-after-4"))
    assert [p.name for p in ckpt.list_checkpoints(aside)] == ["checkpoint-0000006"]
    assert [r["step"] for r in strict_rows(aside / "metrics.jsonl")] == [5, 6]
    assert [r["step"] for r in strict_rows(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    done = train(config(setup, out, resume="latest"))  # continues the branch: from 4, not the abandoned 6
    assert [h["step"] for h in done.history] == [5, 6]
    rows = strict_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [h["loss"] for h in stage1.history]  # the same run, exactly


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the DataLoader workers in /proc")
def test_preemption_saves_at_the_end_of_the_step_and_resume_finishes(setup, stage1, tmp_path):
    import signal

    def children() -> list[int]:  # this process's DataLoader workers
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
        return [pid for pid in pids if _parent(pid) == os.getpid()]

    def preempt(step, metrics, model):  # as a scheduler does: the whole process group, workers included
        if step == 1:  # the workers first: they must not die and leave the main process without data
            for pid in children():
                os.kill(pid, signal.SIGTERM)
        if step == 3:
            for pid in [os.getpid(), *children()]:
                os.kill(pid, signal.SIGTERM)

    cfg = config(setup, tmp_path)
    cfg.data.num_workers = 1
    stopped = train(cfg, tokenizer=setup["tok"], callback=preempt)
    assert (stopped.step, stopped.preempted, stopped.checkpoint) == (3, "SIGTERM", None)
    assert stopped.last_checkpoint.name == "checkpoint-0000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = train(config(setup, tmp_path, resume="latest"))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in stage1.history[3:]]
    # killed after the last checkpoint, before the export: a resume finishes it
    (tmp_path / "mm_projector.bin").unlink()
    (tmp_path / "loss.png").unlink()
    again = train(config(setup, tmp_path, resume="latest"))
    assert again.history == [] and again.checkpoint.name == "checkpoint-0000006"
    assert (tmp_path / "mm_projector.bin").is_file() and (tmp_path / "loss.png").is_file()


def test_a_failed_checkpoint_write_leaves_a_resumable_folder(setup, stage1, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def fill_up(tensors, filename, metadata=None):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint of step 4
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fill_up)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint-0000004 in .*no space left"):
        train(config(setup, tmp_path), tokenizer=setup["tok"])
    assert not list(tmp_path.glob(".checkpoint-*")) and ckpt.resolve("latest", tmp_path).name == "checkpoint-0000002"
    resumed = train(config(setup, tmp_path, resume="latest"))  # once there is space again
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in stage1.history[2:]]


def test_skipped_images_are_counted_in_metrics_and_summary(setup, tmp_path, capsys):
    from sea_model.commands import cli

    entries = tiny.pretrain_entries(["img0.png", "gone1.png", "img1.png", "gone2.png"])
    tiny.write_json(tmp_path / "pt.json", entries)
    cfg = config(setup, tmp_path / "run", max_steps=2, save_every=0)
    cfg.data.json_path = str(tmp_path / "pt.json")
    result = train(cfg, tokenizer=setup["tok"])
    rows = strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert sum(r["skipped_images"] for r in rows) == result.skipped_images == 2
    cli._train_summary(result)
    assert "skipped images: 2 could not be read" in capsys.readouterr().out


def test_generate_user_errors_are_one_line(stage1, tmp_path, capsys):
    from sea_model.commands import cli

    image = tmp_path / "x.png"
    image.write_bytes(b"not a png")
    base = ["generate", "--checkpoint", str(stage1.out_dir), "--prompt", "hi"]
    cases = [
        (["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"], "no such checkpoint"),
        (base + ["--image", str(image)], "not an image PIL can read"),
        (base + ["--image", str(tmp_path / "missing.png")], "missing.png: no such file"),
        (base + ["--max_new_tokens", "-5"], "--max_new_tokens must be >= 1; got -5"),
        (base + ["--max_new_tokens", "100000"], "max_new_tokens must be in [1, "),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("sea generate: error: ") and message in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------- Hugging Face tower


def test_hf_clip_tower_by_local_path_trains_and_exports_to_llava(setup, tmp_path):
    """``vision.name`` a local Hugging Face CLIP folder (as LLaVA-1.5's ``--vision_tower``): SEA
    trains in stage 1, stage 2 follows, and ``sea export --format llava-hf`` writes a Llava folder
    that ``from_pretrained`` loads and that answers as ``sea generate`` does."""
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from sea_model.commands.cli import main
    from sea_model.config import VisionConfig
    from sea_model.model import answer
    from sea_model.prompts import prompt_ids, render
    from sea_model.training.checkpoint import load_for_inference

    torch.manual_seed(0)
    clip_dir = tmp_path / "clip-vit-tiny"
    shipped.tiny_hf_clip("clip").save_pretrained(clip_dir)
    tiny.tiny_tokenizer().save_pretrained(clip_dir)
    cfg = config(setup, tmp_path / "s1", max_steps=2, save_every=2)
    cfg.model.vision = VisionConfig(name=str(clip_dir))
    result = train(cfg, tokenizer=setup["tok"])
    rows = [json.loads(line) for line in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["pairs"] > 0 and r["loss_align"] > 0 for r in rows)
    assert result.model.tower.kind == "hf" and result.model.tower.feature_dim == 16
    saved = json.loads((result.checkpoint / "config.json").read_text())
    assert saved["model"]["vision"]["name"] == str(clip_dir)

    cfg2 = config(setup, tmp_path / "s2", stage=2, max_steps=1, save_every=1, init_from=str(tmp_path / "s1"))
    cfg2.model.vision = cfg.model.vision
    stage2 = train(cfg2, tokenizer=setup["tok"])
    assert main(["export", "--format", "llava-hf", str(stage2.checkpoint), str(tmp_path / "llava")]) == 0

    model, tok, _ = load_for_inference(stage2.checkpoint)
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    processor = LlavaProcessor.from_pretrained(tmp_path / "llava")
    image = Image.open(setup["root"] / "images" / "img1.png").convert("RGB")  # not square: padded
    question = "what color is the cat?"
    expected = answer(model, tok, question, image, max_new_tokens=8)
    text, _, special = render([("user", "<image>\n" + question)], tok, "auto", generation=True)
    inputs = processor(images=image, text=text, return_tensors="pt", add_special_tokens=special)
    ids = prompt_ids(question, tok, image_token_id=model.image_token_id, num_image_tokens=16)
    assert inputs["input_ids"][0].tolist() == ids  # the processor expands <image> as sea does
    pixels = model.tower.image_processor()(image)
    torch.testing.assert_close(inputs["pixel_values"][0], pixels, atol=2e-2, rtol=0)  # PIL vs torchvision resize
    new = llava.generate(**inputs, max_new_tokens=8, do_sample=False)[0, len(ids) :]
    assert tok.decode(new, skip_special_tokens=True).strip() == expected and expected
