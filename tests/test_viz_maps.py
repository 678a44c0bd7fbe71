"""The pictures read at a glance: signed maps on a diverging colour map centred at zero, colour bars,
degenerate maps named in the panel, every registered method in the method figure, one colour scale
for text (special tokens never set it), a <title> on text pages, the model's own probability and
class names; and the compact grid of methods x sentences and the word-piece display."""
from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch

import attnx
from attnx import viz
from attnx.core.explanation import Explanation
from attnx.core.layout import Layout
from attnx.methods import method_names

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

VOCAB = ["[PAD]", "[CLS]", "[SEP]", "a", "grip", "##ping", "film", "dull", "and", "long"]


class Tokenizer:
    all_special_tokens = ["[PAD]", "[CLS]", "[SEP]"]

    def convert_ids_to_tokens(self, ids):
        return [VOCAB[i] for i in ids]


def image_explanation(scores: torch.Tensor, logits: torch.Tensor | None = None, **fields) -> Explanation:
    """An explanation of ``(B, 4)`` patch scores on a 2 x 2 grid of a 16 x 16 image."""
    B = scores.shape[0]
    logits = torch.zeros(B, 3) if logits is None else logits
    return Explanation(scores=scores.float(), grid=(2, 2), targets=logits.argmax(1), logits=logits, method="m",
                       layout=Layout(num_tokens=5, prefix_tokens=1, readout=0), **fields)


def heat_images(fig):
    """The heat-map images of a figure (the second image drawn on an axes)."""
    return [ax.images[1] for ax in fig.axes if len(ax.images) >= 2]


def colorbar_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


IMAGES = torch.rand(2, 3, 16, 16)


def test_signed_map_uses_a_diverging_map_centred_at_zero_with_a_colour_bar():
    e = image_explanation(torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.3, 0.1, -0.1, 0.2]]))
    fig = viz.show(e, IMAGES)
    images = heat_images(fig)
    assert len(images) == 2
    for im in images:
        assert im.get_cmap().name == "RdBu_r"
        norm = im.norm
        assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == 0 and norm.vmin == -norm.vmax
    assert len(colorbar_axes(fig)) == 2
    # the zero-relevance patch of sample 0 (bottom right) is drawn at the centre of the colour map
    data = np.asarray(images[0].get_array())
    assert abs(float(data[12, 12])) < 1e-6
    assert float(data[:8, 8:].min()) == pytest.approx(-1.0)  # the largest |relevance| reaches the end of the scale


def test_unsigned_map_has_zero_on_the_same_tint_as_a_signed_map():
    signed = heat_images(viz.show(image_explanation(torch.tensor([[1.0, -1.0, 0.0, 0.5]] * 2)), IMAGES))[0]
    unsigned_fig = viz.show(image_explanation(torch.tensor([[1.0, 0.0, 0.25, 0.5]] * 2)), IMAGES)
    unsigned = heat_images(unsigned_fig)[0]
    assert len(colorbar_axes(unsigned_fig)) == 2
    zero_signed = signed.get_cmap()(signed.norm(0.0))
    zero_unsigned = unsigned.get_cmap()(unsigned.norm(0.0))
    assert np.allclose(zero_signed, zero_unsigned, atol=0.02)
    # not min-max: the smallest value, 0, stays at zero; values keep their ratios (0.25 : 0.5)
    data = np.asarray(unsigned.get_array())
    assert float(data[0, 15]) == 0.0
    assert float(data[15, 0]) / float(data[15, 15]) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("values, word", [([0.0, 0.0, 0.0, 0.0], "all zero"), ([0.3, 0.3, 0.3, 0.3], "constant"),
                                          ([0.1, float("nan"), 0.2, 0.3], "not finite")])
