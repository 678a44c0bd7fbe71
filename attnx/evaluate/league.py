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

__all__ = ["BOOTSTRAP", "BOOTSTRAP_SEED", "League"]

#: resamples of the bootstrap standard errors, and the seed that draws them
BOOTSTRAP = 200
BOOTSTRAP_SEED = 0


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
        saco = any("saco" in f for f in self.samples.values())
        completeness = any("completeness" in f for f in self.samples.values())
        return league_columns(self.kind, self.meta.get("measures"), self.randomisation_samples,
                              self.meta.get("item_name", "samples"), saco=saco, completeness=completeness)

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

    def _per_sample(self, method: str) -> dict[str, np.ndarray]:
        """The per-sample quantities the row is computed from (cached): curve areas, SaCo,
        localisation counts and hits, randomisation correlations, seconds."""
        cache = self.__dict__.setdefault("_per_sample_cache", {})
        if method in cache:
            return cache[method]
        s = self.samples[method]
        out: dict[str, np.ndarray] = {}
        if self.kind == "text":
            out["del_most_auc"] = self._auc(method, "most")
            out["del_least_auc"] = self._auc(method, "least")
        else:
            for name in ("pos", "neg"):
                out[f"{name}_auc"] = self._auc(method, name)
                if self.meta["measures"]["perturbation"] == "sigmoid":
                    out[f"{name}_present"] = self._auc(method, name, present=True)
            out["deletion_auc"] = self._auc(method, "deletion")
            out["insertion_auc"] = self._auc(method, "insertion")
        if "saco" in s:
            out["saco"] = s["saco"].astype(np.float64)
        if "completeness" in s:
            out["completeness"] = s["completeness"].astype(np.float64)
        if self.kind == "scenes":
            for k in ("seg_correct", "seg_labeled", "seg_intersection", "seg_union", "seg_ap", "pointing", "mass", "mass_other"):
                out[k] = s[k]
            out["two"] = self.items["two"].astype(bool)
        if self.randomisation_samples and "rand_all" in s:
            out["rand_spearman"] = s["rand_all"].astype(np.float64)
            out["rand_head_spearman"] = s["rand_head"].astype(np.float64)
        out["seconds"] = s["seconds"].astype(np.float64)
        cache[method] = out
        return out

    def _values(self, per: dict[str, np.ndarray], sel: np.ndarray) -> dict[str, float]:
        """The table's numbers over the samples ``sel`` (indices, repeats allowed: the bootstrap)."""

        def mean(a: np.ndarray) -> float:
            a = a[sel].astype(np.float64)
            a = a[np.isfinite(a)]  # undefined values (a constant map's SaCo or correlation): left out
            return float(a.mean()) if a.size else math.nan

        out: dict[str, float] = {}
        for key in ("del_most_auc", "del_least_auc", "pos_auc", "neg_auc", "pos_present", "neg_present",
                    "deletion_auc", "insertion_auc", "saco", "completeness"):
            if key in per:
                out[key] = mean(per[key])
        if self.kind == "scenes":
            n = sel.size
            meter = SegmentationMeter()
            meter.correct = int(per["seg_correct"][sel].astype(np.int64).sum())
            meter.labeled = int(per["seg_labeled"][sel].astype(np.int64).sum())
            meter.intersection = torch.from_numpy(per["seg_intersection"][sel].astype(np.int64).sum(axis=0))
            meter.union = torch.from_numpy(per["seg_union"][sel].astype(np.int64).sum(axis=0))
            meter.ap_sum = float(per["seg_ap"][sel].astype(np.float64).sum())
            meter.images = n
            seg = meter.compute() if n else {"pixel_accuracy": math.nan, "miou": math.nan, "mean_ap": math.nan}
            out["pixel_acc"] = float(seg["pixel_accuracy"])
            out["miou"] = float(seg["miou"])
            out["map"] = float(seg["mean_ap"])
            out["pointing"] = mean(per["pointing"])
            out["mass"] = mean(per["mass"])
            two = sel[per["two"][sel]]
            a, b = per["mass"][two].astype(np.float64), per["mass_other"][two].astype(np.float64)
            out["discrimination"] = float(np.mean(a > b)) if two.size else math.nan
            out["mass_ratio"] = float(a.sum()) / float(b.sum()) if b.sum() > 0 else math.nan
        for key in ("rand_spearman", "rand_head_spearman"):
            if key in per:
                out[key] = mean(per[key])
        out[f"ms_per_{self.unit}"] = 1000 * float(per["seconds"][sel].sum()) / sel.size if sel.size else math.nan
        return out

    def row(self, method: str) -> dict[str, float]:
        """The table row of ``method``: column key -> value, and ``<key>_se`` -> its standard
        error (NaN when there is nothing to average; a method that failed: NaN everywhere).

        The standard error is the standard deviation of the value over :data:`BOOTSTRAP`
        resamples of the samples (with replacement, seed :data:`BOOTSTRAP_SEED`, the same
        resamples for every method); for a mean it agrees with the standard error of the mean.
        """
        if method not in self.samples:  # failed on this model (meta["failed"] says why)
            return {k: math.nan for c in self.columns for k in (c.key, c.key + "_se")}
        per = self._per_sample(method)
        n = len(self)
        out = self._values(per, np.arange(n))
        if n > 1:
            rng = np.random.default_rng(BOOTSTRAP_SEED)
            reps = [self._values(per, rng.integers(0, n, n)) for _ in range(BOOTSTRAP)]
            for key in list(out):
                v = np.array([r[key] for r in reps], dtype=np.float64)
                v = v[np.isfinite(v)]
                out[key + "_se"] = float(v.std(ddof=1)) if v.size > 1 else math.nan
        else:
            out.update({key + "_se": math.nan for key in list(out)})
        for c in self.columns:  # a column this method's saved results lack (rows added later have it): –
            out.setdefault(c.key, math.nan)
            out.setdefault(c.key + "_se", math.nan)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per method (those that failed last): ``{"method": name, <column key>: value,
        <column key>_se: its standard error, ...}``."""
        failed = self.meta.get("failed") or {}
        return [{"method": m, **self.row(m)} for m in self.methods] + [{"method": m, **self.row(m)} for m in failed]

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
        return table.to_markdown(self.describe(), self.columns, self.rows(), self._randomisation_notes() + self._failure_notes())

    def _failure_notes(self) -> list[str]:
        """Lines naming the methods that failed on this model, and why (their rows show –)."""
        failed = self.meta.get("failed") or {}
        return ["", *(f"Failed on this model: {m}: {why}" for m, why in failed.items())] if failed else []

    def _randomisation_notes(self) -> list[str]:
        """Lines naming the methods with maps left out of ``rand. ρ`` / ``head ρ`` (a constant map:
        no correlation)."""
        if not self.randomisation_samples or not len(self):
            return []
        inside = self.items["index"] < self.randomisation_samples
        notes = []
        n = int(inside.sum())
        sanity_row = (self.meta.get("sanity") or {}).get("row")
        for m in [m for m in self.methods if m != sanity_row]:  # the sanity row is not randomised again
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
