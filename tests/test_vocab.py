"""The vocabulary: word lists, cached CLIP text features, LLM token ids."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

from sea_model import tiny_models as shipped  # noqa: E402
from sea_model.vision import load_clip  # noqa: E402
from sea_model.vocab import (  # noqa: E402
    DEFAULT_SIZE,
    build_vocabulary,
    load_words,
    read_words,
    text_features,
    word_token_ids,
    wordfreq_words,
)
from tests import tiny  # noqa: E402

WORDS3 = ["cat", "red dog", "a tree"]
TWO_OF_12 = Path("/work/shared/data/2of12.txt")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(tiny.tiny_vision_config())


@pytest.mark.skipif(not TWO_OF_12.is_file(), reason=f"{TWO_OF_12} not present")
def test_2of12_list():
    wl = read_words(TWO_OF_12)
    assert len(wl) == 41_241
    assert wl.duplicates == ["bout"] and wl.blank_lines == 0
    assert wl.words[:3] == ["a", "aardvark", "abaci"] and wl.words[-1] == "zymurgy"
    assert not any(w != w.strip() for w in wl.words)  # no CR left
    assert "41241 words" in wl.report() and "bout" in wl.report()


def test_word_file_crlf_blanks_duplicates(tmp_path):
    f = tmp_path / "w.txt"
    f.write_bytes(b"dog\r\ncat\r\n\r\ndog\r\n  bird \r\ncat\r\n")
    wl = read_words(f)
    assert wl.words == ["dog", "cat", "bird"]
    assert wl.duplicates == ["dog", "cat"] and wl.blank_lines == 1


def test_missing_or_empty_word_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_words(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no words"):
        read_words(tmp_path / "empty.txt")


def test_wordfreq_default_list():
    wl = wordfreq_words()
    assert len(wl) == DEFAULT_SIZE == 41_242
    assert len(set(wl.words)) == len(wl.words)
    assert all(w.isalpha() and w.islower() and w.isascii() for w in wl.words)
    assert wordfreq_words(100).words == wl.words[:100]  # most frequent first, same order
    assert "the" in wl.words[:5]
    assert load_words(None, size=10).words == wl.words[:10]


def test_text_features_computed_in_batches_and_cached(clip, tmp_path):
    words = tiny.WORDS[:10]
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return clip.encode_text(texts)

    first = text_features(words, encode, model_key=clip.key(), batch_size=4, cache_dir=tmp_path, progress=False)
    assert [len(c) for c in calls] == [4, 4, 2] and calls[0][0] == "cat"  # bare word template
    assert first.shape == (10, 16) and first.dtype == torch.float32
    torch.testing.assert_close(first, clip.encode_text(words))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_encoder(texts):
        raise AssertionError("the text encoder ran although the features are cached")

    second = text_features(words, no_encoder, model_key=clip.key(), batch_size=4, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(second, first)

    # another template, word list or model is another cache entry
    calls.clear()
    text_features(words, encode, model_key=clip.key(), template="a photo of a {}.", cache_dir=tmp_path, progress=False)
    assert calls and calls[0][0] == "a photo of a cat."
    text_features(words[:5], encode, model_key=clip.key(), cache_dir=tmp_path, progress=False)
    text_features(words, encode, model_key=clip.key() + "x", cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_template_must_have_a_slot(clip, tmp_path):
    with pytest.raises(ValueError, match="template"):
        text_features(["cat"], clip.encode_text, model_key="k", template="a photo", cache_dir=tmp_path)


def test_random_weights_are_keyed_by_their_values(clip):
    torch.manual_seed(1)
    other = load_clip(tiny.tiny_vision_config())
    assert other.key() != clip.key()
    assert clip.key() == clip.key()


def test_word_token_ids_mid_sentence_bpe():
    tok = tiny.tiny_tokenizer()
    words = ["cat", "window", "zebra"]
    ids = word_token_ids(words, tok)
    assert ids.dtype == torch.int64 and ids.shape[0] == 3
    for w, row in zip(words, ids):
        row = row[row >= 0].tolist()
        assert row and tok.decode(row) == " " + w  # the word as it follows a space
        assert tok(f"a {w}", add_special_tokens=False)["input_ids"][1:] == row
    assert (ids[0] == -1).any() and (ids[2] >= 0).sum() > 1  # padding with -1; a multi-token word
    assert (ids[:, 0] >= 0).all()


def test_word_token_ids_mid_sentence_sentencepiece_style():
    """A Metaspace (SentencePiece-style) tokenizer: the mid-sentence form carries the '▁' marker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁a": 1, "▁cat": 2, "cat": 3, "▁": 4, "a": 5, "▁do": 6, "g": 7}
    t = Tokenizer(
        models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="", max_input_chars_per_word=100)
    )
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    t.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")
    ids = word_token_ids(["cat", "dog"], tok)
    assert tok.convert_ids_to_tokens(ids[0][ids[0] >= 0].tolist()) == ["▁cat"]
    assert tok.convert_ids_to_tokens(ids[1][ids[1] >= 0].tolist()) == ["▁do", "g"]


def test_build_vocabulary(clip, tmp_path):
    tok = tiny.tiny_tokenizer()
    vocab = build_vocabulary(clip, tok, tiny.WORDS, cache_dir=tmp_path, progress=False)
    assert vocab.words == tiny.WORDS and len(vocab) == len(tiny.WORDS)
    assert vocab.features.shape == (len(tiny.WORDS), 16)
    assert vocab.token_ids.shape[0] == len(tiny.WORDS)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_build_vocabulary_from_hf_text_tower(family, tmp_path, monkeypatch):
    """A Hugging Face CLIP/SigLIP text tower: get_text_features of each word, cached like open_clip's."""
    from sea_model.vision import ClipBundle, hf_text_features

    torch.manual_seed(0)
    tok = tiny.tiny_tokenizer()
    bundle = ClipBundle.from_hf(shipped.tiny_hf_clip(family), tok)
    words = tiny.WORDS[:7]
    vocab = build_vocabulary(bundle, tok, words, cache_dir=tmp_path, progress=False, batch_size=3)
    with torch.no_grad():
        expected = hf_text_features(bundle.model, tok, words)
    assert vocab.features.shape == (7, 16 if family == "clip" else 32)
    torch.testing.assert_close(vocab.features, expected)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    monkeypatch.setattr(bundle.model, "get_text_features", lambda **_: pytest.fail("cache was not used"))
    again = build_vocabulary(bundle, tok, words, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(again.features, vocab.features)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_text_tower_alone_gives_the_joint_space_features(family):
    """CLIPTextModelWithProjection / SiglipTextModel with the weights of the whole model's text side."""
    from transformers import CLIPTextModelWithProjection, SiglipTextModel

    from sea_model.vision import hf_text_features

    torch.manual_seed(0)
    tok = tiny.tiny_tokenizer()
    whole = shipped.tiny_hf_clip(family)
    if family == "clip":
        config = whole.config.text_config.to_dict() | {"projection_dim": 16}
        text = CLIPTextModelWithProjection(type(whole.config.text_config)(**config))
        text.text_model.load_state_dict(whole.text_model.state_dict())
        text.text_projection.load_state_dict(whole.text_projection.state_dict())
    else:  # transformers 5: SiglipTextModel is the text transformer itself
        text = SiglipTextModel(whole.config.text_config)
        text.load_state_dict(whole.text_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(hf_text_features(text.eval(), tok, WORDS3), hf_text_features(whole, tok, WORDS3))
