"""The SEA vocabulary: a word list, its CLIP text features and its LLM token ids.

* Words: by default the most frequent lower-case alphabetic English words of the installed
  ``wordfreq`` list (41,242 of them, the size of the paper's list), or a user file with one word
  per line such as the paper's 2of12 list (CR/LF endings stripped, blank lines and duplicates
  skipped, order kept; what was dropped is reported on the returned :class:`WordList`).
* Text features ``(q, d)``: the CLIP text tower's ``encode_text`` of ``template.format(word)``
  (default the bare word), computed in batches with a progress bar and cached on disk as
  safetensors under a key hashing the model, its weights, the word list and the template; a
  second call with the same inputs reads the file and does not run the text tower.
* Token ids ``(q, L)``: each word's LLM tokens as the word appears mid-sentence, padded with -1
  (the layout ``sea_kernels.word_embeddings`` expects). Method: tokenize ``"a"`` and
  ``"a " + word`` without special tokens and keep the tokens after those of ``"a"``; this is
  right for SentencePiece (``▁word``), GPT-2-style byte-level BPE (``Ġword``) and tiktoken-style
  BPE (``" word"``). When a tokenizer merges across that boundary, the fallback is the tokens of
  ``" " + word`` with a lone leading space token dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_SIZE = 41_242  # the paper's word count
DEFAULT_TEMPLATE = "{}"
PAD_ID = -1


@dataclass
class WordList:
    """Words in order, where they came from, and what the loader dropped."""

    words: list[str]
    source: str
    duplicates: list[str] = field(default_factory=list)  # dropped repeats, in file order
    blank_lines: int = 0

    def __len__(self) -> int:
        return len(self.words)

    def report(self) -> str:
        return (
            f"{len(self.words)} words from {self.source}; dropped {len(self.duplicates)} duplicate(s)"
            + (
                f" ({', '.join(self.duplicates[:5])}{', ...' if len(self.duplicates) > 5 else ''})"
                if self.duplicates
                else ""
            )
            + f" and {self.blank_lines} blank line(s)"
        )


def wordfreq_words(size: int = DEFAULT_SIZE, lang: str = "en") -> WordList:
    """The ``size`` most frequent lower-case alphabetic (ASCII) words of wordfreq's ``lang`` list."""
    import wordfreq

    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int; got {size!r}")
    words = []
    for w in wordfreq.iter_wordlist(lang, wordlist="best"):
        if w.isascii() and w.isalpha() and w.islower():
            words.append(w)
            if len(words) == size:
                break
    if len(words) < size:
        raise ValueError(
            f"size: wordfreq's {lang!r} list has only {len(words)} lower-case alphabetic words; asked for {size}"
        )
    return WordList(words, f"wordfreq:{lang}:{size}")


def read_words(path: str | os.PathLike) -> WordList:
    """One word per line; strips whitespace (including CR), skips blanks and duplicates, keeps order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word list file not found: {path}")
    words, seen, dups, blanks = [], set(), [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            w = line.strip()
            if not w:
                blanks += 1
            elif w in seen:
                dups.append(w)
            else:
                seen.add(w)
                words.append(w)
    if not words:
        raise ValueError(f"word list file {path} has no words")
    wl = WordList(words, str(path), dups, blanks)
    if dups or blanks:
        log.info("word list: %s", wl.report())
    return wl


def load_words(
    source: str | os.PathLike | Sequence[str] | WordList | None = None, *, size: int = DEFAULT_SIZE
) -> WordList:
    """``None`` -> :func:`wordfreq_words` (``size``); a path -> :func:`read_words`; a list -> as is
    (duplicates dropped)."""
    if source is None:
        return wordfreq_words(size)
    if isinstance(source, WordList):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_words(source)
    words, seen, dups = [], set(), []
    for w in source:
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"words must be non-empty strings; got {w!r}")
        (dups if w in seen else words).append(w)
        seen.add(w)
    return WordList(words, "list", dups)


def words_digest(words: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


# --------------------------------------------------------------------------- text features


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEA_CACHE_DIR", Path.home() / ".cache" / "sea")) / "vocab"


def text_features(
    words: Sequence[str],
    encode: Callable[[list[str]], torch.Tensor],
    *,
    model_key: str,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``(q, d)`` float32 text features of ``template.format(w)`` for every word, cached on disk.

    ``encode`` maps a list of strings to ``(n, d)`` features (``ClipBundle.encode_text``);
    ``model_key`` identifies the text model and its weights (``ClipBundle.key()``). The cache file
    is ``<cache_dir>/<sha256(model_key, words, template)[:24]>.safetensors``; ``cache_dir=False``
    disables caching.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the word goes; got {template!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    words = list(words)
    path = None
    if cache_dir is not False:
        key = hashlib.sha256("\0".join([model_key, words_digest(words), template]).encode()).hexdigest()[:24]
        path = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"
        if path.is_file():
            feats = load_file(str(path))["features"]
            if feats.shape[0] == len(words):
                log.info("vocabulary text features: cache hit %s", path)
                return feats
            log.warning("vocabulary cache %s has %d rows for %d words; recomputing", path, feats.shape[0], len(words))
    chunks = []
    for i in tqdm(
        range(0, len(words), batch_size), desc="vocabulary text features", unit="batch", disable=not progress
    ):
        chunks.append(encode([template.format(w) for w in words[i : i + batch_size]]).float().cpu())
    feats = torch.cat(chunks)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(
            {"features": feats.contiguous()},
            str(tmp),
            metadata={"model": model_key[:2000], "template": template, "words": str(len(words))},
        )
        os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
    return feats


# --------------------------------------------------------------------------- LLM token ids


def word_token_ids(words: Sequence[str], tokenizer, *, context: str = "a") -> torch.Tensor:
    """``(q, L)`` int64: each word's LLM token ids mid-sentence (see the module docstring), padded with -1."""
    words = list(words)
    prefix = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer([f"{context} {w}" for w in words], add_special_tokens=False)["input_ids"]
    rows = []
    for w, ids in zip(words, full):
        if ids[: len(prefix)] == prefix and len(ids) > len(prefix):
            rows.append(ids[len(prefix) :])
            continue
        ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        space = tokenizer(" ", add_special_tokens=False)["input_ids"]
        if len(ids) > 1 and ids[:1] == space:
            ids = ids[1:]
        if not ids:
            raise ValueError(f"words: the LLM tokenizer gives no tokens for {w!r}")
        rows.append(ids)
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


# --------------------------------------------------------------------------- all together


@dataclass
class Vocabulary:
    """What ``SEAAlignmentLoss`` needs about the words: features ``(q, d)`` and token ids ``(q, L)``."""

    words: list[str]
    features: torch.Tensor
    token_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.words)


def build_vocabulary(
    clip,
    llm_tokenizer,
    words: str | os.PathLike | Iterable[str] | WordList | None = None,
    *,
    size: int = DEFAULT_SIZE,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Vocabulary:
    """Words (see :func:`load_words`) -> :class:`Vocabulary`, text features from ``clip``
    (a :class:`sea_model.vision.ClipBundle`), token ids from ``llm_tokenizer``."""
    wl = load_words(
        words if words is None or isinstance(words, (str, os.PathLike, WordList)) else list(words), size=size
    )
    feats = text_features(
        wl.words,
        clip.encode_text,
        model_key=clip.key(),
        template=template,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=progress,
    )
    return Vocabulary(wl.words, feats, word_token_ids(wl.words, llm_tokenizer))
