"""LRP-γ on a model whose biases decide the sign of many outputs (as DINOv2's do), and the loud
check of relevance that blows up or is not finite.

The tiny ViT below (LayerScale, biases of order one against small activations) reproduces what
``attnlrp-gamma`` did on the real DINOv2 backbone: with the bias left out of the γ denominator,
the denominator vanishes or flips sign where the bias decides the sign of the output, and the
relevance grows layer after layer (here to ~1e8 times the relevance at the logits). The rule
itself (zennit's generalised γ, the γ-modified bias in the denominator) is checked in matrix form
in ``tests/test_lrp_rules.py``.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import attnx
from attnx.errors import DegenerateMapWarning, NonFiniteMapError
from attnx.lrp import in_mlp, presets
from attnx.lrp.linear import Gamma, sign1
from attnx.lrp.relay import stabilize

DT = torch.float64


class BiasFreeGamma(Gamma):
    """γ with the bias out of the denominator (what the preset did before): ``y > 0`` outputs
    divide by ``u + γ(u + v)/2``, the others by ``u + γ(u − v)/2`` (``u = Wx``, ``v = |W||x|``)."""

    def propagate(self, c, g):
        abs_w = c.abs_w()
        u, v = c.u(), c.v(abs_w)
        h, pos = self.gamma / 2, c.y > 0
        s = c.y * g / stabilize(torch.where(pos, u + h * (u + v), u + h * (u - v)), self.epsilon)
        return (1 + h) * s, sign1(c.x) * c.abs_vjp(abs_w, h * torch.where(pos, s, -s))


def biased_vit() -> nn.Module:
    torch.manual_seed(2)
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=6,
        num_heads=2, num_classes=5, init_values=1.0,
    ).to(DT).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 1.0)
    return model


def gamma_preset(rule: Gamma):
    reg = presets["attnlrp-gamma"]().copy()
    for key in (nn.Linear, F.linear):
        reg.register(key, rule, within=in_mlp)
    reg.register(nn.Conv2d, rule)
    return reg


@pytest.fixture(scope="module")
def case():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=DT)
    return biased_vit(), x


def relevance_ratio(trace) -> torch.Tensor:
    """``Σ R_input / R_logits`` per sample."""
    return trace.input_relevance.flatten(1).sum(1) / trace.seeded_relevance


def test_the_model_reproduces_the_blow_up(case):
    model, x = case
    trace = attnx.Explainer(model).trace(x, target=[0, 1], needs=attnx.Needs(input_relevance=True),
                                         preset=gamma_preset(BiasFreeGamma(0.25, 1e-6)))
    assert relevance_ratio(trace).abs().max() > 1e4
    with pytest.warns(DegenerateMapWarning, match="blew up"):
        attnx.explain(model, x, method="lrp", target=[0, 1], preset=gamma_preset(BiasFreeGamma(0.25, 1e-6)))


def test_attnlrp_gamma_stays_bounded(case):
    model, x = case
    trace = attnx.Explainer(model).trace(x, target=[0, 1], needs=attnx.Needs(input_relevance=True), preset="attnlrp-gamma")
    ratio = relevance_ratio(trace)
    assert torch.isfinite(trace.input_relevance).all()
    assert ratio.abs().max() <= 1.0  # each denominator is at least as large as its output
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateMapWarning)
        attnx.explain(model, x, method="lrp", target=[0, 1], preset="attnlrp-gamma")


class Silent(nn.Module):
    """A unit that is exactly zero: LRP-ε with ε = 0 meets 0 / 0 there (taken as 0: no relevance)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 3).to(DT), nn.Linear(3, 2).to(DT)
        with torch.no_grad():
            self.fc1.weight[0].zero_()
            self.fc1.bias[0] = 0.0

    def forward(self, x):
        return self.fc2(self.fc1(x).relu() + self.fc1(x))


def test_non_finite_input_relevance_raises():
    model = Silent()
    reg = presets["attnlrp"]().copy()
    reg.register(nn.Linear, attnx.lrp.rules.Epsilon(0.0))
    tokens = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    trace = attnx.lrp.LRPEngine(model, reg)
    with trace as engine:
        xt = engine.track(tokens.clone())
        y = model(xt)
    (g,) = torch.autograd.grad(y, xt, torch.ones_like(y))
    assert torch.isfinite(g).all(), "LRP-0 at an output of exactly 0 passes no relevance (0 / 0 -> 0)"
    from attnx.core.degenerate import check_relevance
    from attnx.core.trace import Trace

    relevance = xt.detach() * g
    relevance[1, 2, 3] = float("nan")  # what an overflowing half-precision pass would leave
    bad = Trace(logits=y.detach()[:, 0], targets=None, layout=None, input_relevance=relevance,
                seeded_relevance=torch.ones(2, dtype=DT), conserving=True)
    with pytest.raises(NonFiniteMapError, match="non-finite input relevance"):
        check_relevance(bad, "lrp")
