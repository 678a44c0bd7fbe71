"""The explained answer's views: the interactive page (data, escaping, and in a real browser: pointing
at an answer token colours the context with the colours computed here), the PNG heat view and the
``attnx explain --generate`` command."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from attnx import report
from attnx.errors import AttnxValueError
from attnx.core.generation import explain_generation
from decoder_models import DecoderCase
from html_pages import assert_clean, open_page, page_data

PROMPT = [1, 7, 23, 41, 9, 15]
ANSWER = [33, 4, 18]
#: token text that would be markup if it were inserted as HTML
HOSTILE = {2: '<img src=x onerror="document.title=1">', 3: "</script><b>bold</b>", 7: "&amp; \"quoted\""}


@pytest.fixture(scope="module")
def answers():
    model = DecoderCase("llama", "lm", "eager").model()
    out = []
    for method in ("generic", "lrp"):
        g = explain_generation(model, None, PROMPT, method=method, continuation=ANSWER)
        tokens = [HOSTILE.get(j, t) for j, t in enumerate(g.tokens)]
        out.append(dataclasses.replace(g, tokens=tokens, sinks=[0, 4]))
    return out


def rdbu(x: float) -> str:
    """The colour of ``x`` in [-1, 1] as matplotlib's imshow(vmin=-1, vmax=1) gives it, as CSS."""
    import matplotlib

    k = min(255, max(0, int(np.floor((x + 1) / 2 * 256))))
    r, g, b = (np.asarray(matplotlib.colormaps["RdBu_r"](k)[:3]) * 255).round().astype(int)
    return f"rgb({r}, {g}, {b})"


def test_page_data_and_escaping(tmp_path, answers):
    path = report.write_answer_page(tmp_path / "a.html", answers, page_title="<answer> & co")
    page = path.read_text()
    assert "<title>&lt;answer&gt; &amp; co</title>" in page
    assert "<img" not in page and "<b>bold" not in page  # token text only as escaped JSON
    (data,) = page_data(page)
    assert data["tokens"][2] == HOSTILE[2] and data["methods"] == ["generic", "lrp"]
    rows = data["entries"]["lrp"]["rows"]
    assert rows[1][len(PROMPT) + 1] is None  # unseen context: null, not NaN
    assert rows[1][: len(PROMPT) + 1] == pytest.approx(answers[1].matrix[1, : len(PROMPT) + 1].tolist(), rel=1e-6)
    assert data["sinks"][:5] == [True, False, False, False, True]
    with pytest.raises(AttnxValueError, match="same prompt and answer"):
        report.answer_html([answers[0], dataclasses.replace(answers[1], prompt_length=5)])


@pytest.mark.browser
def test_the_page_in_a_browser(tmp_path, browser, answers):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path = report.write_answer_page(tmp_path / "a.html", answers, page_title="attnx answer page")
    open_page(browser, path)
    assert browser.title == "attnx answer page"  # the hostile token did not run
    spans = browser.find_elements(By.CSS_SELECTOR, ".ax-answer-text .ax-tok")
    assert [s.text for s in spans][2:4] == [HOSTILE[2], HOSTILE[3]]
    assert not browser.find_elements(By.CSS_SELECTOR, ".ax-answer-text img, .ax-answer-text b")
    T0 = len(PROMPT)

    def backgrounds():
        return [browser.execute_script("return arguments[0].style.backgroundColor", s) for s in spans]

    def expected(g, k, include_sinks=False, span=False):
        row = (g.span_scores if span else g.matrix[k]).tolist()
        n = T0 if span else T0 + k
        keep = [j for j in range(n) if include_sinks or j not in g.sinks]
        scale = max(abs(row[j]) for j in keep)
        return [rdbu(row[j] / scale) if j in keep else "" for j in range(n)]

    for method, g in zip(("generic", "lrp"), answers):
        browser.execute_script("const s = arguments[0]; s.value = arguments[1]; s.dispatchEvent(new Event('change'))",
                               browser.find_element(By.CSS_SELECTOR, "select.ax-method"), method)
        for k in range(len(ANSWER)):
            ActionChains(browser).move_to_element(spans[T0 + k]).perform()
            shown = backgrounds()
            assert shown[: T0 + k] == expected(g, k), (method, k)
            assert all(c == "" for c in shown[T0 + k:])  # the token itself and what follows: not coloured
            unseen = browser.find_elements(By.CSS_SELECTOR, ".ax-unseen")
            assert len(unseen) == len(spans) - (T0 + k)
            readout = browser.find_element(By.CSS_SELECTOR, ".ax-readout").text
            share = 100 * float(g.sink_share[k])
            assert f"{share:.0f} % of |relevance|" in readout
    g = answers[1]
    spans[T0 + 2].click()  # pinned: stays when the pointer moves to the prompt
    ActionChains(browser).move_to_element(spans[1]).perform()
    point = browser.find_element(By.CSS_SELECTOR, ".ax-point").text
    assert point.startswith(f'"{g.tokens[1]}" at 1: ') and re.search(r"at 1: [+-]\d", point), point
    browser.find_element(By.CSS_SELECTOR, "input.ax-include-sinks").click()
    assert backgrounds()[: T0 + 2] == expected(g, 2, include_sinks=True)
    browser.find_element(By.CSS_SELECTOR, "button.ax-whole").click()
    ActionChains(browser).move_to_element(browser.find_element(By.CSS_SELECTOR, ".ax-title")).perform()
    assert backgrounds()[:T0] == expected(g, 0, include_sinks=True, span=True)
    assert_clean(browser)


