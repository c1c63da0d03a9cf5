"""Issue 24, cause 2: a torn last line of ``metrics.jsonl`` (a run stopped while writing it) no longer
blocks ``--resume``: it is set aside in ``metrics.jsonl.torn``, named in a warning, and the run
continues; any other bad line is an error naming the file and the line."""

from __future__ import annotations

import json

from tests.faults.conftest import error_line, sea, train_args


def test_a_torn_last_line_is_set_aside_and_the_run_resumes(stage1):
    metrics = stage1 / "metrics.jsonl"
    torn = '{"step": 4, "epoch": 1.5, "loss": 5.2'
    with open(metrics, "a") as f:
        f.write(torn)  # no newline: the process died mid-write
    result = sea(*train_args(stage1, "--out", str(stage1), "--resume", "latest", "--train.max_steps", "5"))
    assert result.returncode == 0, result.stderr[-3000:]
    aside = stage1 / "metrics.jsonl.torn"
    assert f"{metrics} line 4 is torn" in result.stderr and str(aside) in result.stderr, result.stderr[-3000:]
    assert aside.read_text() == torn + "\n"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_a_bad_line_before_the_last_names_the_file_and_the_line(stage1):
    metrics = stage1 / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20]
    metrics.write_text("".join(line + "\n" for line in lines))
    result = sea(*train_args(stage1, "--out", str(stage1), "--resume", "latest", "--train.max_steps", "5"))
    line = error_line(result, "train")
    assert f"{metrics} line 2: not valid JSON" in line, line
    assert metrics.read_text().splitlines() == lines  # left as it was
