"""``sea inspect``: nearest words known by construction, scores recomputed independently, and the
command on ``sea demo`` checkpoints (stage 1 and 2) and on a stage-1 ``mm_projector.bin``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from sea_kernels import cosine_topk  # noqa: E402
from sea_model.commands import figure1  # noqa: E402
from tests import tiny  # noqa: E402


def _tiny_model(tmp_path):
    from sea_model.model import build_model

    words = tmp_path / "words.txt"
    words.write_text("\n".join(tiny.WORDS) + "\n")  # every word is one token of the word tokenizer
    tok = tiny.tiny_word_tokenizer()
    cfg = tiny.tiny_model_config(tok, cache_dir=tmp_path, words=str(words), backend="reference")
    cfg = dataclasses.replace(cfg, adapter="linear")
    torch.manual_seed(0)
    model, tok = build_model(cfg, tok, progress=False)
    return model.eval(), tok, list(tiny.WORDS)


def _images(n=2):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    return {
        f"img{i}.png": Image.fromarray(torch.randint(0, 256, (40, 30, 3), generator=g, dtype=torch.uint8).numpy())
        for i in range(n)
    }


def test_nearest_word_known_by_construction(tmp_path):
    model, tok, words = _tiny_model(tmp_path)
    table = figure1.word_table(model.llm.get_input_embeddings().weight, model.word_token_ids)
    target = words.index("green")
    with torch.no_grad():  # every visual token is exactly the Eq. 8 embedding of "green"
        model.adapter.weight.zero_()
        model.adapter.bias.copy_(table[target])
    images = _images()
    results = figure1.inspect_images(model, tok, words, images, top_n=3, negate=False, all_tokens=True)
    assert [r.nearest for r in results] == [["green"] * model.tower.num_patches] * 2
    assert all(t == tok.convert_ids_to_tokens(tok.convert_tokens_to_ids("green")) for t in results[0].nearest_token)

    # the labels and scores, recomputed from the tower and the kernel directly
    pixels = torch.stack([model.tower.image_processor()(im) for im in images.values()])
    feats = model.tower(pixels).patch_features
    top = cosine_topk(feats, model.vocab_features, 3)
    hits = labelled = top1 = 0
    for b, r in enumerate(results):
        for p in range(model.tower.num_patches):
            expected = [words[j] for j, v in zip(top.indices[b, p].tolist(), top.values[b, p].tolist()) if v > 0]
            assert r.labels[p] == expected
            if expected:
                labelled += 1
                hits += "green" in expected
                top1 += expected[0] == "green"
    s = figure1.summary(results, {"test": 1})
    assert s["labelled"] == labelled > 0
    assert s["token_alignment"] == pytest.approx(hits / labelled)
    assert s["top1_agreement"] == pytest.approx(top1 / labelled)

    # "green"'s CLIP feature is the patches' mean m, every other word's is -m: with cos, a patch's only
    # positive label is "green" exactly when cos(patch, m) > 0; with -cos, when cos(patch, m) < 0
    m = feats.reshape(-1, feats.shape[-1]).mean(0)
    with torch.no_grad():
        model.vocab_features.copy_(-m.expand_as(model.vocab_features))
        model.vocab_features[target] = m
    c = torch.nn.functional.cosine_similarity(feats, m.expand_as(feats), dim=-1)
    for negate, share in ((False, (c > 0).float().mean()), (True, (c < 0).float().mean())):
        s = figure1.summary(figure1.inspect_images(model, tok, words, images, top_n=1, negate=negate), {})
        assert s["labelled"] == c.numel() and 0 < share < 1
        assert s["token_alignment"] == s["top1_agreement"] == pytest.approx(float(share))
    png = figure1.draw(results[0], tmp_path / "fig.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_inspect_command_on_demo_checkpoints_and_mm_projector(tmp_path, capsys):
    from sea_model.commands import cli, demo

    threads = torch.get_num_threads()
    try:
        demo.run(tmp_path / "demo", quick=True, progress=False, backend="reference")
    finally:
        torch.set_num_threads(threads)
    image = str(tmp_path / "demo" / "data" / "question.png")
    summaries = {}
    for stage in ("stage1", "stage2"):
        out = tmp_path / f"inspect-{stage}"
        assert (
            cli.main(
                [
                    "inspect",
                    "--checkpoint",
                    str(tmp_path / "demo" / stage),
                    "--image",
                    image,
                    "--out",
                    str(out),
                    "--all_tokens",
                ]
            )
            == 0
        )
        assert "token alignment" in capsys.readouterr().out
        s = json.loads((out / "summary.json").read_text())
        assert s["source"]["stage"] == int(stage[-1]) and s["patches"] == 16
        assert (out / "question.png").read_bytes()[:4] == b"\x89PNG" and "| **all** |" in (
            out / "summary.md"
        ).read_text()
        summaries[stage] = s
    # the stage-1 adapter as a LLaVA mm_projector.bin, with the run's config: the same picture
    out = tmp_path / "inspect-projector"
    args = [
        "inspect",
        "--mm_projector",
        str(tmp_path / "demo" / "stage1" / "mm_projector.bin"),
        "--config",
        str(tmp_path / "demo" / "stage1" / "run_config.yaml"),
        "--image",
        image,
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    mine = [(p["nearest"], p["labels"]) for p in s["images"][0]["per_patch"]]
    theirs = [(p["nearest"], p["labels"]) for p in summaries["stage1"]["images"][0]["per_patch"]]
    assert mine == theirs and s["token_alignment"] == summaries["stage1"]["token_alignment"]
    # stage 2 moved the adapter and the LLM: a different picture
    assert [p["nearest"] for p in summaries["stage2"]["images"][0]["per_patch"]] != [m[0] for m in mine]


def test_inspect_user_errors_are_one_line(tmp_path, capsys):
    from sea_model.commands import cli

    assert cli.main(["inspect", "--checkpoint", str(tmp_path / "nope"), "--image", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sea inspect: error:") and len(err.strip().splitlines()) == 1
    assert cli.main(["inspect", "--image", "x.png"]) == 2
    assert "--checkpoint DIR or --mm_projector" in capsys.readouterr().err
