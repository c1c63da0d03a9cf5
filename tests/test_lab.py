"""``sea lab``: the renderer's per-patch truth, the texts, and ``sea lab --quick`` end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from sea_model.commands.lab import world as W  # noqa: E402


def test_patch_truth_is_the_object_covering_most_of_each_patch():
    scene = W.Scene((W.Obj("square", "red", "big", 0, 0), W.Obj("circle", "blue", "small", 2, 2)))
    image, truth = W.render(scene, random.Random(0), size=64, patch=16)
    pixels = np.asarray(image).reshape(4, 16, 4, 16, 3).transpose(0, 2, 1, 3, 4).reshape(16, 256, 3)
    for p, k in enumerate(truth):
        red = (pixels[p] == W.COLOURS["red"]).all(-1).sum()
        blue = (pixels[p] == W.COLOURS["blue"]).all(-1).sum()
        expected = 0 if red >= 256 / 3 and red > blue else 1 if blue >= 256 / 3 else -1
        assert k == expected, (p, red, blue)
    assert truth[:2] == [0, 0] and truth[4:6] == [0, 0]  # the big square fills the top-left quadrant
    assert truth[10] == 1 and truth[2] == truth[3] == -1  # the circle; the empty top right
    words = W.true_words(scene, truth)
    assert words[0] == ("red", "square") and words[10] == ("blue", "circle") and words[3] == ()
    assert scene.caption() == "a big red square in the top left and a small blue circle in the bottom right"
    qa = {k: (q, a) for k, q, a in scene.questions(random.Random(1))}
    assert set(qa) == set(W.QUESTION_KINDS) and qa["count"][1] in W.NUMBERS
    assert all(len(a.split()) == 1 for _, a in qa.values())


def test_every_lab_text_is_known_to_the_tokenizer():
    from sea_model.commands.demo import demo_tokenizer
    from sea_model.commands.lab.prepare import sea_vocabulary

    rng = random.Random(0)
    tok = demo_tokenizer(W.world_words() + sea_vocabulary())
    texts = []
    for _ in range(200):
        scene = W.random_scene(rng)
        texts += [scene.caption()] + [q + " " + a for _, q, a in scene.questions(rng)]
    for text in texts + [W.PRETRAIN_PROMPT.replace("<image>", "")]:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text
    for _, _, a in W.Scene((W.Obj("circle", "red", "big", 1, 1),)).questions(rng):
        assert len(tok(a, add_special_tokens=False)["input_ids"]) == 1


def test_lab_quick_end_to_end(tmp_path, capsys):
    from sea_model.commands import cli
    from sea_model.training import checkpoint as ckpt

    threads = torch.get_num_threads()
    try:
        assert cli.main(["lab", "--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "sea lab: done in" in capsys.readouterr().out
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["seeds"] == [0, 1] and set(r["arms"]) == {"sea", "baseline"}
    sea, base = r["arms"]["sea"], r["arms"]["baseline"]
    assert sea["sea"]["weight"] == 1.0 and base["sea"]["weight"] == 0.0
    assert {k: v for k, v in sea["sea"].items() if k != "weight"} == {
        k: v for k, v in base["sea"].items() if k != "weight"
    }
    for arm in (sea, base):
        assert arm["seeds"] == [0, 1]
        for key in ("token_alignment", "answer_accuracy"):
            assert len(arm[key]) == 2 and all(0 <= v <= 1 for v in arm[key])
            assert [c[-1][1] for c in arm["curves"][key]] == arm[key]
        for d in arm["checkpoints"]:
            assert ckpt.read_info(ckpt.resolve(f"{d}/stage1"))["stage"] == 1
            assert ckpt.read_info(ckpt.resolve(f"{d}/stage2"))["stage"] == 2
    assert 0 <= r["clip"]["r_at_1"] <= 1 and len(r["clip"]["labeler"]) == 4
    assert list(r["ablations"]) == ["lambda=10"] and r["ablations"]["lambda=10"]["sea"]["weight"] == 10.0
    assert "| sea | 1 | 2 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    for arm in ("sea", "baseline"):
        png = r["figure1"][arm]["png"]
        assert open(png, "rb").read(4) == b"\x89PNG"
    # the Figure-1 pictures are of the same held-out scene
    assert r["figure1"]["sea"]["png"].rsplit("/", 1)[1] == r["figure1"]["baseline"]["png"].rsplit("/", 1)[1]


def test_lab_user_errors_are_one_line(tmp_path, capsys):
    from sea_model.commands import cli

    assert cli.main(["lab", "--seeds", "0,x", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "sea lab: error: --seeds must be comma-separated integers; got '0,x'"
    assert cli.main(["lab", "--seeds", "1,1", "--out", str(tmp_path)]) == 2
    (tmp_path / "file").write_text("")
    assert cli.main(["lab", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
