"""``sea demo``: the synthetic scenes say what their captions say, and the whole demo (quick size)
runs end to end through the CLI, followed by ``sea generate`` on its output."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sea_model.commands import demo
from sea_model.commands.shapes import Obj


def test_scenes_are_drawn_where_their_captions_say():
    scene = Obj("square", "red", "big", row=0, column=0)
    assert scene.caption() == "a big red square in the top left"
    assert Obj("circle", "blue", "small", 1, 1).caption() == "a small blue circle in the center"
    assert Obj("triangle", "green", "small", 2, 1).where == "bottom"
    assert ("What colour is the square?", "red") in scene.questions()
    image = demo.draw(scene, random.Random(0))
    third = demo.IMAGE_SIZE // 3
    assert image.getpixel((third // 2, third // 2)) == demo.COLOURS["red"]  # centre of the top-left cell
    assert image.getpixel((demo.IMAGE_SIZE - 4, demo.IMAGE_SIZE - 4)) != demo.COLOURS["red"]
    # every word the data can contain is one token of the demo tokenizer
    tok = demo.demo_tokenizer(demo.sea_words())
    unk = tok.unk_token_id
    for text in demo.demo_texts()[:200] + demo.sea_words():
        assert unk not in tok(text, add_special_tokens=False)["input_ids"], text
    assert tok.eos_token == "<|im_end|>" and len(tok("a purple", add_special_tokens=False)["input_ids"]) == 2


def test_demo_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("open_clip")
    pytest.importorskip("transformers")
    from sea_model.commands import cli
    from sea_model.training import checkpoint as ckpt

    threads = torch.get_num_threads()
    try:
        assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0  # sets one thread
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "sea demo: done in" in printed and "answer:" in printed and "sea generate --checkpoint" in printed
    scenes = json.loads((tmp_path / "data" / "finetune.json").read_text())
    assert len(scenes) == 24 and scenes[0]["conversations"][0]["value"].startswith("<image>\n")
    for stage, steps in (("stage1", 3), ("stage2", 3)):
        rows = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        assert (tmp_path / stage / "loss.png").read_bytes()[:4] == b"\x89PNG"
        assert ckpt.read_info(ckpt.resolve(tmp_path / stage))["stage"] == int(stage[-1])
    assert rows[-1]["loss_align"] is None  # stage 2 runs without SEA
    stage1_rows = [json.loads(line) for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pairs"] > 0 and r["loss_align"] > 0 for r in stage1_rows)
    assert "model.mm_projector.0.weight" in torch.load(tmp_path / "stage1" / "mm_projector.bin", weights_only=True)

    image = tmp_path / "data" / "question.png"
    assert (
        cli.main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path / "stage2"),
                "--image",
                str(image),
                "--prompt",
                "What colour is the circle?",
                "--max_new_tokens",
                "3",
            ]
        )
        == 0
    )
    reply = capsys.readouterr().out
    assert reply.endswith("\n") and len(reply.split()) <= 3
