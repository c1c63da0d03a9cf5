"""Issue 24, cause 3: ``--resume DIR/checkpoint-N`` continues in DIR (the folder that holds the
checkpoint), not in the folder recorded in the checkpoint (the run may have been copied or moved);
``--out`` naming another folder is refused, naming both."""

from __future__ import annotations

import json

from tests.faults.conftest import error_line, sea


def moved(stage1, tmp_path):
    """``stage1``'s checkpoint, recording another output folder (as after a copy or a move)."""
    ckpt = next(stage1.glob("checkpoint-*"))
    info = json.loads((ckpt / "config.json").read_text())
    info["run"]["train"]["out_dir"] = str(tmp_path / "recorded")
    (ckpt / "config.json").write_text(json.dumps(info))
    (ckpt / "checksums.json").unlink()  # edited by hand: read as a checkpoint written before checksums
    return ckpt


def test_resume_continues_in_the_folder_that_holds_the_checkpoint(stage1, tmp_path):
    ckpt = moved(stage1, tmp_path)
    result = sea("train", "--resume", str(ckpt), "--train.max_steps", "4", "--train.progress", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "recorded").exists()
    assert (stage1 / "checkpoint-0000004").is_dir()
    assert [json.loads(line)["step"] for line in (stage1 / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_an_out_naming_another_folder_is_refused(stage1, tmp_path):
    ckpt = moved(stage1, tmp_path)
    other = tmp_path / "other"
    line = error_line(sea("train", "--resume", str(ckpt), "--out", str(other), "--train.max_steps", "4"), "train")
    assert f"--resume {ckpt} is in {stage1}, but --out is {other}" in line, line
    assert not other.exists() and not (tmp_path / "recorded").exists()
