"""SEAModel: image-token replacement, L_gen against the LM's own loss, SEA on/off, freezing, generation."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from sea_kernels import SEAAlignmentLoss  # noqa: E402
from sea_model import model as M  # noqa: E402
from sea_model.config import ModelConfig, SEAConfig, VisionConfig  # noqa: E402
from sea_model.data import Collator, LlavaDataset  # noqa: E402
from sea_model.model import SEAModel, answer, build_adapter, build_model  # noqa: E402
from sea_model.prompts import IGNORE_INDEX  # noqa: E402
from tests import tiny  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("m")
    tok = tiny.tiny_tokenizer()
    config = tiny.tiny_model_config(tok, cache_dir=tmp / "cache", backend="reference")  # no C++ build in tests
    model, tok = build_model(config, tok, progress=False)
    return model, tok, tmp


@pytest.fixture(scope="module")
def batch(built):
    model, tok, tmp = built
    names = tiny.make_images(tmp / "images", 3)
    entries = tiny.finetune_entries(names)  # 3 with images + 1 text-only
    path = tiny.write_json(tmp / "ft.json", entries)
    ds = LlavaDataset(
        path, tmp / "images", tok, model.tower.image_processor(), num_image_tokens=model.tower.num_patches
    )
    return Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])


def test_adapters():
    a = build_adapter("mlp2x_gelu", 8, 16)
    assert [type(m) for m in a] == [nn.Linear, nn.GELU, nn.Linear]
    assert (a[0].in_features, a[0].out_features, a[2].in_features, a[2].out_features) == (8, 16, 16, 16)
    assert len(build_adapter("mlp3x_gelu", 8, 16)) == 5 and isinstance(build_adapter("linear", 8, 16), nn.Linear)
    for bad in ("mlp0x_gelu", "mlp2x_relu", "conv"):
        with pytest.raises(ValueError, match="adapter"):
            build_adapter(bad, 8, 16)


def test_build_model(built):
    model, tok, _ = built
    assert model.vocab_features.shape == (64, model.tower.feature_dim)
    assert model.vocab_features.dtype == next(model.tower.parameters()).dtype  # the tower's compute dtype
    assert model.word_token_ids.shape[0] == 64 and model.sea is not None
    assert model.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert "vocab_features" not in model.state_dict()  # rebuilt from the cache, not saved
    assert ModelConfig.from_json(model.model_config.to_json()) == model.model_config


def test_l_gen_is_the_lm_loss_without_images(built):
    model, tok, _ = built
    texts = ["the cat is red.", "a dog runs on the green grass in the park"]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, IGNORE_INDEX)
    out = model(enc.input_ids, attention_mask=enc.attention_mask, labels=labels)
    ref = model.llm(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
    torch.testing.assert_close(out.loss_gen, ref)
    assert out.pairs == 0 and out.loss_align.item() == 0.0
    torch.testing.assert_close(out.loss, ref)


def test_visual_tokens_replace_the_image_placeholders(built, batch):
    model, _, _ = built
    embeds, is_img, visual, tower_out = model.embed(batch["input_ids"], batch["pixel_values"], batch["has_image"])
    P = model.tower.num_patches
    assert is_img.sum(1).tolist() == [P, P, P, 0]
    with torch.no_grad():
        expected_visual = model.adapter(model.tower(batch["pixel_values"]).hidden)
        table = model.llm.get_input_embeddings()
        plain = table(batch["input_ids"].masked_fill(is_img, 0))
    torch.testing.assert_close(visual, expected_visual)
    for b in range(3):
        torch.testing.assert_close(embeds[b][is_img[b]], expected_visual[b])
    torch.testing.assert_close(embeds[~is_img], plain[~is_img])
    # L_gen = the LM's loss on those embeddings with image positions unsupervised
    out = model(**batch)
    labels = batch["labels"].masked_fill(is_img, IGNORE_INDEX)
    ref = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels).loss
    torch.testing.assert_close(out.loss_gen, ref)
    # labels given unmasked at image positions are masked by the model
    raw = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    torch.testing.assert_close(
        model(**{**batch, "labels": raw}).loss_gen,
        model.llm(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=raw.masked_fill(is_img, IGNORE_INDEX)
        ).loss,
    )


def test_sea_on_off_changes_only_l_align(built, batch):
    on, _, _ = built
    off = SEAModel(on.tower, on.llm, image_token_id=on.image_token_id, sea=None)
    off.adapter.load_state_dict(on.adapter.state_dict())
    out_on = on(**batch, generator=torch.Generator().manual_seed(0))
    out_off = off(**batch)
    torch.testing.assert_close(out_on.loss_gen, out_off.loss_gen)
    torch.testing.assert_close(out_off.loss, out_off.loss_gen)
    assert out_off.loss_align is None and out_off.pairs == 0 and out_off.temperature is None
    assert out_on.pairs > 0 and out_on.loss_align > 0 and out_on.temperature == pytest.approx(1.0)
    torch.testing.assert_close(out_on.loss, out_on.loss_gen + out_on.loss_align)
    weighted = copy.copy(on)
    weighted.sea_config = SEAConfig(**{**vars(on.sea_config), "weight": 0.25})
    out_w = weighted(**batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out_w.loss, out_w.loss_gen + 0.25 * out_w.loss_align)


def test_l_align_uses_this_forwards_visual_tokens_and_patch_features(built, batch):
    model, _, _ = built
    out = model(**batch, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tower_out = model.tower(batch["pixel_values"])
        visual = model.adapter(tower_out.hidden)
    sea = SEAAlignmentLoss(top_n=3, backend="reference")
    ref = sea(
        visual,
        tower_out.patch_features,
        model.vocab_features,
        model.word_token_ids,
        model.llm.get_input_embeddings().weight,
        grid=model.tower.grid,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(out.loss_align, ref.loss)
    assert out.pairs == ref.pairs and torch.equal(out.align.labels.label, ref.labels.label)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (a device sync on GPUs)."""

    READS = ("_local_scalar_dense", "equal", "nonzero", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.READS
        return func(*args, **(kwargs or {}))


def test_sea_adds_one_host_read_to_the_forward_and_none_to_the_step(built, batch):
    """With SEA on, the forward reads the device once more than with SEA off (the finiteness check of
    the patch features, on CPU only); pairs and tau stay tensors, read by ``train_step`` with the
    other sums, once per step whatever the number of micro-batches."""
    from sea_model.training import step as trainer

    on, _, _ = built
    off = SEAModel(on.tower, on.llm, image_token_id=on.image_token_id, sea=None)
    on(**batch)  # the vocabulary is checked once per version: not in the calls counted below
    reads = {}
    for name, model in (("on", on), ("off", off)):
        with _HostReads() as mode:
            out = model(**batch, generator=torch.Generator().manual_seed(0))
        reads[name] = mode.count
        assert isinstance(out.pair_count, torch.Tensor) == (name == "on")
    assert reads["on"] - reads["off"] == 1
    assert (out.pairs, out.temperature) == (0, None)

    def step_reads(model, accum):
        params = [p for p in model.adapter.parameters()]
        g = torch.Generator().manual_seed(5)
        state = trainer.StepState(model=model, optimizer=torch.optim.SGD(params, lr=0.0), params=params, generator=g)
        with _HostReads() as mode:
            result = trainer.train_step(state, iter([batch] * accum), accum=accum)
        return mode.count, result

    (on1, r1), (on2, r2), (off1, _) = step_reads(on, 1), step_reads(on, 2), step_reads(off, 1)
    assert on1 - off1 == 1 and on2 - on1 == reads["on"]  # one more micro-batch: only its forward's reads
    g = torch.Generator().manual_seed(5)
    assert r2["pairs"] == sum(on(**batch, generator=g).pairs for _ in range(2)) > r1["pairs"] > 0
    assert r2["tau"] == pytest.approx(1.0) and r2["pairs_local"] == r2["pairs"]


def test_freezing_and_gradients(built, batch):
    model, _, _ = built
    stage1 = model.freeze_for_stage(1)
    assert sorted(stage1) == sorted(
        [n for n, _ in model.adapter.named_parameters(prefix="adapter")] + ["sea.log_scale"]
    )
    model.zero_grad(set_to_none=True)
    model(**batch, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.parameters())
    assert model.sea.log_scale.grad is not None
    assert all(p.grad is None for p in model.llm.parameters()) and all(p.grad is None for p in model.tower.parameters())
    stage2 = model.freeze_for_stage(2)
    assert set(stage1) < set(stage2) and any(n.startswith("llm.") for n in stage2)
    assert not any(n.startswith("tower.") for n in stage2)
    model.zero_grad(set_to_none=True)
    model.freeze_for_stage(1)


def test_placeholder_count_must_match_the_tower(built, batch):
    model, _, _ = built
    ids = batch["input_ids"].clone()
    first = (ids[0] == model.image_token_id).nonzero()[0, 0]
    ids[0, first] = 5
    with pytest.raises(ValueError, match="sample 0 has 15 <image> tokens; expected 0 or 16"):
        model(ids, batch["attention_mask"], batch["labels"], batch["pixel_values"])
    with pytest.raises(ValueError, match="pixel_values has 2 images for 3 samples"):
        model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"][:2])


def test_generate_without_image_is_the_lm_greedy_decode(built):
    model, tok, _ = built
    ids = tok(["the cat is"], return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=6, eos_token_id=-1)
    ref = model.llm.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    assert new.tolist() == ref[:, ids.shape[1] :].tolist()


def test_answer_about_an_image(built):
    from PIL import Image

    model, tok, _ = built
    text = answer(model, tok, "what color is it?", Image.new("RGB", (40, 30), (200, 10, 10)), max_new_tokens=4)
    assert isinstance(text, str)


def test_default_attn_implementation(monkeypatch):
    assert M.default_attn_implementation(torch.float32) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert M.default_attn_implementation(torch.bfloat16) == "flash_attention_2"
    assert M.default_attn_implementation(torch.float32) == "sdpa"
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    assert M.default_attn_implementation(torch.float16) == "sdpa"


def test_sea_needs_a_vocabulary(built):
    model, _, _ = built
    with pytest.raises(ValueError, match="vocab_features"):
        SEAModel(model.tower, model.llm, image_token_id=model.image_token_id, sea=SEAConfig())
    with pytest.raises(ValueError, match="vocab_features must be"):
        model.set_vocabulary(torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long))


def test_config_round_trip():
    cfg = ModelConfig(
        vision=VisionConfig(name="ViT-B-16", pretrained="/x.pt"), llm={"model_type": "llama"}, sea=SEAConfig(weight=0.5)
    )
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
