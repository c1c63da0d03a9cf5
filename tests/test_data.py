"""LLaVA datasets: templates and masking token by token, truncation, bad images, bad JSON, collation."""

import json
import logging

import pytest
import torch

from sea_model.data import Collator, LlavaDataset, check_data
from sea_model.prompts import IGNORE_INDEX, VICUNA_SYSTEM, add_image_token, prompt_ids
from tests import tiny

P = 4  # visual tokens per image in these tests


def fake_processor(image):
    """Stands in for the tower's preprocessing: a tensor that identifies the image."""
    return torch.full((3, 8, 8), float(image.size[0] + image.size[1]))


def expect(tok, *parts):
    """Expected (input_ids, labels) from (text | token list, supervised) parts, each tokenised on
    its own. With the word-level tokenizer, separate and joint tokenisation agree, so this is an
    independent statement of what the dataset must produce."""
    ids, labels = [], []
    image = tok.convert_tokens_to_ids("<image>")
    for part, supervised in parts:
        if isinstance(part, str):
            part = tok(part, add_special_tokens=False)["input_ids"]
        part = [t for p in part for t in ([p] * P if p == image else [p])]
        ids += part
        labels += part if supervised else [IGNORE_INDEX] * len(part)
    return ids, labels


def conversation(with_image=True):
    conv = [
        {"from": "human", "value": "what color is the cat?\n<image>" if with_image else "what color is the cat?"},
        {"from": "gpt", "value": "it is red."},
        {"from": "human", "value": "what color is the sky?"},
        {"from": "gpt", "value": "it is blue."},
    ]
    return (
        {"id": "c0", "image": "img0.png", "conversations": conv} if with_image else {"id": "t0", "conversations": conv}
    )


@pytest.fixture
def folder(tmp_path):
    tiny.make_images(tmp_path / "images", 3, corrupt=1)
    return tmp_path


def dataset(folder, entries, tok, **kw):
    path = tiny.write_json(folder / "data.json", entries)
    kw.setdefault("max_length", 512)
    return LlavaDataset(path, folder / "images", tok, fake_processor, num_image_tokens=P, **kw)


def item_lists(item):
    return item["input_ids"].tolist(), item["labels"].tolist()


def test_plain_template_token_by_token(folder):
    tok = tiny.tiny_word_tokenizer()
    entry = tiny.pretrain_entries(["img0.png"])[0]
    entry["conversations"][1]["value"] = "red cat on the grass"
    item = dataset(folder, [entry], tok, template="plain")[0]
    image = tok.convert_tokens_to_ids("<image>")
    # <s> <image>xP | red cat on the grass \n  (the human prompt is dropped; caption + newline supervised)
    want = expect(tok, ([tok.bos_token_id, image], False), ("red cat on the grass\n", True))
    assert item_lists(item) == want
    assert item["has_image"] and item["pixel_values"].shape == (3, 8, 8)


def test_vicuna_template_token_by_token(folder):
    tok = tiny.tiny_word_tokenizer()  # no chat template -> Vicuna v1
    item = dataset(folder, [conversation()], tok, template="auto")[0]
    image = tok.convert_tokens_to_ids("<image>")
    want = expect(
        tok,
        ([tok.bos_token_id], False),
        (VICUNA_SYSTEM + " USER:", False),
        ([image], False),  # <image> moved to the front of its turn
        ("\nwhat color is the cat? ASSISTANT:", False),
        ("it is red.</s>", True),
        ("USER: what color is the sky? ASSISTANT:", False),
        ("it is blue.</s>", True),
    )
    assert item_lists(item) == want


def test_chat_template_token_by_token(folder):
    tok = tiny.tiny_word_tokenizer(chat_template=True)
    item = dataset(folder, [conversation()], tok, template="auto")[0]
    image = tok.convert_tokens_to_ids("<image>")
    want = expect(
        tok,
        ("<|im_start|>user\n", False),
        ([image], False),
        ("\nwhat color is the cat?<|im_end|>\n<|im_start|>assistant\n", False),
        ("it is red.<|im_end|>\n", True),
        ("<|im_start|>user\nwhat color is the sky?<|im_end|>\n<|im_start|>assistant\n", False),
        ("it is blue.<|im_end|>\n", True),
    )
    assert item_lists(item) == want


