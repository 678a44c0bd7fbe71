"""``attnx.report``: what the interactive pages embed (checked against the explanations and the
league computed independently), clear errors, notebooks' ``_repr_html_``, and self-containment.
How the pages behave in a browser is tested in ``test_report_page.py``."""
from __future__ import annotations

import base64
import configparser
import fnmatch
import math
import re
import setuptools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnx
from attnx import report, viz, zoo
from attnx.errors import AttnxValueError
from cli_runner import run
from conftest import TEXT
from html_pages import page_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenes():
    loaded = zoo.vision_model()
    images = loaded.preprocess(zoo.scenes(3).images)
    explainer = attnx.Explainer(loaded.model)
    es = {m: explainer(images, method=m) for m in ("rollout", "generic", "lrp")}
    coat = {m: explainer(images, method=m, target=4) for m in ("rollout", "lrp")}
    return loaded, images, es, coat


def assert_values(page_values, tensor):
    """The page's numbers are the tensor's to 7 significant digits."""
    a, b = np.asarray(page_values, dtype=np.float64), tensor.detach().double().numpy()
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12 * max(1.0, np.abs(b).max()))


def test_image_view_embeds_every_method_and_target(scenes):
    loaded, images, es, coat = scenes
    html = report.explanation_html({"predicted": list(es.values()), "Coat": list(coat.values())}, images,
                                   class_names=loaded.class_names, mean=loaded.mean, std=loaded.std, multi_label=True)
    (d,) = page_data(html)
    assert d["kind"] == "image" and d["methods"] == ["rollout", "generic", "lrp"] and d["targets"] == ["predicted", "Coat"]
    assert d["size"] == [64, 64] and d["grid"] == [8, 8] and (d["a"], d["b"]) == ("rollout", "generic")
    assert set(d["entries"]["generic"]) == {"predicted"}  # not computed for Coat: the page says so
    for m, e in es.items():
        for i, row in enumerate(d["entries"][m]["predicted"]):
            assert_values(row["scores"], e.scores[i])
            assert row["label"] == viz.target_label(e, i, loaded.class_names, multi_label=True)
    for i, row in enumerate(d["entries"]["rollout"]["Coat"]):
        assert row["label"].startswith("Coat (p=")
        assert_values(row["scores"], coat["rollout"].scores[i])
    # pixel-level maps: relevance over the 99th percentile of its |value|, on [-1, 1], as the colour-table
    # index of the diverging map (zero mid-scale)
    q = np.frombuffer(base64.b64decode(d["entries"]["lrp"]["predicted"][1]["pixels"]), dtype=np.uint8).reshape(64, 64)
    px = es["lrp"].pixel_relevance[1].double().numpy()
    v = np.clip(px / np.quantile(np.abs(px), 0.99), -1, 1)
    np.testing.assert_array_equal(q, np.clip(np.floor((v + 1) * 128), 0, 255))
    assert d["cmap"] == "RdBu_r"
    assert "pixels" not in d["entries"]["rollout"]["predicted"][0]  # patch maps are drawn from the scores
    # the images, as the pictures show them
    png = base64.b64decode(d["samples"][2]["image"].split(",", 1)[1])
    import io

    shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(shown, (viz.to_rgb(images[2], loaded.mean, loaded.std) * 255).round().astype(np.uint8))
    # jet as matplotlib has it: entry k is the colour of [k/256, (k+1)/256)
    import matplotlib

    jet = np.frombuffer(bytes.fromhex(d["colormaps"]["jet"]), dtype=np.uint8).reshape(256, 3)
    for v in (0.0, 0.3, 0.77, 1.0):
        k = min(255, math.floor(v * 256))
        np.testing.assert_array_equal(jet[k], (np.asarray(matplotlib.colormaps["jet"](v)[:3]) * 255).round())


def test_unlabelled_explanations_are_named_by_their_target(scenes):
    loaded, images, es, coat = scenes
    (d,) = page_data(report.explanation_html([es["rollout"], coat["rollout"]], images, class_names=loaded.class_names))
    assert d["targets"] == ["predicted", "Coat"] and d["methods"] == ["rollout"]
    assert report.target_name(coat["rollout"]) == "class 4"


def test_maps_alone_without_images_and_repr_html(scenes):
    loaded, images, es, _ = scenes
    html = es["generic"]._repr_html_()
    (d,) = page_data(html)
    assert d["samples"][0]["image"] is None and d["opacity"] == 1.0
    assert "draws them over the images" in d["subtitle"]
    assert html.lstrip().startswith('<div class="attnx"') and "<html" not in html  # a fragment for a cell
    assert_values(d["entries"]["generic"]["predicted"][0]["scores"], es["generic"].scores[0])


def test_text_view_tokens_scales_and_the_explained_token():
    case = TEXT[0]
    model, x = case.model(), case.inputs(2, lengths=[9, 5])
    explainer = attnx.Explainer(model)
    e = explainer(x, method="generic")
    other = explainer(x, method="rollout", target=2)
    (d,) = page_data(report.explanation_html([e, other]))
    assert d["kind"] == "text" and d["targets"] == ["predicted", "class 2"]
    first, second = d["sentences"]
    assert len(first["tokens"]) == 9 and len(second["tokens"]) == 5  # padding is not shown
    assert second["tokens"] == [f"#{i}" for i in x["input_ids"][1, :5].tolist()]  # ids without a tokenizer
    assert first["readout"] == 0 == e.layout.readout  # BERT reads [CLS]
    row = d["entries"]["generic"]["predicted"][1]
    assert_values(row["scores"], e.scores[1, :5])
    assert row["scale"] == pytest.approx(float(e.scores[1, :5].abs().max()), rel=1e-6)  # no special tokens known