def test_png_view(tmp_path, answers):
    from attnx.viz.generation import generation_figure, sink_caption

    fig = generation_figure(answers)
    axes = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in axes] == ["generic", "lrp"]
    image = axes[1].images[0].get_array()
    g = answers[1]
    expected = g.scaled().numpy()
    expected[:, g.sinks] = np.nan  # hatched, out of the colour scale
    np.testing.assert_allclose(np.ma.filled(image, np.nan), expected, rtol=1e-12)
    assert axes[1].images[0].get_clim() == (-1, 1) and axes[1].images[0].get_cmap().name.startswith("RdBu_r")
    labels = [t.get_text() for t in axes[1].get_xticklabels()]
    assert labels[2] == HOSTILE[2][:15] + "…" and labels[7] == HOSTILE[7]  # long ones cut
    assert f"{100 * float(g.sink_share.mean()):.0f} %" in sink_caption(g, False)
    assert axes[1].get_xlabel() == sink_caption(g, False)
    assert len(fig.axes) == 4  # two panels, two colour bars
    with_sinks = generation_figure(answers, include_sinks=True)
    image = [ax for ax in with_sinks.axes if ax.get_title(loc="left")][1].images[0].get_array()
    np.testing.assert_allclose(np.ma.filled(image, np.nan), g.scaled(include_sinks=True).numpy(), rtol=1e-12)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_command_writes_the_page_and_the_picture(tmp_path, capsys):
    from attnx.cli import main

    out = tmp_path / "answer.html"
    assert main(["explain", "--model", "default-lm", "--text", "the movie was", "--generate", "2",
                 "--method", "generic,lrp", "--out", str(out)]) == 0
    (data,) = page_data(out.read_text())
    assert data["methods"] == ["generic", "lrp"] and len(data["probabilities"]) == 2
    printed = capsys.readouterr().out
    assert "answer: " in printed and "[lrp] first and special tokens hold" in printed
    png = tmp_path / "answer.png"
    assert main(["explain", "--model", "default-lm", "--text", "the movie was", "--generate", "2",
                 "--method", "generic", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["explain", "--model", "default-lm", "--text", "the movie was", "--chat", "--out", str(tmp_path / "c.html")]) == 2  # no chat template
    assert "chat template" in capsys.readouterr().err
    # user mistakes: one line on stderr and exit status 2, before a model is loaded
    assert main(["explain", "--model", "default-lm", "--text", "a", "b", "--generate", "2"]) == 2
    assert "one --text" in capsys.readouterr().err
    assert main(["explain", "--model", "default-lm", "--text", "a", "--generate", "2", "--out", str(tmp_path / "a.txt")]) == 2
    err = capsys.readouterr().err
    assert "HTML" in err and "not as .txt" in err and len(err.strip().splitlines()) == 1
