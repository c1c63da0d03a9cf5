"""Fault tests through the ``sea`` command: a tiny finished demo run to reuse, the command run in a
subprocess (optionally under a real file size limit), and a small tmpfs (a real full disk) where
this process may mount one."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def sea(*args: str, limit: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m sea_model.commands.cli ARGS``; with ``limit``, under ``RLIMIT_FSIZE`` (bytes) with
    SIGXFSZ ignored, so that a write past it fails with EFBIG as on a full disk (no mock)."""

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, "-m", "sea_model.commands.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        preexec_fn=limited if limit is not None else None,
        timeout=300,
    )


def error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The one error line of a failed command (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"sea {command}: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """``sea demo --quick``: ``stage1/`` (3 steps, a checkpoint, metrics, plot, mm_projector.bin), ``stage2/``."""
    out = tmp_path_factory.mktemp("faults") / "demo"
    result = sea("demo", "--quick", "--backend", "reference", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def stage1(demo, tmp_path) -> Path:
    """A copy of the demo's finished stage-1 run (its run config names the demo's data)."""
    run = tmp_path / "run"
    shutil.copytree(demo / "stage1", run)
    (run / ".lock").unlink(missing_ok=True)
    return run


def train_args(run: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(run / "run_config.yaml"), "--train.progress", "false", *extra]


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)``: a tmpfs of that size (a real full disk); skipped where it cannot be mounted."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A 1-step stage-1 checkpoint with a tiny Hugging Face CLIP tower (what ``sea export`` takes)."""
    import torch

    from sea_model import tiny_models as shipped
    from sea_model.config import DataConfig, RunConfig, TrainConfig, VisionConfig
    from sea_model.training.loop import train
    from tests import tiny

    root = tmp_path_factory.mktemp("hf")
    tok = tiny.tiny_word_tokenizer()
    names = tiny.make_images(root / "images", 4)
    tiny.write_json(root / "pretrain.json", tiny.pretrain_entries(names))
    torch.manual_seed(0)
    shipped.tiny_hf_clip("clip").save_pretrained(root / "clip")
    tiny.tiny_tokenizer().save_pretrained(root / "clip")
    model = tiny.tiny_model_config(tok, cache_dir=root / "cache", backend="reference")
    model.vision = VisionConfig(name=str(root / "clip"))
    data = DataConfig(json_path=str(root / "pretrain.json"), image_folder=str(root / "images"), num_workers=0)
    train_cfg = TrainConfig(
        stage=1, out_dir=str(root / "run"), global_batch_size=2, micro_batch_size=2, max_steps=1, progress=False
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(RunConfig(model=model, data=data, train=train_cfg), tokenizer=tok)
    finally:
        torch.set_num_threads(threads)
    return result.checkpoint
