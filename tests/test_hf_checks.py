"""LlavaSEA's construction checks: each mistake is one ``ValueError`` line naming it, at
construction rather than as a silent zero loss or an obscure error at step 1."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from sea_model import tiny_models as shipped  # noqa: E402
from sea_model.hf import LlavaSEA  # noqa: E402
from tests import tiny  # noqa: E402

WORDS = tiny.WORDS[:24]
OPTIONS = dict(backend="reference", cache_dir=False, progress=False)


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


@pytest.fixture
def models(tok):
    torch.manual_seed(0)
    clip = shipped.tiny_hf_clip("clip")
    return clip, shipped.tiny_hf_llava(clip, tok).train()


@pytest.mark.parametrize(
    "field, kw", [("image_size", dict(image_size=16)), ("patch_size", dict(patch_size=4)), ("hidden_size", None)]
)
def test_clip_of_another_checkpoint_is_refused(tok, models, field, kw):
    _, llava = models
    other = shipped.tiny_hf_clip("clip", **(kw or {}))
    if kw is None:
        other.config.vision_config.hidden_size = 64  # a wider tower of the same grid
    with pytest.raises(ValueError, match=f"clip: its vision {field} is .*Llava's vision tower's is"):
        LlavaSEA(llava, other, tok, tok, WORDS, **OPTIONS)


def test_tokenizer_without_the_words_is_refused(tok, models):
    clip, llava = models
    foreign = shipped.word_tokenizer(["x", "y"])  # every SEA word is <unk> to it
    with pytest.raises(ValueError, match=r"words: 24 of 24 words are only <unk> to Llava's tokenizer"):
        LlavaSEA(llava, clip, tok, foreign, WORDS, **OPTIONS)


class _NoTokensFor:
    """Llava's tokenizer, except that it gives no token for the words in ``ghosts``."""

    def __init__(self, tokenizer, ghosts):
        self.tokenizer, self.ghosts = tokenizer, set(ghosts)
        self.unk_token_id = tokenizer.unk_token_id

    def __call__(self, text, **kw):
        out = dict(self.tokenizer(text, **kw))
        if isinstance(text, list):
            out["input_ids"] = [[] if t.strip() in self.ghosts else ids for t, ids in zip(text, out["input_ids"])]
        return out


def test_words_without_tokens_are_dropped_with_a_count(tok, models):
    clip, llava = models
    with pytest.warns(UserWarning, match=r"words: 2 of 24 words give no LLM token and are dropped"):
        sea = LlavaSEA(llava, clip, tok, _NoTokensFor(tok, WORDS[:2]), WORDS, **OPTIONS)
    assert sea.words == WORDS[2:] and sea.vocab_features.shape[0] == 22


def test_empty_word_list_is_refused(tok, models):
    clip, llava = models
    with pytest.raises(ValueError, match="words: the word list is empty"):
        LlavaSEA(llava, clip, tok, tok, [], **OPTIONS)


@pytest.mark.parametrize("words, top_n", [(WORDS[:1], None), (WORDS[:3], 5)])
def test_top_n_beyond_the_vocabulary_is_refused(tok, models, words, top_n):
    clip, llava = models
    extra = {} if top_n is None else {"top_n": top_n}  # None: the default top_n (10) with one word
    with pytest.raises(ValueError, match=rf"top_n=\d+ is more than the {len(words)} words"):
        LlavaSEA(llava, clip, tok, tok, words, **OPTIONS, **extra)


def _hook_count(llava) -> int:
    modules = (llava.model, llava.model.vision_tower, llava.model.multi_modal_projector)
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


def test_one_llava_sea_per_model_until_removed(tok, models):
    clip, llava = models
    hooks = _hook_count(llava)
    sea = LlavaSEA(llava, clip, tok, tok, WORDS, **OPTIONS)
    assert _hook_count(llava) == hooks + 3
    with pytest.raises(ValueError, match=r"already has a LlavaSEA attached: call \.remove\(\)"):
        LlavaSEA(llava, clip, tok, tok, WORDS, **OPTIONS)
    sea.remove()
    assert _hook_count(llava) == hooks
    again = LlavaSEA(llava, clip, tok, tok, WORDS, **OPTIONS)
    assert _hook_count(llava) == hooks + 3
    batch = shipped.collate_padded(shipped.llava_caption_samples(tok, llava, WORDS, 2))
    llava(**batch)
    assert again.align().pairs > 0
