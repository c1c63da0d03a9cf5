"""Issue 24, cause 1: a real failure to write (a file size limit, a full tmpfs) during a run or an
export ends in one line naming the destination, the space needed and free, exit 2, and leaves no
partial file or folder. No write is mocked: the child process hits ``RLIMIT_FSIZE`` (EFBIG) or a
full tmpfs (ENOSPC), which safetensors reports as ``SafetensorError`` and ``torch.save`` as
``RuntimeError``."""

from __future__ import annotations

import json
import re

from tests.faults.conftest import error_line, sea, train_args

SPACE = r"needs about [\d.,]+ MiB, [\d.,]+ MiB free"


def test_a_checkpoint_past_a_file_size_limit_is_one_line_and_leaves_no_partial_folder(stage1, tmp_path):
    out = tmp_path / "fresh"
    result = sea(*train_args(stage1, "--out", str(out)), limit=1_000_000)  # model.safetensors is ~2.2 MB
    line = error_line(result, "train")
    assert re.search(rf"cannot write checkpoint-0000003 in {re.escape(str(out))}: file too large", line), line
    assert re.search(SPACE, line) and "the partial checkpoint was removed" in line, line
    assert not list(out.glob(".checkpoint-*")) and not list(out.glob("checkpoint-*"))


def test_a_checkpoint_on_a_full_disk_safetensors_and_torch_save(stage1, tmpfs):
    ckpt = next(stage1.glob("checkpoint-*"))
    weights, optim = (ckpt / "model.safetensors").stat().st_size, (ckpt / "optimizer.pt").stat().st_size
    # the weights do not fit (safetensors fails); the weights fit, the optimizer does not (torch.save fails)
    for size in (weights // 2, weights + optim // 2):
        out = tmpfs(f"{size // 1024}k") / "run"
        line = error_line(sea(*train_args(stage1, "--out", str(out))), "train")
        assert "cannot write checkpoint-0000003 in" in line and "no space left on the device" in line, line
        assert re.search(SPACE, line) and "then --resume latest" in line, line
        assert not list(out.glob(".checkpoint-*")) and not list(out.glob("checkpoint-*"))


def test_the_loss_plot_and_the_llava_adapter_past_a_limit(stage1):
    """A run found complete on resume writes its plot and ``mm_projector.bin``: each fails alone here."""
    for name, extra in (("loss.png", []), ("mm_projector.bin", ["--train.plot", "false"])):
        (stage1 / "loss.png").unlink(missing_ok=True)
        (stage1 / "mm_projector.bin").unlink(missing_ok=True)
        result = sea(*train_args(stage1, "--out", str(stage1), "--resume", "latest", *extra), limit=20_000)
        line = error_line(result, "train")
        assert f"cannot write {stage1 / name}: file too large" in line and re.search(SPACE, line), line
        assert not (stage1 / name).exists() and not list(stage1.glob(".*.tmp*")) and not list(stage1.glob("*.tmp*"))


def test_metrics_past_a_limit_leave_no_torn_line(stage1):
    metrics = stage1 / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    limit = 20_000  # above run_config.yaml; the kept rows are padded to just under it
    pad = (limit - 100 - len(metrics.read_bytes())) // len(rows)
    text = "".join(json.dumps({**row, "pad": "x" * pad}) + "\n" for row in rows)
    metrics.write_text(text)
    result = sea(*train_args(stage1, "--out", str(stage1), "--resume", "latest", "--train.max_steps", "5"), limit=limit)
    line = error_line(result, "train")
    assert f"cannot write {metrics}: file too large" in line and re.search(SPACE, line), line
    assert metrics.read_text() == text  # the rows kept, no partial row


def test_an_export_past_a_limit_leaves_nothing(hf_checkpoint, tmp_path):
    out = tmp_path / "llava"
    line = error_line(sea("export", "--format", "llava-hf", str(hf_checkpoint), str(out), limit=50_000), "export")
    assert f"cannot write {out}: file too large" in line and re.search(SPACE, line), line
    assert "partial output was removed" in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