@pytest.mark.parametrize("chat", [False, True])
def test_bpe_tokenizer_supervises_exactly_the_answers(folder, chat):
    """With a byte-level BPE tokenizer, the supervised runs decode to the answers (+ end of turn)."""
    tok = tiny.tiny_tokenizer(chat_template=chat)
    ids, labels = item_lists(dataset(folder, [conversation()], tok)[0])
    runs, cur = [], []
    for t, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    end = "<|im_end|>\n" if chat else "</s>"
    assert [tok.decode(r).strip(" ") for r in runs] == ["it is red." + end, "it is blue." + end]
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == P


def test_text_only_entry(folder):
    tok = tiny.tiny_word_tokenizer()
    item = dataset(folder, [conversation(with_image=False)], tok)[0]
    assert not item["has_image"] and item["pixel_values"] is None
    assert tok.convert_tokens_to_ids("<image>") not in item["input_ids"].tolist()


def test_truncation(folder):
    tok = tiny.tiny_word_tokenizer()
    full = dataset(folder, [conversation()], tok)[0]
    short = dataset(folder, [conversation()], tok, max_length=P + 40)[0]
    n = P + 40
    assert item_lists(short) == (full["input_ids"][:n].tolist(), full["labels"][:n].tolist())
    # a cut through the image block drops the block: the sample becomes text-only
    image = tok.convert_tokens_to_ids("<image>")
    start = full["input_ids"].tolist().index(image)
    cut = dataset(folder, [conversation()], tok, max_length=start + 2)[0]
    assert cut["input_ids"].tolist() == full["input_ids"][:start].tolist()
    assert not cut["has_image"] and cut["pixel_values"] is None


def test_missing_and_corrupt_images_are_skipped_and_counted(folder, caplog):
    tok = tiny.tiny_word_tokenizer()
    entries = tiny.pretrain_entries(["img0.png", "bad0.png", "gone.png", "img1.png"])
    ds = dataset(folder, entries, tok, template="plain")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=Collator(tok.pad_token_id))
    with caplog.at_level(logging.DEBUG, logger="sea_model.data"):
        batches = list(loader)
    assert [b["ids"] for b in batches] == [["pt0", "pt3"], ["pt3", "pt3"]]  # replaced by the next good entry
    assert ds.skipped == {"corrupt": 1, "missing": 1}
    assert [b["skipped"] for b in batches] == [2, 0]  # each bad entry found (and counted) once
    assert batches[0]["skipped_examples"] == ["bad0.png (corrupt)", "gone.png (missing)"]
    assert all(b["pixel_values"].shape == (2, 3, 8, 8) for b in batches)
    assert "corrupt image bad0.png" in caplog.text and "missing image gone.png" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the trainer reports them, aggregated


def test_no_loadable_image_at_all_is_a_clear_error(folder):
    tok = tiny.tiny_word_tokenizer()
    ds = dataset(folder, tiny.pretrain_entries(["gone.png"]), tok, template="plain")
    with pytest.raises(RuntimeError, match="no entry has a loadable image"):
        ds[0]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e[1].pop("conversations"), "entry 1 \\(id='ft1'\\): 'conversations'"),
        (lambda e: e[2]["conversations"][1].update({"from": "robot"}), "entry 2 \\(id='ft2'\\): turn 1"),
        (lambda e: e[0]["conversations"].pop(), None),  # still valid: ends after a gpt turn
        (lambda e: e[1]["conversations"].insert(1, {"from": "human", "value": "x"}), "entry 1 .*alternate"),
        (lambda e: e[3].pop("image"), "entry 3 .*no 'image' key"),
        (lambda e: e[0].update({"image": 7}), "entry 0 .*'image'"),
        (lambda e: e[4]["conversations"][0].update({"value": "<image> <image>"}), "entry 4 .*one image per entry"),
        (lambda e: e.__setitem__(1, "nope"), "entry 1 .*expected an object"),
    ],
)
def test_malformed_entries_name_file_and_entry(folder, mutate, message):
    tok = tiny.tiny_word_tokenizer()
    entries = tiny.finetune_entries(["img0.png", "img1.png", "img2.png", "img0.png"])
    mutate(entries)
    if message is None:
        dataset(folder, entries, tok)
        return
    with pytest.raises(ValueError, match="data.json: " + message):
        dataset(folder, entries, tok)


