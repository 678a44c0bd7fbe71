"""A batch explained at once equals each of its samples explained alone (DESIGN.md §6)."""
from __future__ import annotations

import pytest
import torch

import attnx
from conftest import CASES, max_abs_diff, with_batch

pytestmark = pytest.mark.matrix  # the model matrix: one model per architecture in the fast tier (conftest.FAST_CASES)

DT = torch.float64  # float64 so that the comparison is not blurred by float32 reduction order
LENGTHS = [9, 6, 4]


@pytest.mark.parametrize("target", ["default", "per_sample"])
def test_batch_equals_samples_alone(case, method, target):
    model = case.model(DT)
    x = case.inputs(3, dtype=DT, lengths=LENGTHS if case.is_text else None)
    targets = None if target == "default" else [6 % case.num_classes, 0, 3]
    explainer = attnx.Explainer(model)
    batch = explainer.explain(x, method=method, target=targets)
    if targets is not None:
        assert batch.targets.tolist() == targets
    scale = max(1.0, batch.scores.abs().max().item())
    for b in range(3):
        alone = explainer.explain(with_batch(x, [b]), method=method, target=None if targets is None else [targets[b]])
        assert alone.targets.tolist() == batch.targets[b : b + 1].tolist()
        assert max_abs_diff(alone.scores[0], batch.scores[b]) <= 1e-9 * scale, f"sample {b}"
        assert max_abs_diff(alone.logits[0], batch.logits[b]) <= 1e-9 * max(1.0, batch.logits.abs().max().item())
        if not case.is_text:
            assert max_abs_diff(alone.heatmap()[0], batch.heatmap()[b]) <= 1e-7


@pytest.mark.parametrize("name", ["timm_vit", "torchvision_vit", "hf_vit_sdpa", "hf_bert_sdpa"])
@pytest.mark.parametrize("method", ["rollout", "grad_rollout", "generic"])
def test_batch_independence_in_float32(name, method):
    """The contract's 1e-5, in the dtype users run."""
    case = CASES[name]
    model = case.model()
    x = case.inputs(4, lengths=[9, 7, 5, 3] if case.is_text else None)
    explainer = attnx.Explainer(model)
    batch = explainer.explain(x, method=method, target=[1, 0, 2, 3])
    for b in range(4):
        alone = explainer.explain(with_batch(x, [b]), method=method, target=[[1, 0, 2, 3][b]])
        assert max_abs_diff(alone.scores[0], batch.scores[b]) <= 1e-5 * max(1.0, batch.scores.abs().max().item())


@pytest.mark.parametrize("case", [CASES["timm_vit"], CASES["hf_bert_eager"]], ids=["timm_vit", "hf_bert_eager"])
def test_rollout_with_discard_is_per_sample(case):
    """discard_ratio counts per sample: appending other samples (here: the same sample with a
    different padding length, or a different image) changes nothing."""
    model = case.model(DT)
    x = case.inputs(3, dtype=DT, lengths=LENGTHS if case.is_text else None)
    explainer = attnx.Explainer(model)
    batch = explainer.explain(x, method="rollout", discard_ratio=0.7, head_fusion="max")
    for b in range(3):
        alone = explainer.explain(with_batch(x, [b]), method="rollout", discard_ratio=0.7, head_fusion="max")
        assert max_abs_diff(alone.scores[0], batch.scores[b]) <= 1e-12
