"""The synthetic world ``sea demo`` and ``sea lab`` draw: coloured shapes, each in a cell of a 3 x 3
grid, with the words that describe them.

An :class:`Obj` is one shape (circle, square, triangle) of one of six colours, small or big, in a
cell (row, column) whose names give its position (``"top left"``, ``"center"``, ...), with its
caption and four questions. ``sea demo`` draws one object per image (:mod:`.demo`); ``sea lab``
draws scenes of two or three in the corner cells, with per-patch truth (:mod:`.lab.world`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (148, 70, 189),
    "orange": (255, 127, 14),
}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
PRETRAIN_PROMPT = "<image>\nDescribe the image briefly."  # the human turn of a stage-1 (caption) entry


@dataclass(frozen=True)
class Obj:
    """One shape of one colour and size in cell (``row``, ``column``) of the 3 x 3 grid."""

    shape: str
    colour: str
    size: str
    row: int
    column: int

    @property
    def where(self) -> str:
        """``"top left"``, ``"top"``, ``"left"``, ``"center"``, ..."""
        row, col = ROWS[self.row], COLUMNS[self.column]
        if row == "middle":
            return col
        return row if col == "center" else f"{row} {col}"

    def caption(self) -> str:
        prep = {"center": "in the", "left": "on the", "right": "on the", "top": "at the", "bottom": "at the"}.get(
            self.where, "in the"
        )
        return f"a {self.size} {self.colour} {self.shape} {prep} {self.where}"

    def questions(self) -> list[tuple[str, str]]:
        return [
            (f"What colour is the {self.shape}?", self.colour),
            (f"What shape is the {self.colour} object?", self.shape),
            (f"Where is the {self.shape}?", self.where),
            (f"Is the {self.shape} big or small?", self.size),
        ]


def background(rng: random.Random, size: int):
    """A light grey PIL image of ``size`` x ``size``, its tint drawn from ``rng``."""
    from PIL import Image

    grey = rng.randint(205, 245)
    return Image.new("RGB", (size, size), (grey, grey + rng.randint(-8, 8), grey + rng.randint(-8, 8)))


def draw_shape(pen, shape: str, box: list[float], fill) -> None:
    """Draw ``shape`` filling ``box`` ``[x0, y0, x1, y1]`` with ``pen`` (a PIL ``ImageDraw``); a
    triangle points up."""
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        x0, y0, x1, y1 = box
        pen.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
