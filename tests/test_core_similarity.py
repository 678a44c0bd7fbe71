"""Similarity targets and patch matching (attnx.core.similarity), and callable targets that state their LRP
rule (``relevance_seed``), on the tiny models of the matrix: no pretrained weights needed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnx
from attnx.core import similarity
from attnx.errors import AttnxTypeError, AttnxValueError

from conftest import CASES, max_abs_diff


class WeightedLogits:
    """Test target ``Σ_c w_c z_c`` with its (exact) rule: the weights themselves."""

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits * self.weights).sum(-1)

    def relevance_seed(self, logits: torch.Tensor) -> torch.Tensor:
        return self.weights.expand_as(logits)


@pytest.fixture
def vit():
    case = CASES["timm_vit"]
    return case.model(), case.inputs(2)


def test_cosine_target_is_the_cosine_and_its_rule_reproduces_it():
    g = torch.Generator().manual_seed(0)
    e, r = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(3, 16, generator=g, dtype=torch.float64)
    target = similarity.cosine_to(r)
    assert max_abs_diff(target(e), F.cosine_similarity(e, r, dim=-1)) < 1e-12
    assert max_abs_diff((target.relevance_seed(e) * e).sum(-1), target(e)) < 1e-12
    one = similarity.cosine_to(r[0])  # one reference for every sample
    assert max_abs_diff(one(e), F.cosine_similarity(e, r[:1].expand_as(e), dim=-1)) < 1e-12
    norm = similarity.embedding_norm
    assert max_abs_diff(norm(e), e.norm(dim=-1)) < 1e-12
    assert max_abs_diff((norm.relevance_seed(e) * e).sum(-1), e.norm(dim=-1)) < 1e-12


def test_cosine_target_rejects_what_does_not_fit():
    with pytest.raises(AttnxValueError, match="non-zero"):
        similarity.cosine_to(torch.zeros(8))
    with pytest.raises(AttnxTypeError, match="float tensor"):
        similarity.cosine_to([1.0, 2.0])
    with pytest.raises(AttnxValueError, match="does not fit"):
        similarity.cosine_to(torch.ones(2, 8))(torch.ones(3, 8))
    with pytest.raises(AttnxValueError, match="embedding"):
        similarity.cosine_to(torch.ones(8))(torch.ones(2, 3, 8))


@pytest.mark.parametrize("preset", ["attnlrp", "cplrp"])
def test_lrp_of_a_linear_target_is_the_same_combination_of_class_relevances(vit, preset):
    """These presets' modified backward is linear in its seed (seed "logit"): explaining
    ``Σ_c w_c z_c`` must give ``Σ_c w_c R_c``, with ``R_c`` the relevance of class ``c`` alone."""
    model, x = vit
    explainer = attnx.Explainer(model)
    C = model(x).shape[1]
    w = torch.linspace(-1.0, 1.5, C)
    e = explainer(x, method="lrp", target=WeightedLogits(w), preset=preset)
    per_class = torch.stack([explainer(x, method="lrp", target=c, preset=preset).input_relevance for c in range(C)], 1)
    expected = (w[None, :, None, None, None] * per_class).sum(1)
    assert e.targets is None
    assert max_abs_diff(e.input_relevance, expected) < 1e-5 * expected.abs().max()


def test_one_hot_seed_of_a_linear_target_puts_relevance_one_on_it(vit):
    """Seed "one_hot" (chefer2021) divides by the target: ``3 z_c`` is explained as class ``c``
    (Chefer's rules are not linear in the seed, so only this case has an independent answer)."""
    model, x = vit
    C = model(x).shape[1]
    w = 3.0 * F.one_hot(torch.tensor(2), C).float()
    by_weights = attnx.explain(model, x, method="lrp", target=WeightedLogits(w), preset="chefer2021")
    by_class = attnx.explain(model, x, method="lrp", target=2, preset="chefer2021")
    assert max_abs_diff(by_weights.input_relevance, by_class.input_relevance) < 1e-5 * by_class.input_relevance.abs().max()


def test_transformer_attribution_keeps_a_callable_target_in_its_relevance_pass(vit):
    """Methods with a plain and a relevance pass: a one-hot weighting of a class that is not the
    predicted one must explain that class (not fall back to the prediction)."""
    model, x = vit
    logits = model(x).detach()
    c = int(logits.argmin(dim=1)[0])
    assert (logits.argmax(dim=1) != c).all()
    w = F.one_hot(torch.tensor(c), logits.shape[1]).float()
    by_weights = attnx.explain(model, x, method="transformer_attribution", target=WeightedLogits(w))
    by_class = attnx.explain(model, x, method="transformer_attribution", target=c)
    assert max_abs_diff(by_weights.scores, by_class.scores) < 1e-5 * by_class.scores.abs().max()


def test_lrp_refuses_a_rule_that_is_not_the_target(vit):
    """A plain callable is seeded with its gradient; one stating its rule must state the target."""
    model, x = vit
    class Wrong(WeightedLogits):
        def relevance_seed(self, logits):
            return 2 * self.weights.expand_as(logits)

    with pytest.raises(AttnxValueError, match="is not the target"):
        attnx.explain(model, x, method="lrp", target=Wrong(torch.ones(logits_size(model, x))))


def logits_size(model, x) -> int:
    return model(x).shape[1]


def test_patch_similarity_is_the_cosine_of_each_token_to_the_query():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    query = tokens[0, 4]
    sims = similarity.patch_similarity(tokens, query)
    for b in range(2):
        for p in range(6):
            t, q = tokens[b, p], query
            assert abs(float(sims[b, p]) - float(t @ q / (t.norm() * q.norm()))) < 1e-12
    assert abs(float(sims[0, 4]) - 1.0) < 1e-12
    per_sample = similarity.patch_similarity(tokens, tokens[:, 0])
    assert max_abs_diff(per_sample[:, 0], torch.ones(2, dtype=torch.float64)) < 1e-12
    with pytest.raises(AttnxValueError, match="query"):
        similarity.patch_similarity(tokens, torch.ones(4))


def test_embed_leaves_the_model_as_found(vit):
    model, x = vit
    model.train()
    e = similarity.embed(model, x)
    assert model.training and not e.requires_grad and e.shape == (2, model(x).shape[1])