def test_degenerate_map_is_named_in_its_panel(values, word):
    e = image_explanation(torch.tensor([values, [0.1, 0.4, 0.2, 0.3]]))
    fig = viz.show(e, IMAGES)
    panels = [ax for ax in fig.axes if len(ax.images) >= 2]
    assert [t.get_text() for t in panels[0].texts] == [word]
    assert len(panels[1].texts) == 0


def test_every_method_figure_has_one_panel_per_registered_method():
    from attnx.demo import gallery

    assert gallery.VISION_METHODS == method_names()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3, depth=2).eval()
    x = torch.rand(1, 3, 32, 32)
    fig = viz.method_grid(attnx.Explainer(model), x, method_names())
    titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert titles[1:] == method_names()
    assert len(heat_images(fig)) == len(method_names())


def test_show_titles_with_the_sigmoid_of_a_multi_label_head_and_the_models_class_names():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3, depth=1).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": ["cat", "dog", "bird"], "multi_label": True}
    x = torch.rand(1, 3, 32, 32)
    e = attnx.Explainer(model)(x, method="rollout", target=1)
    with torch.no_grad():
        p = float(model(x)[0, 1].sigmoid())
    title = viz.show(e, x).axes[0].get_title()
    assert title == f"rollout: dog (p={p:.2f})"


def text_explanation(scores, logits=None, **fields) -> Explanation:
    ids = torch.tensor([[1, 3, 4, 5, 6, 2]])
    logits = torch.tensor([[0.2, 1.5]]) if logits is None else logits
    return Explanation(scores=torch.tensor([scores]), grid=None, targets=logits.argmax(1), logits=logits,
                       method="m", layout=Layout(num_tokens=6, prefix_tokens=0, readout=0), input_ids=ids, **fields)


# [CLS] takes most of the relevance; the content words are scaled by the largest of them (0.5)
SCORES = [8.0, 0.5, -0.25, 0.1, 0.05, 4.0]


def expected_rgba(v: float) -> tuple:
    a = 0.85 * abs(v)
    return (0.0, 0.63, 0.0, a) if v >= 0 else (0.86, 0.0, 0.0, a)


def css(rgba) -> str:
    r, g, b, a = rgba
    return f"rgba({round(r * 255)},{round(g * 255)},{round(b * 255)},{a:.3f})"


def test_text_html_scale_ignores_special_tokens_and_the_page_has_a_title():
    page = viz.text_html(text_explanation(SCORES), Tokenizer())
    spans = dict(re.findall(r'background:(rgba\([^)]*\));[^>]*>([^<]*)</span>', page)[i][::-1] for i in range(6))
    assert spans["a"] == css(expected_rgba(1.0))
    assert spans["grip"] == css(expected_rgba(-0.5))
    assert spans["##ping"] == css(expected_rgba(0.2))
    assert spans["[CLS]"] == css(expected_rgba(1.0))  # clipped, not the scale
    title = re.search(r"<title>(.*?)</title>", page)
    assert title is not None and title.group(1).strip()


def test_text_picture_and_terminal_follow_the_same_scale():
    fig = viz.text_figure([text_explanation(SCORES)], Tokenizer())
    colours = {t.get_text(): tuple(t.get_bbox_patch().get_facecolor()) for t in fig.texts if t.get_bbox_patch()}
    assert np.allclose(colours["a"], expected_rgba(1.0))
    assert np.allclose(colours["grip"], expected_rgba(-0.5))
    out = viz.text_terminal(text_explanation(SCORES), Tokenizer(), color=False)
    assert "a[+1.00]" in out and "grip[-0.50]" in out and "ping[+0.20]" in out


