"""Issue 24, cause 5: ``sea export OUT`` refuses a folder that is a checkpoint or holds a run, and a
non-empty folder unless ``--overwrite``; it writes atomically (a temporary folder, then a rename)."""

from __future__ import annotations

import json

from tests.faults.conftest import error_line, sea


def export(checkpoint, out, *extra):
    return sea("export", "--format", "llava-hf", str(checkpoint), str(out), *extra)


def test_a_checkpoint_folder_is_refused_and_left_unchanged(hf_checkpoint):
    before = {p.name: p.read_bytes() for p in hf_checkpoint.iterdir() if p.is_file()}
    for out in (hf_checkpoint, hf_checkpoint / "llava"):
        for extra in ([], ["--overwrite"]):
            line = error_line(export(hf_checkpoint, out, *extra), "export")
            assert str(out) in line and "checkpoint" in line and "new folder" in line, line
    assert {p.name: p.read_bytes() for p in hf_checkpoint.iterdir() if p.is_file()} == before
    assert not (hf_checkpoint / "llava").exists()


def test_a_run_folder_is_refused(hf_checkpoint):
    run = hf_checkpoint.parent
    before = sorted(p.name for p in run.iterdir())
    line = error_line(export(hf_checkpoint, run, "--overwrite"), "export")
    assert f"{run} holds checkpoints" in line, line
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_non_empty_folder_needs_overwrite_and_is_replaced_whole(hf_checkpoint, tmp_path):
    out = tmp_path / "llava"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = error_line(export(hf_checkpoint, out), "export")
    assert f"{out} is not empty" in line and "--overwrite" in line, line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    result = export(hf_checkpoint, out, "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" not in names and {"config.json", "model.safetensors"} <= names
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]  # no temporary folder left


def test_an_empty_or_new_folder_is_written(hf_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "llava"):
        result = export(hf_checkpoint, out)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (out / "model.safetensors").is_file()
