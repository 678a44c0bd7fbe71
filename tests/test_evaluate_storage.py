"""Per-sample results: rows put into a saved league (``League.updated``) give the table one run of
every method gives, the completeness column computed from the per-sample errors, and a league of
other samples or settings refused in one line."""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnx.errors import AttnxValueError
from attnx.evaluate import League
from attnx.evaluate.storage import updated_order

FR = [i / 10 for i in range(11)]


def text_league(methods: dict[str, int], n: int = 40, completeness: dict | None = None, labels=None, **meta) -> League:
    """A text league of ``n`` samples whose curves are drawn from each method's seed."""
    samples = {}
    for m, seed in methods.items():
        rng = np.random.default_rng(seed)
        samples[m] = {"most": rng.random((n, 11)).astype(np.float32), "least": rng.random((n, 11)).astype(np.float32),
                      "seconds": np.full(n, 0.01), "target": np.zeros(n, np.int64),
                      "completeness": (completeness or {}).get(m, np.full(n, np.nan))}
    items = {"index": np.arange(n), "sample": np.arange(n), "label": np.asarray(labels if labels is not None else np.zeros(n, np.int64))}
    base = {"task": "text", "kind": "text", "fractions": {"most": FR, "least": FR}, "measures": {"deletion": "probability"},
            "total": n, "num_samples": n, "batch_size": 4, "randomisation": None, "failed": {}, "item_name": "texts",
            "methods_options": {m: {} for m in methods}}
    return League("text", "text", list(methods), items, samples, dict(base, **meta))


def strip_time(csv: str) -> list[list[str]]:
    rows = [line.split(",") for line in csv.splitlines()]
    keep = [i for i, k in enumerate(rows[0]) if not k.startswith("ms_per")]
    return [[r[i] for i in keep] for r in rows]


def test_updated_rows_give_the_league_of_one_run():
    err = np.abs(np.random.default_rng(5).normal(0, 0.1, 40))
    full = text_league({"rollout": 1, "lrp": 2, "random": 3, "ta@random_weights": 4}, completeness={"lrp": err})
    old = text_league({"rollout": 9, "random": 3, "ta@random_weights": 4}, failed={"lrp": "RuntimeError: old"})
    new = text_league({"rollout": 1, "lrp": 2}, completeness={"lrp": err}, sanity=None)
    up = old.updated(new, references=("random", "gradient_x_input"))
    assert up.methods == ["rollout", "lrp", "random", "ta@random_weights"] and up.meta["failed"] == {}
    assert strip_time(up.to_csv()) == strip_time(full.to_csv())  # every number, standard errors included
    row = up.row("lrp")
    assert row["completeness"] == pytest.approx(err.mean())
    assert row["completeness_se"] == pytest.approx(err.std(ddof=1) / math.sqrt(40), rel=0.3)  # the bootstrap SE of a mean
    assert math.isnan(up.row("rollout")["completeness"])
    line = next(r for r in up.to_markdown().splitlines() if r.startswith("| rollout |"))
    assert line.split(" | ")[-2] == "–"  # a method that claims no conservation


def test_a_method_that_fails_now_leaves_the_table_with_its_reason():
    old = text_league({"rollout": 1, "lrp": 2})
    new = text_league({}, failed={"lrp": "TypeError: no longer"})
    up = old.updated(new)
    assert up.methods == ["rollout"] and up.meta["failed"] == {"lrp": "TypeError: no longer"}
    assert "Failed on this model: lrp: TypeError: no longer" in up.to_markdown()


def test_other_samples_or_settings_are_refused():
    old = text_league({"rollout": 1})
    with pytest.raises(AttnxValueError, match="other samples"):
        old.updated(text_league({"lrp": 2}, labels=np.ones(40, np.int64)))
    with pytest.raises(AttnxValueError, match="other settings .*batch_size: 4 in the league, 8 now"):
        old.updated(text_league({"lrp": 2}, batch_size=8))


def test_updated_order():
    assert updated_order(["a", "random", "x@y"], ["b", "a"], ("random",)) == ["a", "b", "random", "x@y"]
    assert updated_order(["a"], ["b"]) == ["a", "b"]
    assert updated_order(["a", "t@random_weights"], ["b"]) == ["a", "b", "t@random_weights"]
    assert updated_order(["a", "random"], ["t@random_weights", "b"], ("random",)) == ["a", "b", "random", "t@random_weights"]


def test_rows_with_completeness_into_a_league_saved_before_the_column(tmp_path):
    old = text_league({"rollout": 1, "random": 3})
    for f in old.samples.values():
        del f["completeness"]  # results saved by a version without the column
    assert "completeness" not in [c.key for c in old.columns]
    err = np.full(40, 0.25)
    up = League.load(old.save(tmp_path / "s.npz")).updated(text_league({"lrp": 2}, completeness={"lrp": err}))
    assert "completeness" in [c.key for c in up.columns]
    assert up.row("lrp")["completeness"] == pytest.approx(0.25) and math.isnan(up.row("rollout")["completeness"])
    assert "| rollout |" in up.to_markdown() and "lrp" in up.to_csv()