def test_text_terminal_prints_the_models_class_name():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16,
                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    batch = {"input_ids": torch.tensor([[1, 3, 4, 6, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    e = attnx.Explainer(model)(batch, method="rollout", target=1)
    with torch.no_grad():
        p = float(model(**batch).logits.softmax(-1)[0, 1])
    out = viz.text_terminal(e, Tokenizer(), color=False)
    assert out.startswith(f"positive (p={p:.2f}): ")


# the compact text grid and the word pieces
def explanation(method: str, scores: list[list[float]]) -> Explanation:
    ids = torch.tensor([[1, 3, 4, 5, 6, 2], [1, 7, 8, 9, 2, 0]])
    valid = ids != 0
    s = torch.tensor(scores, dtype=torch.float32) * valid
    logits = torch.tensor([[0.2, 1.5], [2.0, -1.0]])
    return Explanation(scores=s, grid=None, targets=logits.argmax(1), logits=logits, method=method,
                       layout=Layout(num_tokens=6, prefix_tokens=0, readout=0, valid=valid), input_ids=ids)


def boxes(fig) -> dict[str, list[tuple]]:
    """Text of the figure that sits on a coloured box -> the box colours, in drawing order."""
    out: dict[str, list[tuple]] = {}
    for t in fig.texts:
        patch = t.get_bbox_patch()
        if patch is not None:
            out.setdefault(t.get_text(), []).append(tuple(patch.get_facecolor()))
    return out


def test_grid_has_a_column_per_method_and_signed_colours():
    a = explanation("rollout", [[9.0, 1.0, 4.0, -2.0, 0.5, 0.0], [5.0, -3.0, 1.5, 0.0, 7.0, 0.0]])
    b = explanation("lrp", [[0.0, -1.0, 2.0, 1.0, 4.0, 0.0], [0.0, 1.0, 1.0, -1.0, 0.0, 0.0]])
    fig = viz.text_grid([a, b], Tokenizer(), class_names=["neg", "pos"])
    try:
        texts = [t.get_text() for t in fig.texts]
        assert "rollout" in texts and "lrp" in texts  # one header per column
        assert "pos (p=0.79)" in texts and "neg (p=0.95)" in texts  # one label per sentence (softmax of the class)
        colours = boxes(fig)
        assert "[CLS]" not in colours and "[SEP]" not in colours  # special tokens left out
        assert "ping" in colours and "##ping" not in colours  # word pieces shown without their mark
        # the scale is the largest |score| of the shown tokens ([CLS]'s 9.0 does not count): 4.0 for
        # sentence 0 of rollout; "a" has 1/4 -> green at alpha 0.85/4; "ping" -2/4 -> red at 0.85/2
        (r, g, bl, alpha), = [c for c in colours["a"]][:1]
        assert (r, bl) == (0.0, 0.0) and g > 0.5 and alpha == pytest.approx(0.85 / 4)
        r, g, bl, alpha = colours["ping"][0]
        assert r > 0.8 and g == 0.0 and alpha == pytest.approx(0.85 / 2)
        # columns keep their own values: "film" is +0.5/4 in rollout, +4/4 in lrp
        assert [c[3] for c in colours["film"]] == pytest.approx([0.85 * 0.5 / 4, 0.85])
    finally:
        viz.pyplot().close(fig)


def test_grid_is_compact():
    """Methods side by side: five methods of two sentences are wider than tall, not a long column."""
    es = [explanation(m, [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, -2.0, 3.0, 4.0, 5.0, 6.0]]) for m in "abcde"]
    fig = viz.text_grid(es, Tokenizer())
    try:
        w, h = fig.get_size_inches()
        assert w > 2.5 * h
    finally:
        viz.pyplot().close(fig)


@pytest.mark.parametrize("tokens, expected", [
    (["[CLS]", "grip", "##ping", "film"], [("[CLS]", False), ("grip", False), ("ping", True), ("film", False)]),
    (["<s>", "Ġgrip", "ping", "Ġfilm"], [("<s>", False), ("grip", False), ("ping", True), ("film", False)]),
    (["▁grip", "ping", "▁film"], [("grip", False), ("ping", True), ("film", False)]),
])
def test_word_pieces(tokens, expected):
    assert viz.word_pieces(tokens) == expected

