"""LLaVA JSON datasets, conversation templates with answer-only supervision, and a collator.

Files: a JSON list of entries ``{"id", "image" (optional, relative to the image folder),
"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`` as in
``blip_laion_cc_sbu_558k.json`` (stage 1) and ``llava_v1_5_mix665k.json`` (stage 2). Every entry
is validated when the dataset is built; a malformed one raises ``ValueError`` naming the file
and the entry before any training starts.

Templates (the text an entry becomes; only the assistant's answers are supervised, every other
token's label is -100):

* ``"plain"`` (stage 1, LLaVA's ``conv_llava_plain``): ``<image>`` + caption + ``"\\n"``; the
  human turn is dropped, the caption and the newline are supervised.
* ``"chat"`` (stage 2): the tokenizer's own chat template; each answer span is the text the
  template adds for that assistant turn (end-of-turn tokens included).
* ``"vicuna_v1"`` (stage 2 for tokenizers without a chat template):
  ``"<system> USER: <q1> ASSISTANT: <a1></s>USER: <q2> ASSISTANT: <a2></s>"`` with LLaVA's
  system prompt and the tokenizer's EOS as ``</s>``; each ``<a_i></s>`` is supervised.
* ``"auto"``: ``"chat"`` when the tokenizer has a chat template, else ``"vicuna_v1"``.

Supervision is decided per token from the tokenizer's character offsets (a token is supervised
when it ends inside an answer span), so a fast tokenizer is required. As in LLaVA, an entry's
``<image>`` is moved to the start of its turn (``"<image>\\n" + text``); an entry with an image
but no ``<image>`` gets one at the start of its first human turn. Each ``<image>`` token is then
expanded into ``num_image_tokens`` copies, one per visual token, which the model replaces with
the adapter's outputs. Sequences are truncated to ``max_length`` (an image block that would be
cut is dropped whole and the sample becomes text-only).

:func:`check_data` reads and validates the file and opens a sample of its images, so a wrong
path, a malformed file or a wrong image folder is a clear error before any model is built.

A missing or unreadable image never stops an epoch: the sample is replaced by the next entry
(wrapping around) whose image loads. Each bad entry is counted once per process (and skipped
without retrying afterwards), both in ``dataset.skipped`` (a ``Counter`` with ``"missing"`` and
``"corrupt"``; per process, so with DataLoader workers it stays empty in the main process and
each worker finds the bad entries on its own) and in the batches, as ``batch["skipped"]`` and
``batch["skipped_examples"]`` (the bad entries found while producing that batch, and up to three
of their names; works with workers); the trainer reports them, aggregated (the dataset logs
them at debug level only). Replacing rather than dropping keeps every batch full, so
data-parallel ranks always take the same number of steps.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .config import TEMPLATES

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def add_image_token(tokenizer, token: str = IMAGE_TOKEN) -> int:
    """Make ``token`` a special token of ``tokenizer`` (if it is not already) and return its id.

    The id may lie beyond the LLM's embedding table: the model never embeds it (image positions
    are overwritten by visual tokens) and never predicts it (their labels are -100).
    """
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(token)


def resolve_template(template: str, tokenizer) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}; got {template!r}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' but the tokenizer has no chat_template; use 'vicuna_v1' or 'auto'")
    return template


# --------------------------------------------------------------------------- rendering


def render(turns: Sequence[tuple[str, str]], tokenizer, template: str, *, generation: bool = False):
    """Turns ``[(role, text)]`` (role ``"user"``/``"assistant"``, alternating from ``"user"``) ->
    ``(text, answer_spans, add_special_tokens)``. ``answer_spans`` are ``[start, end)`` character
    ranges to supervise. With ``generation`` the text ends where the assistant's answer begins."""
    template = resolve_template(template, tokenizer)
    spans: list[tuple[int, int]] = []
    if template == "plain":
        # conv_llava_plain: the human turn is replaced by the image alone.
        image = IMAGE_TOKEN if IMAGE_TOKEN in turns[0][1] else ""
        if generation:
            return image, spans, True
        text = image
        for role, value in turns[1:]:
            if role == "assistant":
                spans.append((len(text), len(text) + len(value) + 1))
                text += value + "\n"
        return text, spans, True
    if template == "vicuna_v1":
        eos = tokenizer.eos_token or "</s>"
        text = VICUNA_SYSTEM + " "
        for role, value in turns:
            if role == "user":
                text += f"USER: {value} "
            else:
                text += "ASSISTANT: "
                spans.append((len(text), len(text) + len(value) + len(eos)))
                text += value + eos
        if generation:
            text += "ASSISTANT:"
        return text, spans, True
    # chat: the tokenizer's template; answer i is what rendering turn i adds to the prefix.
    messages = [{"role": r, "content": v} for r, v in turns]

    def chat(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    if generation:
        return chat(messages, True), spans, False
    text = chat(messages, False)
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before, through = chat(messages[:i], True), chat(messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "the tokenizer's chat template does not render conversations prefix-consistently, so answer "
                "spans cannot be located; use template='vicuna_v1'"
            )
        spans.append((len(before), len(through)))
    return text, spans, False


def tokenize(text: str, spans, tokenizer, *, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """``text`` -> ``(input_ids, labels)``; a token is supervised when it ends inside a span."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenizer: a fast tokenizer (with offset mapping) is required")
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (_, end) in enumerate(enc["offset_mapping"]):
        if any(s < end <= e for s, e in spans):
            labels[k] = ids[k]
    return ids, labels


def expand_image_tokens(ids: list[int], labels: list[int], image_token_id: int, n: int):
    """Each ``image_token_id`` becomes ``n`` copies with label -100."""
    out_ids, out_labels = [], []
    for t, l in zip(ids, labels):
        if t == image_token_id:
            out_ids += [image_token_id] * n
            out_labels += [IGNORE_INDEX] * n
        else:
            out_ids.append(t)
            out_labels.append(l)
    return out_ids, out_labels


def normalize_turns(conversations: Sequence[dict], has_image: bool) -> list[tuple[str, str]]:
    """LLaVA conventions: drop a leading non-human turn; move ``<image>`` to the start of its turn
    (or add it to the first human turn when the entry has an image but no ``<image>``)."""
    turns = [(_ROLES[c["from"]], c["value"]) for c in conversations]
    if turns and turns[0][0] != "user":
        turns = turns[1:]
    out = []
    for role, value in turns:
        if IMAGE_TOKEN in value:
            value = IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()
        out.append((role, value))
    if has_image and not any(IMAGE_TOKEN in v for _, v in out):
        out[0] = (out[0][0], IMAGE_TOKEN + "\n" + out[0][1])
    return out


def encode_conversation(
    turns: Sequence[tuple[str, str]],
    tokenizer,
    *,
    template: str,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int | None = None,
) -> tuple[list[int], list[int], bool]:
    """Normalised turns -> ``(input_ids, labels, has_image)`` with image tokens expanded and
    truncation applied."""
    text, spans, special = render(turns, tokenizer, template)
    ids, labels = tokenize(text, spans, tokenizer, add_special_tokens=special)
    ids, labels = expand_image_tokens(ids, labels, image_token_id, num_image_tokens)
    has_image = image_token_id in ids
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
        n_img = sum(t == image_token_id for t in ids)
        if 0 < n_img < num_image_tokens:  # cut through the image block: drop the block
            first = ids.index(image_token_id)
            ids, labels = ids[:first], labels[:first]
        has_image = image_token_id in ids
    return ids, labels, has_image


def prompt_ids(
    question: str,
    tokenizer,
    *,
    template: str = "auto",
    image: bool = True,
    image_token_id: int,
    num_image_tokens: int,
) -> list[int]:
    """Token ids of a generation prompt asking ``question`` (about an image when ``image``)."""
    value = (IMAGE_TOKEN + "\n" + question) if image else question
    text, _, special = render([("user", value)], tokenizer, template, generation=True)
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    ids, _ = expand_image_tokens(ids, [IGNORE_INDEX] * len(ids), image_token_id, num_image_tokens)
    return ids


# --------------------------------------------------------------------------- validation


def validate_entries(entries, path, template: str) -> None:
    """Raise ``ValueError`` naming ``path`` and the entry for the first malformed entry."""
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    for i, e in enumerate(entries):

        def bad(msg, i=i, e=e):
            eid = e.get("id") if isinstance(e, dict) else None
            return ValueError(f"{path}: entry {i} (id={eid!r}): {msg}")

        if not isinstance(e, dict):
            raise bad(f"expected an object, got {type(e).__name__}")
        if "image" in e and (not isinstance(e["image"], str) or not e["image"]):
            raise bad(f"'image' must be a non-empty string, got {e['image']!r}")
        conv = e.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise bad("'conversations' must be a non-empty list")
        for k, turn in enumerate(conv):
            if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
                raise bad(f"turn {k} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r}")
        roles = [_ROLES[t["from"]] for t in conv]
        if roles[0] != "user":
            roles = roles[1:]
        if not roles or any(r != ("user" if k % 2 == 0 else "assistant") for k, r in enumerate(roles)):
            raise bad(f"turns must alternate human, gpt, ... starting with human; got {[t['from'] for t in conv]}")
        if "assistant" not in roles:
            raise bad("no gpt turn: nothing to supervise")
        n_image = sum(t["value"].count(IMAGE_TOKEN) for t in conv)
        if n_image > 1:
            raise bad(f"{n_image} '{IMAGE_TOKEN}' placeholders; one image per entry is supported")
        if n_image and "image" not in e:
            raise bad(f"'{IMAGE_TOKEN}' in the conversation but no 'image' key")
        if template == "plain" and len(roles) != 2:
            raise bad(f"the plain (stage-1) template needs exactly one human and one gpt turn; got {len(roles)} turns")


# --------------------------------------------------------------------------- reading and checking


def read_entries(json_path: str | os.PathLike) -> list:
    """The entries of a LLaVA JSON file; a missing, non-UTF-8 or malformed file is a ``ValueError``
    naming it."""
    path = Path(json_path)
    if not path.is_file():
        raise ValueError(f"data.json_path {path}: no such file" + (" (a directory)" if path.is_dir() else ""))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


def image_problem(path: Path) -> str | None:
    """None when PIL can read the image at ``path``, else ``"missing"`` or ``"corrupt"``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        return "missing"
    except Exception:  # PIL raises many types for broken files
        return "corrupt"
    return None


def check_data(json_path, image_folder, template: str, *, sample: int = 16) -> list:
    """Read and validate the data file and open ``sample`` of its images (spread over the file);
    returns the entries. Raises ``ValueError`` when the file is bad, the image folder is missing
    or none of the sampled images opens; logs one warning when some do not."""
    path = Path(json_path)
    entries = read_entries(path)
    validate_entries(entries, path, template)
    images = [e["image"] for e in entries if "image" in e]
    if not images:
        return entries
    if image_folder is None:
        raise ValueError(f"{path}: {len(images)} entries have images: data.image_folder is required")
    folder = Path(image_folder)
    if not folder.is_dir():
        raise ValueError(
            f"data.image_folder {folder}: no such folder ({len(images)} entries of {path.name} have images)"
        )
    picks = images[:: max(1, len(images) // sample)][:sample]
    bad = [f"{name} ({problem})" for name in picks if (problem := image_problem(folder / name))]
    if len(bad) == len(picks):
        raise ValueError(
            f"none of {len(picks)} sampled images under {folder} can be read (e.g. {', '.join(bad[:3])}): "
            f"is data.image_folder right?"
        )
    if bad:
        log.warning(
            "%d of %d sampled images under %s cannot be read (e.g. %s); such entries are skipped and counted",
            len(bad),
            len(picks),
            folder,
            ", ".join(bad[:3]),
        )
    return entries


# --------------------------------------------------------------------------- dataset


class LlavaDataset(torch.utils.data.Dataset):
    """A LLaVA JSON file plus an image folder, tokenised lazily per item.

    Args:
        json_path: the JSON list of entries (validated here, whole).
        image_folder: root the entries' ``"image"`` paths are relative to.
        tokenizer: a fast HF tokenizer; ``<image>`` is added to it if missing.
        image_processor: PIL image -> ``(3, H, W)`` tensor (``VisionTower.image_processor()``).
        num_image_tokens: visual tokens per image (``VisionTower.num_patches``).
        template: ``"plain"`` (stage 1), ``"chat"``, ``"vicuna_v1"`` or ``"auto"`` (stage 2).
        max_length: truncate sequences to this many tokens (image tokens included).
        entries: the file's entries when already read (:func:`check_data`); validated again.

    Items are dicts: ``input_ids``, ``labels`` (int64 tensors), ``pixel_values`` (tensor or None),
    ``has_image`` (bool), ``id``, ``skipped`` (images skipped to produce this item) and
    ``skipped_examples`` (up to three of them, ``"name (missing)"``).
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_folder: str | os.PathLike | None,
        tokenizer,
        image_processor: Callable | None,
        *,
        num_image_tokens: int,
        template: str = "auto",
        max_length: int = 2048,
        entries: list | None = None,
    ):
        self.path = Path(json_path)
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1; got {num_image_tokens}")
        if max_length <= num_image_tokens:
            raise ValueError(f"max_length ({max_length}) must exceed num_image_tokens ({num_image_tokens})")
        self.template = resolve_template(template, tokenizer)
        if entries is None:
            entries = read_entries(self.path)
        validate_entries(entries, self.path, self.template)
        if any("image" in e for e in entries):
            if image_folder is None or image_processor is None:
                raise ValueError(f"{self.path} has image entries: image_folder and image_processor are required")
        self.entries = entries
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token_id = add_image_token(tokenizer)
        self.num_image_tokens, self.max_length = num_image_tokens, max_length
        self.skipped: Counter = Counter()
        self._bad: set[int] = set()  # entries whose image failed (in this process)

    def __len__(self) -> int:
        return len(self.entries)

    def _load_image(self, name: str):
        from PIL import Image

        path = self.image_folder / name
        try:
            with Image.open(path) as im:
                im.load()
                return self.image_processor(im.convert("RGB")), None
        except FileNotFoundError:
            return None, "missing"
        except Exception as err:  # PIL raises many types for broken files
            log.debug("image %s: %r", path, err)
            return None, "corrupt"

    def __getitem__(self, index: int) -> dict:
        skipped, examples = 0, []
        for k in range(len(self.entries)):
            i = (index + k) % len(self.entries)
            e = self.entries[i]
            pixel_values = None
            if "image" in e:
                if i in self._bad:
                    continue
                pixel_values, problem = self._load_image(e["image"])
                if pixel_values is None:
                    self._bad.add(i)
                    self.skipped[problem] += 1
                    skipped += 1
                    examples = (examples + [f"{e['image']} ({problem})"])[:3]
                    log.debug(
                        "%s: entry %d (id=%r): %s image %s skipped", self.path.name, i, e.get("id"), problem, e["image"]
                    )
                    continue
            turns = normalize_turns(e["conversations"], pixel_values is not None)
            ids, labels, has_image = encode_conversation(
                turns,
                self.tokenizer,
                template=self.template,
                image_token_id=self.image_token_id,
                num_image_tokens=self.num_image_tokens,
                max_length=self.max_length,
            )
            return {
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "pixel_values": pixel_values if has_image else None,
                "has_image": has_image,
                "id": e.get("id", i),
                "skipped": skipped,
                "skipped_examples": examples,
            }
        raise RuntimeError(f"{self.path}: no entry has a loadable image (skipped {dict(self.skipped)})")


class Collator:
    """Pads a list of dataset items into a batch (right padding).

    Returns ``input_ids`` ``(B, T)`` (padded with ``pad_token_id``), ``labels`` (-100 padding),
    ``attention_mask``, ``pixel_values`` ``(n_images, 3, H, W)`` stacked in batch order for the
    samples that have an image (None when none has), ``has_image`` ``(B,)`` bool, ``ids``,
    ``skipped`` (images skipped while producing these items) and ``skipped_examples``. ``None`` items are dropped.
    """

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("pad_token_id must be an int (set tokenizer.pad_token)")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[dict | None]) -> dict:
        items = [it for it in items if it is not None]
        if not items:
            raise ValueError("Collator: every item of the batch is None")
        T = max(len(it["input_ids"]) for it in items)
        B = len(items)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = it["input_ids"], it["labels"], 1
        images = [it["pixel_values"] for it in items if it["has_image"]]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.stack(images) if images else None,
            "has_image": torch.tensor([bool(it["has_image"]) for it in items]),
            "ids": [it["id"] for it in items],
            "skipped": sum(it.get("skipped", 0) for it in items),
            "skipped_examples": [x for it in items for x in it.get("skipped_examples", ())][:3],
        }