def test_non_finite_and_constant_maps_are_said(scenes):
    loaded, images, es, _ = scenes
    e = es["rollout"]
    bad = type(e)(**{**e.__dict__, "scores": e.scores.clone(), "method": "broken"})
    bad.scores[0, 3] = float("nan")
    bad.scores[1] = 0.25
    with pytest.warns(RuntimeWarning, match="non-finite"):
        (d,) = page_data(report.explanation_html(bad, images))
    rows = d["entries"]["broken"]["predicted"]
    assert rows[0]["note"].startswith("non-finite") and rows[0]["scores"][3] == 0
    assert rows[1]["note"].startswith("constant map") and rows[2]["note"] == ""


def test_bad_inputs_are_one_clear_line(scenes):
    loaded, images, es, _ = scenes
    with pytest.raises(AttnxValueError, match="not of the same batch"):
        report.explanation_html([es["rollout"], attnx.Explainer(loaded.model)(images[:2], method="generic")])
    with pytest.raises(AttnxValueError, match="two explanations of method 'rollout'"):
        report.explanation_html([es["rollout"], es["rollout"]])
    with pytest.raises(AttnxValueError, match=r"images: expected the \(3, C, H, W\) batch"):
        report.explanation_html(es["rollout"], images[:1])
    with pytest.raises(AttnxValueError, match="compare: expected one or two of the methods"):
        report.explanation_html(list(es.values()), images, compare=["rollout", "flow"])
    with pytest.raises(AttnxValueError, match="at least one explanation"):
        report.explanation_html([])


def test_page_is_self_contained_and_escapes_its_data(scenes, tmp_path):
    loaded, images, es, _ = scenes
    names = ["</script><script>alert(1)</script>", "b & c", "d"]
    path = report.write_report(tmp_path / "r.html", list(es.values()), images, names=names)
    page = path.read_text()
    assert page.count("</script>") == page.count("<script")  # the names did not close an element
    assert page_data(page)[0]["samples"][0]["name"] == names[0]
    # nothing to fetch: no external script, style sheet, font, image or frame
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\((?!data:)|<link|<iframe""", page, re.I)


def test_templates_ship_as_package_data():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["attnx.report"].split(",")]
    report = ROOT / "attnx" / "report"
    files = [p.relative_to(report).as_posix() for p in (report / "templates").iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files)
    include = [p.strip() for p in cfg["options.packages.find"]["include"].split(",")]
    assert "attnx.report" in setuptools.find_packages(ROOT, include=include)


def test_cli_image_report_holds_every_method_and_class(capsys, tmp_path):
    out = tmp_path / "maps.html"
    status, stdout, err = run(capsys, "explain", "--num-scenes", "2", "--method", "rollout,grad_rollout",
                              "--target", "coat", "bag", "--out", str(out), "--quiet")
    assert status == 0, err
    assert stdout.strip() == f"wrote {out}"
    (d,) = page_data(out.read_text())
    assert d["methods"] == ["rollout", "grad_rollout"] and d["targets"] == ["Coat", "Bag"]
    loaded = zoo.vision_model()
    images = loaded.preprocess(zoo.scenes(2).images)
    e = attnx.Explainer(loaded.model)(images, method="grad_rollout", target=8)  # computed here, independently
    for i in range(2):
        assert_values(d["entries"]["grad_rollout"]["Bag"][i]["scores"], e.scores[i])


# ------------------------------------------------------------------------------------------------
# the league
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def league():
    from attnx.evaluate import evaluate

    return evaluate("vision", ["rollout", "generic"], limit=4, batch_size=4, deletion_steps=4, progress=False,
                    randomisation_samples=2)


def test_league_page_holds_the_table_and_the_curves(league, tmp_path):
    page = league.to_html(tmp_path / "league.html")
    assert (tmp_path / "league.html").read_text() == page
    (d,) = page_data(page)
    assert d["kind"] == "league" and [r["method"] for r in d["rows"]] == league.methods
    assert [c["key"] for c in d["columns"]] == [c.key for c in league.columns]
    for r, expected in zip(d["rows"], league.rows()):
        for c in league.columns:
            v = expected[c.key]
            assert (r["values"][c.key] is None) if math.isnan(v) else r["values"][c.key] == pytest.approx(v)
    # the bold cells are the markdown table's
    md = league.to_markdown().splitlines()
    header = next(line for line in md if line.startswith("| method"))
    labels = [h.strip().rsplit(" ", 1)[0] for h in header.strip("|").split("|")[1:]]
    for r in d["rows"]:
        line = next(line for line in md if line.startswith(f"| {r['method']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        bold = {d["columns"][k]["key"] for k, c in enumerate(cells) if c.startswith("**")}
        assert set(r["best"]) == bold, (r["method"], labels)
    curves = league.mean_curves()
    for m in league.methods:
        for p in d["panels"]:
            assert_values(d["curves"][m][p["name"]], torch.from_numpy(curves[m][p["name"]]))
    assert d["styles"]["random"]["dash"] and not d["styles"]["rollout"]["dash"]  # baselines drawn as references


def test_cli_evaluate_writes_the_html_league(capsys, tmp_path):
    status, stdout, err = run(capsys, "evaluate", "--limit", "2", "--methods", "rollout", "--randomisation-samples", "0",
                              "--no-baselines", "--out", str(tmp_path), "--quiet")
    assert status == 0, err
    assert f"wrote {tmp_path / 'league_vision.html'}" in stdout
    (d,) = page_data((tmp_path / "league_vision.html").read_text())
    assert [r["method"] for r in d["rows"]] == ["rollout"]
