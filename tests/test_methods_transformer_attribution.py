"""Transformer attribution (Chefer et al., CVPR 2021) pinned independently, in float64.

The method is recomputed here from ``Explainer.trace(needs=Needs(attention_relevance=True))`` and
``Explainer.capture(gradients=True)`` with explicit full matrix products (the ViT and the BERT
form), and checked against a one-layer model whose ``R^A`` is derived by hand.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnx
from attnx import Needs
from conftest import CASES, text_inputs

DT = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)


def images(batch: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=DT)


def bert_inputs(lengths=(9, 6, 4)) -> dict:
    return text_inputs(len(lengths), torch.Generator().manual_seed(3), 0, list(lengths))


# --------------------------------------------------------------------------------------------
# the method recomputed with full matrix products
# --------------------------------------------------------------------------------------------
def lrp_and_gradients(model, x, targets):
    explainer = attnx.Explainer(model)
    lrp = explainer.trace(x, target=targets, needs=Needs(attention_relevance=True), preset="chefer2021")
    cap = explainer.capture(x, target=targets, gradients=True)
    assert lrp.targets.tolist() == cap.targets.tolist() == targets
    assert len(lrp.attention_relevance) == len(cap.gradients) == 3
    return explainer, lrp.attention_relevance, cap.gradients


def layer_maps(relevance, gradients):
    """Ā_l = E_h[(∇A_l ⊙ R^A_l)⁺], each (B, N, N)."""
    return [(g * r).clamp(min=0).mean(dim=1) for g, r in zip(gradients, relevance)]


def product(matrices):
    """M_L ⋯ M_s as full (B, N, N) matrices, later layers on the left."""
    C = matrices[0]
    for M in matrices[1:]:
        C = M @ C
    return C


@pytest.mark.parametrize("start_layer", [0, 1])
def test_transformer_attribution_vit_form(start_layer):
    model, x, targets = CASES["timm_vit"].model(DT), images(2), [5, 2]
    explainer, relevance, gradients = lrp_and_gradients(model, x, targets)
    eye = torch.eye(17, dtype=DT)
    maps = [m + eye for m in layer_maps(relevance, gradients)]  # no normalisation
    C = product(maps[start_layer:])
    e = explainer.explain(x, method="transformer_attribution", target=targets, start_layer=start_layer)
    assert e.options["form"] == "vit"
    assert rel_err(e.token_relevance, C[:, 0, :]) <= 1e-12
    assert rel_err(e.scores, C[:, 0, 1:]) <= 1e-12
    # the comparison tells the layer order and the normalisation apart
    reversed_order = maps[start_layer]
    for M in maps[start_layer + 1:]:
        reversed_order = reversed_order @ M
    assert rel_err(reversed_order[:, 0, 1:], e.scores) > 1e-6
    normalised = product([m / m.sum(-1, keepdim=True) for m in maps[start_layer:]])
    assert rel_err(normalised[:, 0, 1:], e.scores) > 1e-6


@pytest.mark.parametrize("start_layer", [None, 0])
def test_transformer_attribution_bert_form(start_layer):
    model, x, targets = CASES["hf_bert_eager"].model(DT), bert_inputs((9, 6, 4)), [1, 3, 0]
    explainer, relevance, gradients = lrp_and_gradients(model, x, targets)
    valid = x["attention_mask"].bool()
    eye = torch.eye(9, dtype=DT)
    maps = [m + eye for m in layer_maps(relevance, gradients)]
    maps = [m / m.sum(-1, keepdim=True) for m in maps]  # rows normalised
    s = 2 if start_layer is None else start_layer  # default: the last layer only
    row = product(maps[s:])[:, 0, :].clone()
    for b in range(3):  # the CLS token's self-relevance: the row's minimum over the real tokens
        row[b, 0] = min(row[b, j].item() for j in range(9) if valid[b, j])
    options = {} if start_layer is None else {"start_layer": start_layer}
    e = explainer.explain(x, method="transformer_attribution", target=targets, **options)
    assert e.options["form"] == "bert" and e.options["start_layer"] == s
    assert rel_err(e.token_relevance[valid], row[valid]) <= 1e-12
    assert rel_err(e.scores, row * valid) <= 1e-12


class OneLayer(nn.Module):
    """A class token and four pixel tokens (a 2x2 RGB image, d = 3), one attention head without
    projections (q = k = v = tokens), and a linear head on the class token's output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 3, generator=g, dtype=DT))
        self.head = nn.Linear(3, 4).to(DT)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(4, 3, generator=g, dtype=DT))
            self.head.bias.copy_(torch.randn(4, generator=g, dtype=DT))

    def forward(self, x):
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        q = tokens.unsqueeze(1)
        out = F.scaled_dot_product_attention(q, q, q)
        return self.head(out[:, 0, 0])


