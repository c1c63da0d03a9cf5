"""LLaVA JSON datasets: reading and checking the file, the dataset, and a collator.

Files: a JSON list of entries ``{"id", "image" (optional, relative to the image folder),
"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`` as in
``blip_laion_cc_sbu_558k.json`` (stage 1) and ``llava_v1_5_mix665k.json`` (stage 2). Every entry
is validated when the dataset is built; a malformed one raises ``ValueError`` naming the file
and the entry before any training starts. An entry becomes tokens through a conversation template
(:mod:`sea_model.prompts`); sequences are truncated to ``max_length`` (an image block that would
be cut is dropped whole and the sample becomes text-only).

:func:`check_data` reads and validates the file and opens a sample of its images, so a wrong
path, a malformed file or a wrong image folder is a clear error before any model is built.

A missing or unreadable image never stops an epoch: the sample is replaced by the next entry
(wrapping around) whose image loads. Each bad entry is counted once per process, in
``dataset.skipped`` and in the batches (``batch["skipped"]``, ``batch["skipped_examples"]``), which
the trainer reports, aggregated. Replacing rather than dropping keeps every batch full, so
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

from .prompts import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    ROLES,
    add_image_token,
    encode_conversation,
    normalize_turns,
    resolve_template,
)

log = logging.getLogger(__name__)


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
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise bad(f"turn {k} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r}")
        roles = [ROLES[t["from"]] for t in conv]
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
    ``skipped_examples`` (up to three of them, ``"name (missing)"``). ``dataset.skipped`` counts the
    bad images ``"missing"`` and ``"corrupt"`` found in this process (each DataLoader worker counts
    its own; a bad entry is skipped without retrying afterwards).
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
