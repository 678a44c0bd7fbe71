"""A league table from per-sample values: each cell the mean over samples ± its standard error.

The ``clip`` and ``dinov2`` leagues measure one number per (sample, method) for every column;
:class:`SampleTable` holds those numbers and renders them as the other leagues do (markdown with
the best value in bold, CSV with ``<key>_se`` columns), with a row for every method that failed on
the model, saying why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import table
from .columns import Column

__all__ = ["SampleTable", "mean_and_se"]


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """The mean of the finite values and its standard error ``std(ddof=1) / sqrt(n)`` (NaN
    without values; NaN standard error with a single one)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(v.mean()), se


@dataclass
class SampleTable:
    """Per-sample values of every method and column, and the table computed from them.

    Attributes
    ----------
    task:
        The league's name (``league_<task>.md`` / ``.csv``).
    title:
        What was evaluated (one line, bold above the table).
    columns:
        The columns, in table order.
    values:
        ``values[method][column key]``: one value per sample (NaN: undefined, left out of the mean).
    failed:
        ``{method: reason}`` for the methods that raised on this model (their rows show –).
    notes:
        Lines printed under the columns' definitions.
    """

    task: str
    title: str
    columns: list[Column]
    values: dict[str, dict[str, np.ndarray]]
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return list(self.values)

    def row(self, method: str) -> dict[str, float]:
        """Column key -> mean, ``<key>_se`` -> its standard error (NaN for a failed method)."""
        out: dict[str, float] = {}
        for c in self.columns:
            v = self.values.get(method, {}).get(c.key)
            out[c.key], out[c.key + "_se"] = mean_and_se(v) if v is not None else (math.nan, math.nan)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per method, the failed ones last."""
        return [{"method": m, **self.row(m)} for m in [*self.methods, *self.failed]]

    def to_markdown(self) -> str:
        notes = list(self.notes)
        if self.failed:
            notes += ["", *(f"Failed on this model: {m}: {why}" for m, why in self.failed.items())]
        return table.to_markdown(self.title, self.columns, self.rows(), notes)

    def to_csv(self, path: str | Path | None = None) -> str:
        return table.to_csv(self.columns, self.rows(), path)

    def write(self, out: str | Path, wall: float | None = None) -> list[Path]:
        """``league_<task>.md`` and ``league_<task>.csv`` in the folder ``out``; returns the paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        md, csv = out / f"league_{self.task}.md", out / f"league_{self.task}.csv"
        md.write_text(self.to_markdown() + (f"\nWall time: {wall:.1f} s.\n" if wall is not None else ""))
        self.to_csv(csv)
        return [md, csv]


def stack(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-batch dicts of arrays concatenated key by key."""
    keys = parts[0].keys() if parts else ()
    return {k: np.concatenate([np.asarray(p[k], dtype=np.float64).reshape(-1) for p in parts]) for k in keys}
