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
    md_path, csv_path = t.write(tmp_path, wall=1.0)
    assert csv_path.read_text().splitlines()[0] == "method,saco,saco_se"
    assert md_path.read_text().endswith("Wall time: 1.0 s.\n")
