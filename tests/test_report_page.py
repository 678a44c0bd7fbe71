"""The interactive pages in a real headless browser (Debian's chromium + chromedriver, driven by
selenium): they load from ``file://`` with no console error and no request beyond the page itself,
the map on screen is the explanation drawn (canvas pixels against the heat map, colour map and
opacity computed here), switching method, target, colour map, opacity and image redraws it, and the
read-outs under the pointer give the values of the Explanation for a known patch and a known token.
The league page sorts its columns by their direction and draws its curves from the numbers.

Skipped, with the reason, where chromium, chromedriver or selenium is missing (``.ci/run`` installs
them: ``apt-get install chromium chromium-driver``, ``pip install selenium``).
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

import attnx
from attnx import report, viz, zoo
from attnx.viz.scale import image_maps
from conftest import TEXT
from html_pages import assert_clean, open_page

pytestmark = pytest.mark.browser

def canvas(driver, element) -> np.ndarray:
    """The ``(H, W, 3)`` pixels of a canvas."""
    data = driver.execute_script(
        "const c = arguments[0]; return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]",
        element)
    w, h, rgba = data
    return np.asarray(rgba, dtype=np.float64).reshape(h, w, 4)[..., :3]


def drawn(e, i: int, rgb: np.ndarray, alpha: float, cmap: str = "RdBu_r") -> np.ndarray:
    """What a page must show: the image blended with matplotlib's ``cmap`` of the drawn heat map
    (the pictures' rule: in [-1, 1], zero mid-scale)."""
    import matplotlib

    table = (matplotlib.colormaps[cmap](np.arange(256))[:, :3] * 255).round()
    heat = image_maps(e, rgb.shape[:2])[0][i].double().numpy()
    grey = (rgb @ np.array([0.299, 0.587, 0.114]))[..., None]  # the image in grey under the map
    return np.round((1 - alpha) * grey + alpha * table[np.clip(np.floor((heat + 1) * 128), 0, 255).astype(int)])


def assert_shows(shown: np.ndarray, expected: np.ndarray) -> None:
    """Equal but for rounding; a pixel whose heat value sits on the edge of a colour-table entry
    (float32 here, float64 in the page) may take the neighbouring entry."""
    diff = np.abs(shown - expected).max(-1)
    assert (diff <= 1).mean() > 0.995 and diff.max() <= 12, f"{(diff > 1).sum()} pixels differ, by up to {diff.max()}"


def choose(driver, root, cls: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(root.find_element(By.CSS_SELECTOR, f"select.{cls}")).select_by_value(value)


def point_at(driver, element, fx: float, fy: float) -> None:
    """Move the pointer to the fraction ``(fx, fy)`` of ``element``'s box."""
    from selenium.webdriver.common.action_chains import ActionChains

    r = driver.execute_script("const b = arguments[0].getBoundingClientRect(); return [b.width, b.height]", element)
    ActionChains(driver).move_to_element_with_offset(element, round((fx - 0.5) * r[0]), round((fy - 0.5) * r[1])).perform()


def number(text: str, after: str) -> float:
    return float(re.search(re.escape(after) + r"\s*([-+]?[0-9.]+(?:e[-+]?\d+)?)", text).group(1))


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    loaded = zoo.vision_model()
    images = loaded.preprocess(zoo.scenes(3).images)
    explainer = attnx.Explainer(loaded.model)
    es = {(m, "predicted"): explainer(images, method=m) for m in ("rollout", "generic", "lrp")}
    es.update({(m, "Bag"): explainer(images, method=m, target=8) for m in ("rollout", "generic", "lrp")})
    groups = {t: [e for (m, tt), e in es.items() if tt == t] for t in ("predicted", "Bag")}
    kw = dict(class_names=loaded.class_names, mean=loaded.mean, std=loaded.std, multi_label=True)
    path = tmp_path_factory.mktemp("pages") / "report.html"
    text_case = TEXT[0]
    x = text_case.inputs(2, lengths=[9, 6])
    text_e = attnx.Explainer(text_case.model())(x, method="generic")
    # two views in one page: each finds its own data (ids are unique)
    path.write_text(report.report_page(report.explanation_html(groups, images, **kw), report.explanation_html(text_e)))
    rgb = [(viz.to_rgb(images[i], loaded.mean, loaded.std) * 255).round().astype(np.float64) for i in range(3)]
    return path, es, rgb


def view(driver, kind: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f".attnx[data-kind={kind}]")


def panel(root, slot: str):
    from selenium.webdriver.common.by import By

    return root.find_element(By.CSS_SELECTOR, f".ax-panel[data-slot={slot}]")


def test_page_loads_from_disk_offline_without_errors(browser, vision):
    path, _, _ = vision
    open_page(browser, path)
    assert_clean(browser)
    assert browser.execute_script("return document.querySelectorAll('.attnx').length") == 2


def test_the_map_on_screen_is_the_explanation_drawn(browser, vision):
    from selenium.webdriver.common.by import By

    path, es, rgb = vision
    open_page(browser, path)
    root = view(browser, "image")
    a, b = (panel(root, s).find_element(By.CSS_SELECTOR, "canvas.ax-map") for s in "ab")
    assert_shows(canvas(browser, a), drawn(es["rollout", "predicted"], 0, rgb[0], 0.5))
    assert_shows(canvas(browser, b), drawn(es["generic", "predicted"], 0, rgb[0], 0.5))
    before = canvas(browser, a)
    choose(browser, root, "ax-method-a", "lrp")  # a pixel-level method: its own map
    after = canvas(browser, a)
    assert np.abs(after - before).max() > 50 and panel(root, "a").get_attribute("data-method") == "lrp"
    assert_shows(after, drawn(es["lrp", "predicted"], 0, rgb[0], 0.5))
    choose(browser, root, "ax-target", "Bag")  # another class: another map
    bag = canvas(browser, a)
    assert np.abs(bag - after).max() > 50
    assert_shows(bag, drawn(es["lrp", "Bag"], 0, rgb[0], 0.5))
    assert panel(root, "a").find_element(By.CSS_SELECTOR, ".ax-plabel").text.startswith("Bag (p=")
    choose(browser, root, "ax-cmap", "viridis")
    slider = root.find_element(By.CSS_SELECTOR, "input.ax-opacity")
    browser.execute_script("arguments[0].value = '0.8'; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert_shows(canvas(browser, a), drawn(es["lrp", "Bag"], 0, rgb[0], 0.8, "viridis"))
    root.find_element(By.CSS_SELECTOR, ".ax-sample[data-index='2']").click()  # another image
    assert_shows(canvas(browser, b), drawn(es["generic", "Bag"], 2, rgb[2], 0.8, "viridis"))
    # every method at a glance: a click shows it as A
    root.find_element(By.CSS_SELECTOR, ".ax-thumb[data-method='rollout']").click()
    assert_shows(canvas(browser, a), drawn(es["rollout", "Bag"], 2, rgb[2], 0.8, "viridis"))
    assert_clean_console(browser)


def assert_clean_console(driver) -> None:
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors


@pytest.mark.parametrize("sample, row, col", [(0, 3, 4), (1, 6, 1)])
def test_hover_reads_out_the_patch_score(browser, vision, sample, row, col):
    from selenium.webdriver.common.by import By

    path, es, _ = vision
    open_page(browser, path)
    root = view(browser, "image")
    root.find_element(By.CSS_SELECTOR, f".ax-sample[data-index='{sample}']").click()
    stage = panel(root, "a").find_element(By.CSS_SELECTOR, ".ax-stage")
    px, py = 8 * col + 2, 8 * row + 5  # a pixel of patch (row, col) of the 8x8 grid of the 64x64 image
    point_at(browser, stage, (px + 0.5) / 64, (py + 0.5) / 64)
    for slot, method in (("a", "rollout"), ("b", "generic")):
        text = panel(root, slot).find_element(By.CSS_SELECTOR, ".ax-readout").text
        assert f"patch ({row}, {col})" in text, text
        expected = float(es[method, "predicted"].scores[sample, row * 8 + col])
        assert number(text, "score") == pytest.approx(expected, rel=6e-4), text  # 4 significant digits
        heat = image_maps(es[method, "predicted"], (64, 64))[0][sample]
        assert number(text, "map") == pytest.approx(float(heat[py, px]), abs=0.006), text
    assert_clean_console(browser)


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text(tmp_path_factory):
    case = TEXT[0]
    model, x = case.model(), case.inputs(3, lengths=[9, 7, 4])
    explainer = attnx.Explainer(model)
    es = {(m, t): explainer(x, method=m, target=None if t == "predicted" else 3)
          for m in ("generic", "rollout") for t in ("predicted", "class 3")}
    path = tmp_path_factory.mktemp("text") / "text.html"
    report.write_report(path, {t: [es[m, t] for m in ("generic", "rollout")] for t in ("predicted", "class 3")})
    return path, es, x


def token(root, slot: str, s: int, t: int):
    from selenium.webdriver.common.by import By

    return root.find_element(By.CSS_SELECTOR, f"td.ax-cell[data-slot={slot}] .ax-tok[data-s='{s}'][data-t='{t}']")


def background(driver, element) -> tuple[float, ...]:
    value = driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor", element)
    return tuple(float(v) for v in re.findall(r"[\d.]+", value))


def expected_colour(e, s: int, t: int, length: int, intensity: float = 0.85) -> tuple[float, ...]:
    """rgba of a token: green (for) / red (against) at its relevance over the sentence's largest
    |relevance|; compared with abs=5e-3: browsers keep alpha in steps of 1/255."""
    scores = e.scores[s, :length].double()
    v = float(scores[t] / scores.abs().max())
    return (0, 160, 0, min(abs(v), 1) * intensity) if v >= 0 else (220, 0, 0, min(abs(v), 1) * intensity)


def test_text_page_tokens_colours_and_target_switch(browser, text):
    from selenium.webdriver.common.by import By

    path, es, x = text
    open_page(browser, path)
    assert_clean(browser)
    root = view(browser, "text")
    lengths = x["attention_mask"].sum(1).tolist()
    for s, n in enumerate(lengths):  # every real token once per column, no padding
        assert len(root.find_elements(By.CSS_SELECTOR, f"td.ax-cell[data-slot=a] .ax-tok[data-s='{s}']")) == n
        explained = root.find_elements(By.CSS_SELECTOR, f"td.ax-cell[data-slot=a] .ax-tok.ax-explained[data-s='{s}']")
        assert [int(t.get_attribute("data-t")) for t in explained] == [0]  # BERT reads [CLS]: it is marked
    for s, t in ((0, 4), (1, 2), (2, 3), (0, 8), (1, 6)):
        got = background(browser, token(root, "a", s, t))
        assert got == pytest.approx(expected_colour(es["generic", "predicted"], s, t, lengths[s]), abs=5e-3)
    choose(browser, root, "ax-target", "class 3")
    for s, t in ((0, 4), (1, 2), (2, 3), (0, 8), (1, 6)):
        assert background(browser, token(root, "a", s, t)) == pytest.approx(
            expected_colour(es["generic", "class 3"], s, t, lengths[s]), abs=5e-3)
        assert background(browser, token(root, "b", s, t)) == pytest.approx(
            expected_colour(es["rollout", "class 3"], s, t, lengths[s]), abs=5e-3)
    assert_clean_console(browser)


@pytest.mark.parametrize("s, t", [(0, 5), (2, 1)])
def test_hover_reads_out_the_token_score(browser, text, s, t):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path, es, x = text
    open_page(browser, path)
    root = view(browser, "text")
    ActionChains(browser).move_to_element(token(root, "a", s, t)).perform()
    where = root.find_element(By.CSS_SELECTOR, ".ax-where").text
    assert where.startswith(f"sentence {s + 1}, token {t} ")
    n = int(x["attention_mask"][s].sum())
    for slot, method in (("a", "generic"), ("b", "rollout")):
        text_shown = root.find_element(By.CSS_SELECTOR, f".ax-value[data-slot={slot}]").text
        scores = es[method, "predicted"].scores[s, :n].double()
        assert number(text_shown, f"{method}:") == pytest.approx(float(scores[t]), rel=6e-4), text_shown
        assert number(text_shown, "(") == pytest.approx(float(scores[t] / scores.abs().max()), abs=6e-4), text_shown
    # the same token is outlined in both columns
    assert "ax-hover" in token(root, "b", s, t).get_attribute("class")
    assert_clean_console(browser)


# ------------------------------------------------------------------------------------------------
# the league
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def league_page(tmp_path_factory):
    from attnx.evaluate import evaluate

    league = evaluate("vision", ["rollout", "generic"], limit=4, batch_size=4, deletion_steps=4, progress=False,
                      randomisation_samples=0)
    path = tmp_path_factory.mktemp("league") / "league.html"
    league.to_html(path)
    return path, league


def order(root) -> list[str]:
    from selenium.webdriver.common.by import By

    return [tr.get_attribute("data-method") for tr in root.find_elements(By.CSS_SELECTOR, "table.ax-league tbody tr")]


def test_league_columns_sort_by_their_direction(browser, league_page):
    from selenium.webdriver.common.by import By

    path, league = league_page
    open_page(browser, path)
    assert_clean(browser)
    root = view(browser, "league")
    rows = {r["method"]: r for r in league.rows()}
    assert order(root) == league.methods
    for key, higher in (("deletion_auc", False), ("insertion_auc", True), ("pointing", True)):
        header = root.find_element(By.CSS_SELECTOR, f"th[data-key={key}]")
        header.click()
        best_first = sorted(league.methods, key=lambda m: (math.isnan(rows[m][key]), -rows[m][key] if higher else rows[m][key]))
        assert order(root) == best_first, key
        header.click()  # again: reversed (missing values stay last)
        assert order(root) == sorted(league.methods, key=lambda m: (math.isnan(rows[m][key]), rows[m][key] if higher else -rows[m][key]))


def test_league_curves_are_drawn_from_the_numbers(browser, league_page):
    from selenium.webdriver.common.by import By

    path, league = league_page
    open_page(browser, path)
    root = view(browser, "league")
    curves = league.mean_curves()
    for name in ("pos", "deletion", "insertion"):
        svg = root.find_element(By.CSS_SELECTOR, f"svg[data-panel={name}]")
        lines = svg.find_elements(By.CSS_SELECTOR, "polyline")
        assert sorted(line.get_attribute("data-method") for line in lines) == sorted(league.methods)
        for line in lines:
            values = curves[line.get_attribute("data-method")][name]
            points = np.asarray([[float(v) for v in p.split(",")] for p in line.get_attribute("points").split()])
            assert len(points) == len(values) == len(league.meta["fractions"][name])
            # y is an affine, decreasing function of the value (one scale per panel, up is more)
            slope = np.polyfit(values, points[:, 1], 1)[0]
            assert slope < 0 and np.abs(np.polyval(np.polyfit(values, points[:, 1], 1), values) - points[:, 1]).max() < 0.2
    # the value under the pointer: the curves at the nearest fraction
    svg = root.find_element(By.CSS_SELECTOR, "svg[data-panel=deletion]")
    xs = league.meta["fractions"]["deletion"]
    k = len(xs) // 2
    left, right = 48, 430 - 12  # the plot area inside the SVG (its margins)
    point_at(browser, svg, (left + (xs[k] - xs[0]) / (xs[-1] - xs[0]) * (right - left)) / 430, 0.5)
    shown = svg.find_element(By.XPATH, "..").find_element(By.CSS_SELECTOR, ".ax-readout").text
    assert shown.startswith(f"{xs[k]}: ")
    for m in league.methods:
        assert f"{m} {curves[m]['deletion'][k]:.3f}" in shown, shown
    assert_clean_console(browser)
