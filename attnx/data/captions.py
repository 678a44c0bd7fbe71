"""Captions of the garment scenes: varied English sentences generated from a scene's labels and layout.

The embedded CLIP model (:mod:`attnx.zoo.clip`) was trained on pairs of a scene
(:func:`attnx.data.make_scenes`) and one caption drawn by :func:`sample_caption`. A caption is of one
of three kinds, each a fixed set of templates:

* **partial** (true of every scene that holds the named garment): ``"a bag"``, ``"where is the
  bag?"``, ``"find the bag"``, ``"a scene with a bag"``, ...
* **exhaustive** (names every garment of the scene): ``"a photo of a bag"``, ``"just a sneaker"``,
  ``"a bag and a coat"``, ``"a coat next to a bag"``, ...
* **positional** (exhaustive, with where each garment is): ``"a coat on the left"``, ``"a bag to the
  left of a coat"``, ``"a bag at the top and a coat at the bottom"``, ... One garment: which part of
  the canvas its box's centre is in (with a dead zone in the middle); two garments: where each is
  with respect to the other (their boxes are disjoint along that axis).

:meth:`Caption.fits` says whether a caption is true of another scene, so that training can drop the
other scenes of a batch that a caption equally describes from its negatives. Everything is
deterministic given the ``random.Random`` passed in.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .fashion import CLASS_NAMES

__all__ = [
    "CLASS_WORDS",
    "Caption",
        "class_prompt",
    "indefinite",
    "label_set_caption",
    "sample_caption",
    "template_texts",
    "where",
]

#: the noun phrase of each Fashion-MNIST class in the captions (``CLASS_NAMES`` order)
CLASS_WORDS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
assert len(CLASS_WORDS) == len(CLASS_NAMES)

#: a single garment: its box's centre lies in this part of the canvas
ABSOLUTE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
#: a garment's share of the canvas on either side of the middle where no side is named
DEAD_ZONE = 0.1

PARTIAL = ("{a}", "{the}", "where is {the}?", "find {the}", "a scene with {a}", "there is {a}", "{a} somewhere")
SINGLE = ("a photo of {a}", "a picture of {a}", "an image of {a}", "just {a}", "only {a}", "a single {w}",
          "{a} alone", "{a} on a cluttered background", "one {w}")
SINGLE_WHERE = ("{a} {at}", "a photo of {a} {at}", "{the} is {at}")
PAIR = ("{a} and {b}", "a photo of {a} and {b}", "a picture of {a} and {b}", "an image of {a} and {b}",
        "{a} next to {b}", "{a} with {b}", "{a} and {b} on a cluttered background", "two things: {a} and {b}",
        "both {a} and {b}")
#: (template, where {a} is with respect to {b})
PAIR_WHERE = (("{a} on the left and {b} on the right", "left"), ("{a} to the left of {b}", "left"),
              ("{a} to the right of {b}", "right"), ("{a} at the top and {b} at the bottom", "top"),
              ("{a} above {b}", "top"), ("{a} below {b}", "bottom"), ("{a} on the right and {b} on the left", "right"))
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def indefinite(c: int) -> str:
    """``"a bag"``, ``"an ankle boot"``."""
    word = CLASS_WORDS[c]
    return ("an " if word[0] in "aeiou" else "a ") + word


def class_prompt(c: int, template: str = "a photo of {a}") -> str:
    """The zero-shot prompt of class ``c``: ``"a photo of a bag"``."""
    return template.format(a=indefinite(c), the="the " + CLASS_WORDS[c], w=CLASS_WORDS[c])


def label_set_caption(classes: Sequence[int]) -> str:
    """The plain exhaustive caption of a set of one or two classes, in class order: ``"a coat and a bag"``."""
    cs = sorted(int(c) for c in classes if int(c) >= 0)
    return "a photo of " + " and ".join(indefinite(c) for c in cs)


def where(boxes: torch.Tensor, classes: torch.Tensor, slot: int, size: int) -> set[str]:
    """The sides (``left``/``right``/``top``/``bottom``) that describe where garment ``slot`` is.

    One garment: the part of the canvas its box's centre is in, outside a dead zone around the middle.
    Two garments: where it is with respect to the other, along each axis on which their boxes do not
    overlap.
    """
    x0, y0, w, h = (float(v) for v in boxes[slot])
    if int(classes[1 - slot]) < 0:
        out = set()
        cx, cy = (x0 + w / 2) / size, (y0 + h / 2) / size
        if cx < 0.5 - DEAD_ZONE:
            out.add("left")
        if cx > 0.5 + DEAD_ZONE:
            out.add("right")
        if cy < 0.5 - DEAD_ZONE:
            out.add("top")
        if cy > 0.5 + DEAD_ZONE:
            out.add("bottom")
        return out
    u0, v0, uw, vh = (float(v) for v in boxes[1 - slot])
    out = set()
    if x0 + w <= u0:
        out.add("left")
    if u0 + uw <= x0:
        out.add("right")
    if y0 + h <= v0:
        out.add("top")
    if v0 + vh <= y0:
        out.add("bottom")
    return out


@dataclass(frozen=True)
class Caption:
    """A caption and what it claims about a scene.

    Attributes
    ----------
    text:
        The sentence.
    named:
        The classes it names.
    exhaustive:
        Whether it claims the scene holds exactly the named garments.
    sides:
        ``(class, side)`` claims: the garment of ``class`` is on that ``side`` (see :func:`where`).
    """

    text: str
    named: tuple[int, ...]
    exhaustive: bool
    sides: tuple[tuple[int, str], ...] = ()

    def fits(self, classes: torch.Tensor, boxes: torch.Tensor, size: int) -> bool:
        """Whether the caption is true of a scene with these ``classes (2,)`` and ``boxes (2, 4)``."""
        present = [int(c) for c in classes if int(c) >= 0]
        if not set(self.named) <= set(present) or (self.exhaustive and set(self.named) != set(present)):
            return False
        for c, side in self.sides:
            if side not in where(boxes, classes, present.index(c), size):
                return False
        return True


def sample_caption(classes: torch.Tensor, boxes: torch.Tensor, size: int, rng: random.Random, *,
                   p_partial: float = 0.25, p_where: float = 0.3, kinds: Sequence[str] | None = None) -> Caption:
    """A random true caption of a scene (its ``classes (2,)`` and ``boxes (2, 4)``).

    Parameters
    ----------
    p_partial:
        Probability of a partial caption (one garment named; where there are two, either).
    p_where:
        Probability of a positional caption, when the layout allows one.
    kinds:
        Restrict to some of ``"partial"``, ``"exhaustive"``, ``"positional"`` (default: all).
    """
    kinds = set(kinds or ("partial", "exhaustive", "positional"))
    present = [int(c) for c in classes if int(c) >= 0]
    slots = list(range(len(present)))
    sides = {s: sorted(where(boxes, classes, s, size)) for s in slots}
    can_where = any(sides.values())
    r = rng.random()
    if "partial" in kinds and (r < p_partial or kinds == {"partial"}):
        c = present[rng.choice(slots)]
        text = class_prompt(c, rng.choice(PARTIAL))
        return Caption(text, (c,), False)
    if "positional" in kinds and can_where and (rng.random() < p_where or "exhaustive" not in kinds):
        if len(present) == 1:
            side = rng.choice(sides[0])
            c = present[0]
            text = rng.choice(SINGLE_WHERE).format(a=indefinite(c), the="the " + CLASS_WORDS[c], at=ABSOLUTE[side])
            return Caption(text, (c,), True, ((c, side),))
        options = [(t, s, rel) for t, rel in PAIR_WHERE for s in slots if rel in sides[s]]
        template, s, rel = rng.choice(options)
        a, b = present[s], present[1 - s]
        text = template.format(a=indefinite(a), b=indefinite(b))
        return Caption(text, (a, b), True, ((a, rel), (b, OPPOSITE[rel])))
    if len(present) == 1:
        c = present[0]
        return Caption(class_prompt(c, rng.choice(SINGLE)), (c,), True)
    a, b = rng.sample(present, 2)
    return Caption(rng.choice(PAIR).format(a=indefinite(a), b=indefinite(b)), (a, b), True)


def template_texts() -> list[str]:
    """Every sentence the templates can write (the vocabulary of the embedded CLIP is built from them)."""
    fills = [class_prompt(c, t) for c in range(len(CLASS_WORDS)) for t in PARTIAL + SINGLE]
    fills += [t.format(a=indefinite(c), the="the " + CLASS_WORDS[c], at=at)
              for c in range(len(CLASS_WORDS)) for t in SINGLE_WHERE for at in ABSOLUTE.values()]
    fills += [t.format(a=indefinite(a), b=indefinite(b)) for t in PAIR + tuple(t for t, _ in PAIR_WHERE)
              for a in range(len(CLASS_WORDS)) for b in range(len(CLASS_WORDS)) if a != b]
    return fills
