"""The league: one row per method, computed from the per-sample results of an evaluation."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..metrics import Curve, SegmentationMeter
from . import table
from .columns import BASELINES, Column, league_columns
from .storage import SampleResults

__all__ = ["League"]


class League(SampleResults):
    """The result of :func:`attnx.evaluate.evaluate`: per-sample results of every method, and the table.

    The attributes are those of :class:`~attnx.evaluate.storage.SampleResults` (``task``, ``kind``,
    ``methods``, ``items``, ``samples``, ``meta``); so are :meth:`save`, :meth:`load` and
    :meth:`merge`, which give a ``League``. Every number of the table is computed from the
    per-sample results.
    """

    # ------------------------------------------------------------------ shape
    @property
    def unit(self) -> str:
        return "text" if self.kind == "text" else "image"

    @property
    def columns(self) -> list[Column]:
        return league_columns(self.kind, self.meta.get("measures"), self.randomisation_samples,
                              self.meta.get("item_name", "samples"))

    @property
    def randomisation_samples(self) -> int:
        """Samples (global index below this) of the parameter randomisation check; 0: not run."""
        return int((self.meta.get("randomisation") or {}).get("samples", 0))

    # ------------------------------------------------------------------ numbers
    def _curve(self, method: str, name: str) -> torch.Tensor:
        """``(n, K)`` curve values in the reported measure (sigmoid of stored logits)."""
        v = torch.from_numpy(self.samples[method][name])
        measure = self.meta["measures"]["perturbation" if name in ("pos", "neg") else "causal"] if self.kind != "text" else "probability"
        return torch.sigmoid(v) if measure == "sigmoid" else v

    def _auc(self, method: str, name: str, present: bool = False) -> np.ndarray:
        v = torch.from_numpy(self.samples[method][name])
        if present:
            values = (v > 0).to(v.dtype)
        else:
            values = self._curve(method, name)
        fractions = torch.tensor(self.meta["fractions"][name], dtype=torch.float64)
        return Curve(fractions, values, "", name).auc().numpy()

    def row(self, method: str) -> dict[str, float]:
        """The table row of ``method``: column key -> value (NaN when there is nothing to average)."""
        s = self.samples[method]
        n = len(self)

        def mean(a: np.ndarray) -> float:
            return float(np.mean(a.astype(np.float64))) if a.size else math.nan

        out: dict[str, float] = {}
        if self.kind == "text":
            out["del_most_auc"] = mean(self._auc(method, "most"))
            out["del_least_auc"] = mean(self._auc(method, "least"))
        else:
            out["pos_auc"] = mean(self._auc(method, "pos"))
            out["neg_auc"] = mean(self._auc(method, "neg"))
            if self.meta["measures"]["perturbation"] == "sigmoid":
                out["pos_present"] = mean(self._auc(method, "pos", present=True))
                out["neg_present"] = mean(self._auc(method, "neg", present=True))
            out["deletion_auc"] = mean(self._auc(method, "deletion"))
            out["insertion_auc"] = mean(self._auc(method, "insertion"))
        if self.kind == "scenes":
            meter = SegmentationMeter()
            meter.correct = int(s["seg_correct"].astype(np.int64).sum())
            meter.labeled = int(s["seg_labeled"].astype(np.int64).sum())
            meter.intersection = torch.from_numpy(s["seg_intersection"].astype(np.int64).sum(axis=0))
            meter.union = torch.from_numpy(s["seg_union"].astype(np.int64).sum(axis=0))
            meter.ap_sum = float(s["seg_ap"].astype(np.float64).sum())
            meter.images = n
            seg = meter.compute() if n else {"pixel_accuracy": math.nan, "miou": math.nan, "mean_ap": math.nan}
            out["pixel_acc"] = float(seg["pixel_accuracy"])
            out["miou"] = float(seg["miou"])
            out["map"] = float(seg["mean_ap"])
            out["pointing"] = mean(s["pointing"])
            out["mass"] = mean(s["mass"])
            two = self.items["two"].astype(bool)
            out["discrimination"] = mean(s["mass"][two] > s["mass_other"][two])
            other = float(s["mass_other"][two].astype(np.float64).sum())
            out["mass_ratio"] = float(s["mass"][two].astype(np.float64).sum()) / other if other > 0 else math.nan
        if self.randomisation_samples:
            for key, name in (("rand_head_spearman", "rand_head"), ("rand_spearman", "rand_all")):
                v = s[name].astype(np.float64)
                v = v[np.isfinite(v)]  # outside the subset (and undefined correlations): NaN
                out[key] = float(v.mean()) if v.size else math.nan
        out[f"ms_per_{self.unit}"] = 1000 * float(s["seconds"].astype(np.float64).sum()) / n if n else math.nan
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per method: ``{"method": name, <column key>: value, ...}``."""
        return [{"method": m, **self.row(m)} for m in self.methods]

    def mean_curves(self) -> dict[str, dict[str, np.ndarray]]:
        """``[method][curve]``: the mean curve in the reported measure (empty without samples)."""
        if len(self) == 0:
            return {}
        return {m: {name: self._curve(m, name).double().mean(dim=0).numpy() for name in self.meta["fractions"]}
                for m in self.methods}

    # ------------------------------------------------------------------ output
    def describe(self) -> str:
        """One line: what was evaluated."""
        m = self.meta
        what = f"{len(self)} {m.get('item_name', 'samples')}"
        if self.kind == "scenes":
            what = f"{m.get('num_samples')} scenes ({len(self)} (scene, class) maps, {int(self.items['two'].sum())} from two-garment scenes)"
        shard = f"; shard {m['shard'][0]}/{m['shard'][1]} (partial)" if m.get("shard") else ""
        return f"{self.task}: {m.get('model', '?')} on {m.get('dataset', '?')}, {what}{shard}"

    def to_markdown(self) -> str:
        """The table as markdown, preceded by what was evaluated and the direction of every column
        (the best value of each column in bold), followed by the columns' definitions."""
        return table.to_markdown(self.describe(), self.columns, self.rows(), self._randomisation_notes())

    def _randomisation_notes(self) -> list[str]:
        """Lines naming the methods with maps left out of ``rand. ρ`` / ``head ρ`` (a constant map:
        no correlation)."""
        if not self.randomisation_samples or not len(self):
            return []
        inside = self.items["index"] < self.randomisation_samples
        notes = []
        n = int(inside.sum())
        for m in self.methods:
            parts = []
            for name, label in (("rand_all", "rand. ρ"), ("rand_head", "head ρ")):
                undefined = int((~np.isfinite(self.samples[m][name].astype(np.float64)[inside])).sum())
                if undefined:
                    parts.append(f"{label} over {n - undefined} of {n} maps")
            if parts:
                notes.append(f"{m}: {', '.join(parts)}")
        return ["", "Randomisation: " + "; ".join(notes) + " (the other maps are constant: no correlation, left out)."] if notes else []

    def to_csv(self, path: str | Path | None = None) -> str:
        """The table as CSV (full precision; ``method`` then the column keys); written to ``path``
        if given. Returns the text."""
        return table.to_csv(self.columns, self.rows(), path)

    def plot_curves(self, path: str | Path | None = None):
        """Mean curves per method (images: positive and negative perturbation, deletion, insertion;
        text: token deletion most and least relevant first) as a matplotlib figure, saved to
        ``path`` if given."""
        panels = table.curve_panels(self.kind, self.meta.get("measures"))
        return table.curves_figure(self.describe(), panels, self.meta["fractions"], self.mean_curves(), self.methods, path)

    def report_data(self) -> dict[str, Any]:
        """What the HTML league shows (:func:`attnx.report.league_html`): the table (NaN as ``None``,
        the best cells named), the columns' definitions and the mean curves, as plain data."""
        rows, columns = self.rows(), self.columns
        best = table.best_values(columns, rows)
        panels = table.curve_panels(self.kind, self.meta.get("measures"))
        curves = self.mean_curves()

        def number(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {
            "title": f"league: {self.task}", "subtitle": self.describe(),
            "columns": [{"key": c.key, "label": c.label, "arrow": c.arrow, "higher": c.higher_is_better,
                         "best_at_zero": c.best_at_zero, "digits": c.digits, "doc": c.doc} for c in columns],
            "rows": [{"method": r["method"], "values": {c.key: number(r[c.key]) for c in columns},
                      "best": [c.key for c in columns if table.is_best(c, r[c.key], best)],
                      "baseline": r["method"] in BASELINES} for r in rows],
            "panels": [{"name": name, "title": title, "ylabel": ylabel,
                        "xlabel": "fraction inserted" if name == "insertion" else "fraction removed"}
                       for name, title, ylabel in panels],
            "fractions": {name: [float(x) for x in self.meta["fractions"][name]] for name, _, _ in panels},
            "curves": {m: {name: [number(float(v)) for v in c] for name, c in by_name.items()} for m, by_name in curves.items()},
            "styles": table.curve_styles(self.methods),
            "notes": [n for n in self._randomisation_notes() if n],
        }

    def to_html(self, path: str | Path | None = None) -> str:
        """The league as a self-contained HTML page (sortable columns, the mean curves); written to
        ``path`` if given. Returns the page."""
        from .. import report

        page = report.report_page(report.league_html(self), title=f"attnx league: {self.task}", heading=False)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def __repr__(self) -> str:
        return f"League({self.describe()}, methods={self.methods})"
