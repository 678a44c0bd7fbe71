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

__all__ = ["FORMAT", "SampleResults"]

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
