"""SampleTable: mean ± standard error of the mean, written out; NaN left out; failed rows."""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnx.evaluate.columns import Column
from attnx.evaluate.sample_table import SampleTable, mean_and_se


def test_mean_and_se():
    v = np.array([1.0, 2.0, 4.0, np.nan])
    m, se = mean_and_se(v)
    assert m == pytest.approx(7 / 3)
    var = ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2
    assert se == pytest.approx(math.sqrt(var / 3))
    assert math.isnan(mean_and_se(np.array([1.0]))[1]) and math.isnan(mean_and_se(np.array([]))[0])


def test_table(tmp_path):
    cols = [Column("saco", "SaCo", True, "doc")]
    t = SampleTable("demo", "demo title", cols, {"a": {"saco": np.array([0.5, 0.7])}, "b": {"saco": np.array([0.1, 0.1])}},
                    failed={"c": "TypeError: no"})
    md = t.to_markdown()
    assert "| a | **0.600 ± 0.100** |" in md and "| b | 0.100 ± 0.000 |" in md and "| c | – |" in md
    assert "Failed on this model: c: TypeError: no" in md
    md_path, csv_path, npz_path = t.write(tmp_path, wall=1.0)
    assert csv_path.read_text().splitlines()[0] == "method,saco,saco_se"
    assert md_path.read_text().endswith("Wall time: 1.0 s.\n")
    assert npz_path.name == "samples_demo.npz" and SampleTable.load(npz_path).to_csv() == csv_path.read_text()


def small(methods: dict, items=(0, 1, 2), limit=3, failed=None) -> SampleTable:
    cols = [Column("saco", "SaCo", True, "doc"), Column("completeness", "complete. err.", False, "doc")]
    values = {m: {"saco": np.asarray(v, dtype=float), "completeness": np.full(len(v), np.nan)} for m, v in methods.items()}
    return SampleTable("demo", "title", cols, values, dict(failed or {}), ["- a note"],
                       {"scene": np.asarray(items)}, {"limit": limit, "sanity": True})


def test_saved_values_load_back_exactly(tmp_path):
    t = small({"a": [0.25, 0.5, np.nan], "x@random_weights": [0.1, 0.2, 0.3]}, failed={"c": "TypeError: no"})
    back = SampleTable.load(t.save(tmp_path / "s.npz"))
    assert back.methods == t.methods and back.failed == t.failed and back.notes == t.notes and back.meta == t.meta
    assert back.columns == t.columns
    np.testing.assert_array_equal(back.values["a"]["saco"], t.values["a"]["saco"])
    np.testing.assert_array_equal(back.items["scene"], [0, 1, 2])


def test_updated_replaces_adds_and_checks_the_samples():
    old = small({"a": [0.1, 0.2, 0.3], "random": [0.0, 0.0, 0.0], "ta@random_weights": [1.0, 1.0, 1.0]},
                failed={"b": "TypeError: old"})
    new = small({"a": [0.7, 0.8, 0.9], "b": [0.5, 0.5, 0.5], "n": [0.4, 0.2, 0.0]})
    new.meta["sanity"] = False  # the new rows are computed without the sanity row
    up = old.updated(new, references=("random",))
    # replaced in place, the new rows before the references, the failure of b gone now that it ran
    assert up.methods == ["a", "b", "n", "random", "ta@random_weights"] and up.failed == {}
    assert up.row("a")["saco"] == pytest.approx(0.8) and up.row("random")["saco"] == 0.0
    assert up.row("n")["saco_se"] == pytest.approx(np.std([0.4, 0.2, 0.0], ddof=1) / math.sqrt(3))
    assert "| n | 0.200 ± 0.115 | – |" in up.to_markdown()
    from attnx.errors import AttnxValueError

    with pytest.raises(AttnxValueError, match="other samples"):
        old.updated(small({"n": [0.1, 0.2, 0.3]}, items=(0, 1, 3)))
    with pytest.raises(AttnxValueError, match="other settings .*limit: 3 in the league, 4 now"):
        old.updated(small({"n": [0.1, 0.2, 0.3]}, limit=4))
