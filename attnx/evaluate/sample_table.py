"""A league table from per-sample values: each cell the mean over samples ± its standard error.

The ``clip`` and ``dinov2`` leagues measure one number per (sample, method) for every column;
:class:`SampleTable` holds those numbers and renders them as the other leagues do (markdown with
the best value in bold, CSV with ``<key>_se`` columns), with a row for every method that failed on
the model, saying why.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import AttnxValueError
from . import table
from .columns import Column
from .storage import check_same_samples, updated_order

__all__ = ["FORMAT", "SampleTable", "mean_and_se"]

#: the ``format`` entry of a saved table
FORMAT = "attnx-sample-table-1"


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
    items:
        What each sample is, arrays aligned with the values (the (scene, garment) of a map, the
        photos of a pair): a table updated with new rows must hold the same samples.
    meta:
        The protocol's settings (``limit``, ``batch_size``, ...): the same for the new rows.
    """

    task: str
    title: str
    columns: list[Column]
    values: dict[str, dict[str, np.ndarray]]
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    items: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

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
        """``league_<task>.md``, ``league_<task>.csv`` and the per-sample values
        ``samples_<task>.npz`` (:meth:`save`) in the folder ``out``; returns the paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        md, csv = out / f"league_{self.task}.md", out / f"league_{self.task}.csv"
        md.write_text(self.to_markdown() + (f"\nWall time: {wall:.1f} s.\n" if wall is not None else ""))
        self.to_csv(csv)
        return [md, csv, self.save(out / f"samples_{self.task}.npz")]

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """The per-sample values, items and settings as ``.npz`` (no pickle), for :meth:`load`."""
        head = {"task": self.task, "title": self.title, "columns": [asdict(c) for c in self.columns],
                "methods": self.methods, "failed": self.failed, "notes": self.notes, "meta": self.meta}
        arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT), "table": np.array(json.dumps(head))}
        for k, v in self.items.items():
            arrays[f"items/{k}"] = np.asarray(v)
        for m, cols in self.values.items():
            for k, v in cols.items():
                arrays[f"values/{m}/{k}"] = np.asarray(v, dtype=np.float64)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SampleTable":
        """The table :meth:`save` wrote."""
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != FORMAT:
                raise AttnxValueError(f"{path} is not a file written by SampleTable.save")
            head = json.loads(str(z["table"]))
            items = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("items/")}
            values: dict[str, dict[str, np.ndarray]] = {m: {} for m in head["methods"]}
            for k in z.files:
                if k.startswith("values/"):
                    _, m, key = k.split("/", 2)
                    values.setdefault(m, {})[key] = z[k]
        return cls(head["task"], head["title"], [Column(**c) for c in head["columns"]], values, dict(head["failed"]),
                   list(head["notes"]), items, dict(head["meta"]))

    def updated(self, new: "SampleTable", references: Iterable[str] = ()) -> "SampleTable":
        """This table with the rows of ``new`` (the same task, samples and settings, checked) put
        in: a method already here is replaced, a new one added before the first reference row
        (``references``, or a sanity row ``method@...``). The columns are those of ``new`` (a
        column the old rows lack shows –)."""
        if new.task != self.task:
            raise AttnxValueError(f"cannot put {new.task} rows into the {self.task} league")
        check_same_samples(self.task, self.meta, new.meta, self.items, new.items, skip=("sanity",))
        added = [*new.methods, *new.failed]
        order = [m for m in updated_order(self.methods, new.methods, references) if m not in new.failed]
        values = {m: (new.values[m] if m in new.values else self.values[m]) for m in order}
        failed = {m: why for m, why in self.failed.items() if m not in added}
        failed.update(new.failed)
        notes = [*self.notes, *(n for n in new.notes if n not in self.notes)]  # e.g. the sanity row's, when it is new
        meta = dict(self.meta, sanity=True) if new.meta.get("sanity") else dict(self.meta)
        return SampleTable(self.task, self.title, list(new.columns), values, failed, notes, dict(self.items), meta)


def stack(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-batch dicts of arrays concatenated key by key."""
    keys = parts[0].keys() if parts else ()
    return {k: np.concatenate([np.asarray(p[k], dtype=np.float64).reshape(-1) for p in parts]) for k in keys}
