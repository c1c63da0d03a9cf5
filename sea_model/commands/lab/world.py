"""The lab's synthetic world: scenes of coloured shapes (:mod:`sea_model.commands.shapes`), rendered
with a per-patch ground truth.

A scene holds 2 or 3 objects, each of a different colour, in distinct quadrants (top left, top
right, bottom left, bottom right; shape, colour, size and quadrant drawn at random, positions
jittered by a pixel or two). The renderer draws the picture and, with the same primitives, an
object-index mask; a patch's truth is the object covering most of its pixels when it covers at
least a third of the patch (:data:`MIN_COVER`), else none (a background patch). Its true words
are that object's colour and shape.

Texts: a caption per scene (stage 1 and CLIP), single-word-answer questions of five kinds
(colour, shape, position, counting, size; stage 2 and evaluation) and text-only descriptions
with questions (to pretrain the tiny LLM on language about the world before any image).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..shapes import COLOURS, COLUMNS, PRETRAIN_PROMPT, ROWS, SHAPES, Obj, background, draw_shape

SIZES = {"small": 0.17, "big": 0.22}  # half-width as a fraction of the image side (a quadrant is 0.5)
CORNERS = (0, 2)  # rows and columns of the quadrants in sea demo's 3 x 3 names: top/bottom, left/right
MIN_COVER = 1 / 3  # the share of a patch an object must cover to be the patch's truth
NUMBERS = ("zero", "one", "two", "three")
QUESTION_KINDS = ("colour", "shape", "position", "count", "size")


@dataclass(frozen=True)
class Scene:
    """Objects (:class:`~sea_model.commands.shapes.Obj`) in distinct corner cells."""

    objects: tuple[Obj, ...]

    def caption(self) -> str:
        return " and ".join(o.caption() for o in sorted(self.objects, key=lambda o: (o.row, o.column)))

    def questions(self, rng: random.Random) -> list[tuple[str, str, str]]:
        """One ``(kind, question, answer)`` per kind in :data:`QUESTION_KINDS`; every answer is one word."""
        o = rng.choice(self.objects)
        unique = sum(p.shape == o.shape for p in self.objects) == 1
        which = f"the {o.shape}" if unique else f"the {o.shape} at the {o.where}"
        counted = rng.choice(SHAPES)
        return [
            ("colour", f"What colour is {which}?", o.colour),
            ("shape", f"What shape is the {o.colour} object?", o.shape),
            rng.choice(
                (
                    ("position", f"Is the {o.colour} {o.shape} on the left or on the right?", COLUMNS[o.column]),
                    ("position", f"Is the {o.colour} {o.shape} at the top or at the bottom?", ROWS[o.row]),
                )
            ),
            ("count", f"How many {counted}s are there?", NUMBERS[sum(p.shape == counted for p in self.objects)]),
            ("size", f"Is the {o.colour} {o.shape} big or small?", o.size),
        ]


def random_scene(rng: random.Random) -> Scene:
    n = rng.choice((2, 3))
    colours = rng.sample(sorted(COLOURS), n)
    cells = rng.sample(range(4), n)
    return Scene(
        tuple(
            Obj(rng.choice(SHAPES), c, rng.choice(sorted(SIZES)), CORNERS[cell // 2], CORNERS[cell % 2])
            for c, cell in zip(colours, cells)
        )
    )


def render(scene: Scene, rng: random.Random, *, size: int, patch: int):
    """``(PIL image, truth)``: ``truth`` is ``(size // patch) ** 2`` ints (row-major), the index of
    the object covering most of each patch, or -1 when no object covers :data:`MIN_COVER` of it."""
    from PIL import Image, ImageDraw

    image = background(rng, size)
    mask = Image.new("L", (size, size), 0)
    pen, mask_pen = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for k, o in enumerate(scene.objects):
        r = SIZES[o.size] * size
        cx = (0.25 + 0.25 * o.column) * size + rng.uniform(-1.5, 1.5)
        cy = (0.25 + 0.25 * o.row) * size + rng.uniform(-1.5, 1.5)
        box = [cx - r, cy - r, cx + r, cy + r]
        draw_shape(pen, o.shape, box, COLOURS[o.colour])
        draw_shape(mask_pen, o.shape, box, k + 1)
    g = size // patch
    m = np.asarray(mask)[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3)
    m = m.reshape(g * g, patch * patch)
    counts = np.stack([(m == v).sum(1) for v in range(1, len(scene.objects) + 1)], 1)  # (P, objects)
    best = counts.argmax(1)
    covered = counts.max(1) >= MIN_COVER * patch * patch
    return image, [int(b) if c else -1 for b, c in zip(best, covered)]


def true_words(scene: Scene, truth: list[int]) -> list[tuple[str, ...]]:
    """Per patch, the words of its object (colour, shape); ``()`` for background patches."""
    return [() if k < 0 else (scene.objects[k].colour, scene.objects[k].shape) for k in truth]


@dataclass
class Split:
    """Scenes with their image files and per-patch truth."""

    scenes: list[Scene]
    images: list[str]  # file names under the image folder
    truth: list[list[int]]


def write_split(folder: Path, prefix: str, n: int, *, seed: int, size: int, patch: int) -> Split:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    split = Split([], [], [])
    for i in range(n):
        scene = random_scene(rng)
        image, truth = render(scene, rng, size=size, patch=patch)
        name = f"{prefix}{i:05d}.png"
        image.save(folder / name)
        split.scenes.append(scene)
        split.images.append(name)
        split.truth.append(truth)
    return split


def caption_entries(split: Split) -> list[dict]:
    """Stage 1: ``<image>`` and the caption (template ``plain``)."""
    return [
        {
            "id": f"cap{i}",
            "image": name,
            "conversations": [
                {"from": "human", "value": PRETRAIN_PROMPT},
                {"from": "gpt", "value": scene.caption()},
            ],
        }
        for i, (scene, name) in enumerate(zip(split.scenes, split.images))
    ]


def question_entries(split: Split, *, seed: int, turns: int = 4) -> list[dict]:
    """Stage 2: ``turns`` questions about each image (template ``chat``)."""
    rng = random.Random(seed)
    out = []
    for i, (scene, name) in enumerate(zip(split.scenes, split.images)):
        conv = []
        for k, (_, q, a) in enumerate(rng.sample(scene.questions(rng), turns)):
            conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
        out.append({"id": f"qa{i}", "image": name, "conversations": conv})
    return out


def text_entries(n: int, *, seed: int) -> list[dict]:
    """Text only, for the LLM before any image: a scene described in words, then a question about it."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        _, q, a = rng.choice(scene.questions(rng))
        conv = [{"from": "human", "value": f"{scene.caption()}. {q}"}, {"from": "gpt", "value": a}]
        out.append({"id": f"txt{i}", "conversations": conv})
    return out


def eval_questions(split: Split, *, seed: int) -> list[tuple[int, str, str, str]]:
    """Every kind of question once per scene: ``(scene index, kind, question, answer)``."""
    rng = random.Random(seed)
    return [(i, k, q, a) for i, scene in enumerate(split.scenes) for k, q, a in scene.questions(rng)]


def world_words() -> list[str]:
    """Every word the lab's texts use (captions, questions, answers, the stage-1 prompt)."""
    words = [*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *SIZES, *ROWS, *COLUMNS, *NUMBERS]
    words += (
        "a at the and What colour is shape object Is on left in center or right How many are there big small".split()
    )
    words += "Describe image briefly . , ? user assistant".split()
    return list(dict.fromkeys(words))


def write_json(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries, indent=1))
    return path
