"""League's standard errors (bootstrap) against the standard error of the mean, and failed methods
as rows that say why, on per-sample results written out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from attnx.evaluate import League


def text_league(n: int = 400, failed: dict | None = None) -> tuple[League, np.ndarray]:
    rng = np.random.default_rng(1)
    fr = [i / 10 for i in range(11)]
    curves = rng.uniform(0, 1, size=(n, 11)).astype(np.float32)
    samples = {"m": {"most": curves, "least": curves[::-1].copy(), "seconds": np.full(n, 0.01)}}
    items = {"index": np.arange(n), "sample": np.arange(n), "label": np.zeros(n, np.int64)}
    meta = {"fractions": {"most": fr, "least": fr}, "measures": {"deletion": "probability"}, "failed": failed or {},
            "total": n}
    # the area under each curve, by the trapezoid rule written out
    auc = ((curves[:, 1:] + curves[:, :-1]) / 2 * 0.1).sum(axis=1)
    return League("text", "text", ["m"], items, samples, meta), auc.astype(np.float64)


def test_bootstrap_standard_error_matches_the_standard_error_of_the_mean():
    lg, auc = text_league()
    row = lg.row("m")
    assert row["del_most_auc"] == pytest.approx(auc.mean(), abs=1e-6)
    sem = auc.std(ddof=1) / math.sqrt(auc.size)
    assert row["del_most_auc_se"] == pytest.approx(sem, rel=0.2)  # 200 resamples: about 5 % noise
    assert lg.row("m") == row  # a fixed seed: the same standard errors every time


def test_failed_method_is_a_row_with_its_reason():
    lg, _ = text_league(20, failed={"broken": "ValueError: no attention on this model"})
    rows = lg.rows()
    assert [r["method"] for r in rows] == ["m", "broken"]
    assert all(math.isnan(v) for k, v in rows[1].items() if k != "method")
    md = lg.to_markdown()
    assert "Failed on this model: broken: ValueError: no attention on this model" in md
    line = next(line for line in md.splitlines() if line.startswith("| broken"))
    assert set(line.strip("| ").split(" | ")[1:]) == {"–"}
    assert "broken,nan,nan" in lg.to_csv()
