"""Per-sample results of an evaluation: saved without pickle, loaded, and merged from shards.

Every number of a league is computed from these results, so shards that save them and are merged
by sample index give the league of a single process bit for bit (only the timings differ).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, TypeVar

import numpy as np

from ..errors import AttnxValueError

__all__ = ["FORMAT", "SampleResults", "check_same_samples", "updated_order"]

#: the ``format`` entry of a saved file
FORMAT = "attnx-league-1"

_Results = TypeVar("_Results", bound="SampleResults")


@dataclass
class SampleResults:
    """The per-sample results of every method of an evaluation (or of one shard of it).

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

    def __len__(self) -> int:
        return int(self.items["index"].shape[0]) if "index" in self.items else 0

    @property
    def complete(self) -> bool:
        """Whether every sample of the evaluation is here (not a single shard)."""
        return len(self) == int(self.meta.get("total", -1))

    # ------------------------------------------------------------------ plain forms
    def as_dict(self) -> dict:
        """The results as a dict of plain values and arrays (to send between processes)."""
        return {"task": self.task, "kind": self.kind, "methods": self.methods, "items": self.items,
                "samples": self.samples, "meta": self.meta}

    @classmethod
    def from_dict(cls: type[_Results], d: Mapping) -> _Results:
        """The inverse of :meth:`as_dict`."""
        return cls(d["task"], d["kind"], d["methods"], d["items"], d["samples"], d["meta"])

    # ------------------------------------------------------------------ files
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
    def load(cls: type[_Results], path: str | Path) -> _Results:
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != FORMAT:
                raise AttnxValueError(f"{path} is not a file written by League.save")
            head = json.loads(str(z["league"]))
            items = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("items/")}
            samples: dict[str, dict[str, np.ndarray]] = {m: {} for m in head["methods"]}
            for k in z.files:
                if k.startswith("samples/"):
                    _, m, name = k.split("/", 2)
                    samples.setdefault(m, {})[name] = z[k]
        return cls(head["task"], head["kind"], list(head["methods"]), items, samples, head["meta"])

    # ------------------------------------------------------------------ rows
    def updated(self: _Results, new: SampleResults, references: Iterable[str] = ()) -> _Results:
        """This league with the rows of ``new`` (the same task, samples and protocol, checked)
        put in: a method already here is replaced, a new one added (before the first row of
        ``references`` or the sanity row); ``meta["failed"]`` and ``meta["methods_options"]``
        follow. Every table number is recomputed from the per-sample results, so the league is
        the one a single run of all its methods gives (only the timings differ)."""
        if (new.task, new.kind) != (self.task, self.kind):
            raise AttnxValueError(f"cannot put {new.task}/{new.kind} rows into a {self.task}/{self.kind} league")
        check_same_samples(self.task, self.meta, new.meta, self.items, new.items)
        failed_new = dict(new.meta.get("failed") or {})
        added = [*new.methods, *failed_new]
        samples = {m: f for m, f in self.samples.items() if m not in added}
        samples.update(new.samples)
        failed = {m: why for m, why in (self.meta.get("failed") or {}).items() if m not in added}
        failed.update(failed_new)
        methods = [m for m in updated_order(self.methods, new.methods, references) if m not in failed_new]
        options = {m: o for m, o in (self.meta.get("methods_options") or {}).items() if m not in failed_new}
        options.update(new.meta.get("methods_options") or {})
        meta = dict(self.meta, failed=failed, methods_options=options)
        if new.meta.get("sanity"):  # the sanity row was (re)computed
            meta["sanity"] = new.meta["sanity"]
        return type(self)(self.task, self.kind, methods, dict(self.items), samples, meta)

    # ------------------------------------------------------------------ shards
    @classmethod
    def merge(cls: type[_Results], parts: Iterable[SampleResults], *, allow_partial: bool = False) -> _Results:
        """Combine the results of disjoint shards of one evaluation into one, ordered by sample
        index (the per-sample results are taken as they are, so the merged table is the one a
        single process computes). Raises if the shards come from different evaluations, overlap,
        or (unless ``allow_partial``) do not cover every sample."""
        parts = list(parts)
        if not parts:
            raise AttnxValueError("nothing to merge")
        first = parts[0]
        ref = _comparable(first.meta)
        for p in parts[1:]:
            if (p.task, p.kind, p.methods) != (first.task, first.kind, first.methods):
                raise AttnxValueError(f"cannot merge a {p.task}/{p.kind} league of {p.methods} with a "
                                 f"{first.task}/{first.kind} league of {first.methods}")
            diff = sorted(k for k in set(ref) | set(_comparable(p.meta)) if ref.get(k) != _comparable(p.meta).get(k))
            if diff:
                raise AttnxValueError(f"the shards were run with different settings ({', '.join(diff)}); "
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
            raise AttnxValueError(f"the shards overlap (samples {dup} twice): merge each shard once")
        total = int(meta["total"])
        if index.size != total and not allow_partial:
            shards = sorted({tuple(p.meta["shard"]) for p in parts if p.meta.get("shard")})
            hint = ""
            if shards:
                n = shards[0][1]
                missing = sorted(set(range(n)) - {i for i, _ in shards})
                if missing:
                    hint = f"; missing shard(s) {', '.join(f'{i}/{n}' for i in missing)}"
            raise AttnxValueError(f"the shards hold {index.size} of the {total} samples of this evaluation{hint}")
        return cls(first.task, first.kind, list(first.methods), items, samples, meta)


def _comparable(meta: Mapping) -> dict:
    """The settings that shards of one evaluation share (not which shard, not the thread count)."""
    return {k: v for k, v in meta.items() if k not in ("shard", "threads")}


#: settings that differ between a league and the rows added to it (:meth:`SampleResults.updated`)
ROW_SETTINGS = ("shard", "threads", "methods_options", "failed", "sanity", "seconds_total", "seconds_filter")


def updated_order(methods: list[str], added: list[str], references: Iterable[str] = ()) -> list[str]:
    """The rows of a league after ``added`` are put in: a row already there keeps its place, a new one
    goes before the first reference row (a baseline or a sanity row ``method@...``), else last; a new
    sanity row goes last."""
    refs = set(references)
    out = list(methods)
    for m in added:
        if m in out:
            continue
        at = len(out) if "@" in m else next((i for i, r in enumerate(out) if r in refs or "@" in r), len(out))
        out.insert(at, m)  # a new sanity row goes last
    return out


def check_same_samples(task: str, old_meta: Mapping, new_meta: Mapping, old_items: Mapping, new_items: Mapping,
                       skip: Iterable[str] = ROW_SETTINGS) -> None:
    """Raise (one line) unless the new rows were computed on the league's samples with its protocol:
    the same settings (``meta`` but for ``skip``) and the same per-sample items (sample ids)."""
    skip = set(skip)
    a = {k: v for k, v in old_meta.items() if k not in skip}
    b = {k: v for k, v in new_meta.items() if k not in skip}
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} in the league, {b.get(k)!r} now" for k in diff[:3])
        raise AttnxValueError(f"the {task} league was computed with other settings ({shown}); regenerate it, or update it "
                              "with the settings it was made with")
    for k in sorted(set(old_items) | set(new_items)):
        x, y = old_items.get(k), new_items.get(k)
        same = x is not None and y is not None and np.array_equal(np.asarray(x), np.asarray(y))
        if not same:
            raise AttnxValueError(f"the {task} league holds other samples than this run ({k!r} differs: "
                                  f"{len(x) if x is not None else 0} vs {len(y) if y is not None else 0}); regenerate it")
