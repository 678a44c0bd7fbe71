"""Callable targets for the LRP methods: the relevance pass starts from the target's scalar.

The seed at the logits ``z`` is ``∂s/∂z`` (relevance ``∂s/∂z`` with one-hot seeding, ``z ⊙ ∂s/∂z``
with logit seeding), so a callable returning ``z_c`` must give exactly the map of ``target=c``
(also when ``c`` is not the predicted class: the relevance pass once explained the predicted
class whatever the callable), and with rules whose backward is linear in the incoming gradient
(AttnLRP's ε, CP-LRP, plain gradient) a logit difference gives the difference of the two maps.
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.core.trace import Needs
from conftest import ALL, CASES, ids, max_abs_diff

pytestmark = pytest.mark.matrix  # the model matrix: one model per architecture in the fast tier (conftest.FAST_CASES)

LRP_RUNS = [
    ("transformer_attribution", {}),
    ("partial_lrp", {}),
    ("lrp", {"preset": "attnlrp"}),
    ("lrp", {"preset": "chefer2021"}),
    ("lrp", {"preset": "cplrp"}),
    ("gradient_x_input", {}),
]


def logits_of(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def least_likely(model_logits: torch.Tensor) -> list[int]:
    """A class per sample that is not the predicted one."""
    return model_logits.argmin(dim=-1).tolist()


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
@pytest.mark.parametrize("run", LRP_RUNS, ids=[f"{m}-{o.get('preset', 'default')}" for m, o in LRP_RUNS])
def test_callable_logit_equals_class_target(case, run):
    method, options = run
    model = case.model()
    x = case.inputs(2, lengths=[9, 6] if case.is_text else None)
    explainer = attnx.Explainer(model)
    plain = explainer(x, method="raw_attention")
    c = least_likely(plain.logits)
    rows = torch.arange(2)
    by_class = explainer(x, method=method, target=c, **options)
    by_callable = explainer(x, method=method, target=lambda out: logits_of(out)[rows, torch.tensor(c)], **options)
    assert by_class.targets.tolist() == c and by_callable.targets is None
    assert torch.isfinite(by_callable.scores).all()
    assert max_abs_diff(by_class.scores, by_callable.scores) <= 1e-6 * max(1.0, by_class.scores.abs().max().item())
    if by_class.input_relevance is not None:
        assert max_abs_diff(by_class.input_relevance, by_callable.input_relevance) <= 1e-6 * max(
            1.0, by_class.input_relevance.abs().max().item()
        )
    # and it is not the predicted class's map
    predicted = explainer(x, method=method, **options)
    assert max_abs_diff(predicted.scores, by_callable.scores) > 1e-6


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit_eager", "hf_bert_eager", "torchvision_vit"])
@pytest.mark.parametrize("preset", ["attnlrp", "cplrp"])
def test_logit_difference_is_the_difference_of_maps(name, preset):
    """With rules linear in the incoming gradient, relevance(z_a - z_b) = relevance(z_a) - relevance(z_b)
    at the input and (AttnLRP) at every attention map, in float64 (up to 1e-6 of the largest value:
    stabilisers make some rules very slightly non-linear)."""
    case = CASES[name]
    dt = torch.float64
    model = case.model(dt)
    x = case.inputs(2, dtype=dt, lengths=[9, 6] if case.is_text else None)
    explainer = attnx.Explainer(model)
    # CP-LRP holds the attention probabilities constant: there is relevance at the input only
    needs = Needs(attention_relevance=preset != "cplrp", input_relevance=True)
    a, b = [1, 4], [3, 0]
    ra = explainer.trace(x, target=a, needs=needs, preset=preset)
    rb = explainer.trace(x, target=b, needs=needs, preset=preset)
    rows = torch.arange(2)
    rd = explainer.trace(
        x, target=lambda out: logits_of(out)[rows, torch.tensor(a)] - logits_of(out)[rows, torch.tensor(b)],
        needs=needs, preset=preset,
    )
    ref = ra.input_relevance - rb.input_relevance
    assert max_abs_diff(rd.input_relevance, ref) <= 1e-6 * ref.abs().max().item()
    assert max_abs_diff(rd.input_relevance, ra.input_relevance) > 1e-3 * ref.abs().max().item()
    for la, lb, ld in zip(ra.attention_relevance or [], rb.attention_relevance or [], rd.attention_relevance or []):
        assert max_abs_diff(ld, la - lb) <= 1e-6 * (la - lb).abs().max().item()


def test_one_hot_seed_of_a_difference():
    """With one-hot seeding (chefer2021) the relevance put on the logits is ∂s/∂z itself: +1 on
    z_a and -1 on z_b, so the input relevance is that of a seed written out by hand."""
    case = CASES["hf_bert_eager"]
    model = case.model(torch.float64)
    x = case.inputs(2, dtype=torch.float64, lengths=[9, 6])
    explainer = attnx.Explainer(model)
    rows = torch.arange(2)
    diff = explainer.trace(x, target=lambda out: out.logits[rows, 1] - out.logits[rows, 3],
                           needs=Needs(input_relevance=True), preset="chefer2021")
    # by hand: the same LRP pass, seeded with the relevance (e_1 - e_3) turned into a gradient
    from attnx.lrp.engine import LRPEngine
    from attnx.lrp.rules import divide_or_zero

    adapter = explainer.adapter
    batch = adapter.prepare(x)
    with torch.enable_grad(), LRPEngine(model, "chefer2021") as engine:
        engine.track_output_of(adapter.input_embeddings())
        _, logits = adapter.call(batch)
    relevance = torch.zeros_like(logits)
    relevance[:, 1], relevance[:, 3] = 1.0, -1.0
    (g,) = torch.autograd.grad(logits, engine.roots[0], divide_or_zero(relevance, logits.detach()))
    ref = (engine.roots[0] * g).detach()
    assert max_abs_diff(diff.input_relevance, ref) <= 1e-12 * max(1.0, ref.abs().max().item())


def test_callable_not_of_the_logits():
    case = CASES["hf_bert_eager"]
    model = case.model()
    x = case.inputs(2, lengths=[9, 6])
    with pytest.raises(ValueError, match="does not depend on the logits"):
        attnx.explain(model, x, method="lrp", target=lambda out: out.logits.detach()[:, 0] * 0 + torch.ones(2, requires_grad=True))
    with pytest.raises(ValueError, match="does not depend on the model output"):
        attnx.explain(model, x, method="lrp", target=lambda out: torch.zeros(2))
