"""The method registry's conservation claims (``conserves=``), checked against independent
computations on tiny models in float64.

* integrated gradients: the completeness error equals ``|Σ IG − (f(x) − f(0))| / |f(x) − f(0)|``
  with ``f`` evaluated here by the model itself, and shrinks as ``n_steps`` grows;
* LRP (CP-LRP) with every bias-like parameter zeroed: the error is about 0;
* a deliberately broken method (CP-LRP's relevance halved, still claiming the logit) shows an error
  of 0.5; methods that claim nothing have no error.
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx import Needs, Option, register_method
from attnx.methods.lrp import input_relevance_scores, seeded_total
from attnx.methods.options import PATCH_SIZE, PRESET, STRICT
from attnx.methods.registry import unregister_method
from conftest import CASES

DT = torch.float64


@pytest.mark.slow  # about 15 s: 42 passes over the batch
def test_integrated_gradients_completeness_error_against_the_model_and_shrinking_with_steps():
    case = CASES["timm_vit"]
    model, x = case.model(DT), case.inputs(2, dtype=DT)
    errors = []
    for steps in (2, 8, 32):
        e = attnx.explain(model, x, method="integrated_gradients", n_steps=steps)
        with torch.no_grad():
            rows = torch.arange(2)
            claimed = model(x)[rows, e.targets] - model(torch.zeros_like(x))[rows, e.targets]
        total = e.input_relevance.flatten(1).sum(1)
        assert torch.allclose(e.claimed_total, claimed, rtol=1e-9, atol=1e-12)
        expected = (total - claimed).abs() / claimed.abs()
        assert torch.allclose(e.completeness_error(), expected, rtol=1e-9, atol=1e-12)
        errors.append(e.completeness_error().mean().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors


def test_lrp_conserves_where_its_rules_do():
    case = CASES["timm_vit"]
    model, x = case.model(DT), case.inputs(2, dtype=DT)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("pos_embed", "cls_token"):
                p.zero_()
    e = attnx.explain(model, x, method="lrp", preset="cplrp", target=[1, 3])
    logit = model(x).detach()[torch.arange(2), torch.tensor([1, 3])]
    assert torch.allclose(e.claimed_total, logit, rtol=1e-9)  # the seed: the target logit
    assert e.completeness_error().max() < 1e-6
    assert torch.allclose(e.relevance_total, e.input_relevance.sum((1, 2, 3)))
    for method in ("rollout", "gradient_x_input", "occlusion"):  # no claim: no error
        assert attnx.explain(model, x, method=method).completeness_error() is None

    # a deliberately broken method: CP-LRP's input relevance halved, still claiming the logit
    @register_method("_test_half", needs=Needs(input_relevance=True), options=(PRESET, STRICT, PATCH_SIZE), conserves=seeded_total)
    def half(trace, readout):
        trace.input_relevance = trace.input_relevance / 2
        return input_relevance_scores(trace, readout)

    try:
        broken = attnx.explain(model, x, method="_test_half", preset="cplrp", target=[1, 3])
    finally:
        unregister_method("_test_half")
    assert torch.allclose(broken.input_relevance.sum((1, 2, 3)), logit / 2, rtol=1e-6)
    assert torch.allclose(broken.completeness_error(), torch.full((2,), 0.5, dtype=DT), atol=1e-6)


def test_a_claim_that_depends_on_a_bool_option():
    """The ``conserves`` function receives the options the method ran with (defaults filled in)."""
    seen = []

    def claim(trace, result, options):
        seen.append(dict(options))
        return trace.seeded_relevance if options["complete"] else None

    @register_method("_test_optional", needs=Needs(input_relevance=True),
                     options=(PRESET, STRICT, PATCH_SIZE, Option("complete", False, "claims completeness", kind=bool)),
                     conserves=claim)
    def optional(trace, readout, *, complete: bool = False):
        return input_relevance_scores(trace, readout)

    try:
        case = CASES["timm_vit"]
        model, x = case.model(DT), case.inputs(2, dtype=DT)
        off = attnx.explain(model, x, method="_test_optional", preset="cplrp")
        on = attnx.explain(model, x, method="_test_optional", preset="cplrp", complete=True)
    finally:
        unregister_method("_test_optional")
    assert off.claimed_total is None and off.completeness_error() is None
    assert seen[0]["complete"] is False and seen[0]["preset"] == "cplrp" and seen[1]["complete"] is True
    logit = model(x).detach().gather(1, on.targets[:, None])[:, 0]
    expected = (on.input_relevance.sum((1, 2, 3)) - logit).abs() / logit.abs()
    assert torch.allclose(on.completeness_error(), expected, rtol=1e-9)
