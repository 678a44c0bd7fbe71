"""The text pictures: the compact grid of methods x sentences and the word-piece display."""
from __future__ import annotations

import pytest
import torch

from attnx import viz
from attnx.core.explanation import Explanation
from attnx.core.layout import Layout

VOCAB = ["[PAD]", "[CLS]", "[SEP]", "a", "grip", "##ping", "film", "dull", "and", "long"]


class Tokenizer:
    """The two things the pictures ask of a tokenizer."""

    all_special_tokens = ["[PAD]", "[CLS]", "[SEP]"]

    def convert_ids_to_tokens(self, ids):
        return [VOCAB[i] for i in ids]


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