def test_plain_template_needs_two_turns(folder):
    tok = tiny.tiny_word_tokenizer()
    with pytest.raises(ValueError, match="entry 0 .*plain"):
        dataset(folder, tiny.finetune_entries(["img0.png"]), tok, template="plain")


def test_invalid_json_names_the_file(folder):
    path = folder / "broken.json"
    path.write_text('[{"id": 1,')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        LlavaDataset(path, folder, tiny.tiny_word_tokenizer(), fake_processor, num_image_tokens=P)
    path.write_text(json.dumps({"id": 1}))
    with pytest.raises(ValueError, match="broken.json: expected a JSON list"):
        LlavaDataset(path, folder, tiny.tiny_word_tokenizer(), fake_processor, num_image_tokens=P)


def test_check_data_names_bad_files_and_folders_before_any_model(folder, caplog):
    images, tmp_path = folder / "images", folder
    entries = tiny.pretrain_entries(["img0.png", "img1.png", "gone.png", "bad0.png"])
    path = tiny.write_json(tmp_path / "pt.json", entries)
    assert check_data(path, images, "plain") == entries
    assert "2 of 4 sampled images under" in caplog.text and "gone.png (missing)" in caplog.text
    with pytest.raises(ValueError, match="data.image_folder .*nowhere: no such folder \\(4 entries of pt.json"):
        check_data(path, tmp_path / "nowhere", "plain")
    with pytest.raises(ValueError, match="none of 4 sampled images under .* can be read .*is data.image_folder right"):
        check_data(path, tmp_path, "plain")
    with pytest.raises(ValueError, match="entries have images: data.image_folder is required"):
        check_data(path, None, "plain")
    with pytest.raises(ValueError, match="missing.json: no such file"):
        check_data(tmp_path / "missing.json", images, "plain")
    (tmp_path / "latin1.json").write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json: not UTF-8 text \\(byte 0xe9 at offset 12\\)"):
        check_data(tmp_path / "latin1.json", images, "plain")
    with pytest.raises(ValueError, match="pt.json: entry 0 .*plain"):
        check_data(tiny.write_json(tmp_path / "pt.json", tiny.finetune_entries(["img0.png"])), images, "plain")


def test_collator_pads_and_stacks(folder):
    tok = tiny.tiny_word_tokenizer()
    ds = dataset(folder, [conversation(), conversation(with_image=False), tiny.finetune_entries(["img1.png"])[0]], tok)
    items = [ds[0], ds[1], ds[2]]
    batch = Collator(tok.pad_token_id)(items + [None])
    T = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    assert batch["has_image"].tolist() == [True, False, True]
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    torch.testing.assert_close(batch["pixel_values"][1], items[2]["pixel_values"])
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == it["input_ids"].tolist()
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)


def test_generation_prompts():
    tok = tiny.tiny_word_tokenizer()
    image = add_image_token(tok)
    ids = prompt_ids("what color is it?", tok, template="vicuna_v1", image_token_id=image, num_image_tokens=P)
    want, _ = expect(
        tok,
        ([tok.bos_token_id], False),
        (VICUNA_SYSTEM + " USER:", False),
        ([image], False),
        ("\nwhat color is it? ASSISTANT:", False),
    )
    assert ids == want
    ids = prompt_ids("ignored", tok, template="plain", image_token_id=image, num_image_tokens=P)
    assert ids == [tok.bos_token_id] + [image] * P