def by_hand(model: OneLayer, x: torch.Tensor, target: int):
    """R^A and ∇A of the class token's row, in plain Python.

    Seed: relevance 1 at the target logit. Head (α=1 β=0, bias ignored): R_o[d] =
    P_d / (Σ P + 1e-9) with P_d = o_d⁺ W_td⁺ + o_d⁻ W_td⁻. Attention output o_d = Σ_j A_0j v_jd
    (Chefer's bilinear rule, halved): R^A_0j = ½ Σ_d A_0j v_jd R_o[d] / (o_d + 1e-9).
    Gradient: ∂y_t/∂A_0j = Σ_d W_td v_jd.
    """
    W = model.head.weight.tolist()[target]
    toks = [model.cls_token[0, 0].tolist()] + [[x[c, i, j].item() for c in range(3)] for i in range(2) for j in range(2)]
    scale = 1 / math.sqrt(3)
    scores = [scale * sum(toks[0][d] * toks[j][d] for d in range(3)) for j in range(5)]
    top = max(scores)
    ex = [math.exp(s - top) for s in scores]
    A = [e / sum(ex) for e in ex]
    o = [sum(A[j] * toks[j][d] for j in range(5)) for d in range(3)]
    P = [max(o[d], 0) * max(W[d], 0) + min(o[d], 0) * min(W[d], 0) for d in range(3)]
    R_o = [P[d] / (sum(P) + 1e-9) for d in range(3)]
    R_A = [0.5 * sum(A[j] * toks[j][d] * R_o[d] / (o[d] + 1e-9) for d in range(3)) for j in range(5)]
    grad_A = [sum(W[d] * toks[j][d] for d in range(3)) for j in range(5)]
    return R_A, grad_A


def test_transformer_attribution_by_hand_on_one_attention_layer():
    model = OneLayer()
    x = images(2, size=2, seed=8)
    targets = [0, 3]
    explainer = attnx.Explainer(model)
    assert explainer.adapter.name == "intercept"
    ta = explainer.explain(x, method="transformer_attribution", target=targets)
    plrp = explainer.explain(x, method="partial_lrp", target=targets)
    assert ta.grid == (2, 2) and ta.layout.prefix_tokens == 1
    tol = 1e-7  # the reference code's 1e-9 stabilisers (indexing, fan-out) act below this
    for b in range(2):
        R_A, grad_A = by_hand(model, x[b], targets[b])
        # C = Ā + I, row 0: the identity only adds to the class token's own entry
        expected_ta = [max(g * r, 0.0) + (1.0 if j == 0 else 0.0) for j, (g, r) in enumerate(zip(grad_A, R_A))]
        expected_plrp = [max(r, 0.0) for r in R_A]
        assert max(abs(a - c) for a, c in zip(ta.token_relevance[b].tolist(), expected_ta)) <= tol * max(expected_ta)
        assert max(abs(a - c) for a, c in zip(ta.scores[b].tolist(), expected_ta[1:])) <= tol * max(expected_ta)
        assert max(abs(a - c) for a, c in zip(plrp.token_relevance[b].tolist(), expected_plrp)) <= tol * max(expected_plrp)
        # not trivial: some patches relevant, some clamped away
        assert max(expected_ta[1:]) > 1e-3 and min(g * r for g, r in zip(grad_A[1:], R_A[1:])) < -1e-3
