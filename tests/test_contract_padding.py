"""Padded text batches: padding changes nothing and gets exactly zero relevance."""
from __future__ import annotations

import pytest
import torch

import attnx
from conftest import TEXT, ids, max_abs_diff, with_adapters

pytestmark = pytest.mark.matrix  # the model matrix: one model per architecture in the fast tier (conftest.FAST_CASES)

DT = torch.float64
LENGTHS = [9, 6, 3]

CONFIGS = [(m, {}) for m in attnx.list_methods()] + [
    ("rollout", {"discard_ratio": 0.5}),
    ("rollout", {"discard_ratio": 0.9, "head_fusion": "max"}),
    ("rollout", {"discard_ratio": 0.3, "head_fusion": "min", "start_layer": 1}),
    ("grad_rollout", {"discard_ratio": 0.6}),
    ("raw_attention", {"head_fusion": "max", "layer": 0}),
]
@pytest.mark.parametrize("config", CONFIGS, ids=[m + "".join(f"-{k}={v}" for k, v in o.items()) for m, o in CONFIGS])
@pytest.mark.parametrize("case,adapter", with_adapters(TEXT))
def test_padded_sample_equals_the_text_alone(case, adapter, config):
    method, options = config
    model = case.model(DT)
    x = case.inputs(3, dtype=DT, lengths=LENGTHS)
    explainer = attnx.Explainer(model, adapter=None if adapter == "native" else "intercept")
    targets = [1, 4, 2]
    batch = explainer.explain(x, method=method, target=targets, **options)
    mask = x["attention_mask"].bool()
    assert batch.scores.shape == (3, 9)
    assert (batch.scores[~mask] == 0).all(), "padding must get exactly zero relevance"
    if batch.token_relevance is not None:
        assert batch.token_relevance.shape == (3, 9)
    assert torch.equal(batch.input_ids, x["input_ids"])
    for b, n in enumerate(LENGTHS):
        alone = {k: v[b : b + 1, :n] for k, v in x.items()}  # the same text, no padding at all
        assert alone["attention_mask"].all()
        e = explainer.explain(alone, method=method, target=[targets[b]], **options)
        assert e.scores.shape == (1, n)
        scale = max(1.0, e.scores.abs().max().item())
        assert max_abs_diff(batch.scores[b, :n], e.scores[0]) <= 1e-9 * scale, f"sample {b} (length {n})"
        assert max_abs_diff(batch.logits[b], e.logits[0]) <= 1e-9 * max(1.0, e.logits.abs().max().item())


@pytest.mark.parametrize("case", TEXT, ids=ids(TEXT))
def test_no_attention_mask_means_every_token_is_real(case):
    model = case.model()
    x = case.inputs(2)
    without = {"input_ids": x["input_ids"]}
    explainer = attnx.Explainer(model)
    for method, options in (("rollout", {"discard_ratio": 0.5}), ("generic", {})):
        a = explainer.explain(without, method=method, **options)
        b = explainer.explain(x, method=method, **options)
        assert a.layout.valid is None and b.layout.valid.all()
        torch.testing.assert_close(a.scores, b.scores)


def test_text_explanation_has_token_scores_and_no_map():
    case = TEXT[0]
    e = attnx.Explainer(case.model()).explain(case.inputs(2, lengths=[9, 4]), method="rollout")
    assert e.grid is None and e.input_size is None
    assert "tokens=9" in repr(e)
    with pytest.raises(ValueError, match="text"):
        e.patch_map()
    with pytest.raises(ValueError, match="text"):
        e.heatmap()
