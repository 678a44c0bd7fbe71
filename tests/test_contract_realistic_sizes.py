"""The contracts at the sizes people use (224 px, 197 tokens, 12 layers), random weights.

Slow: deselected by default (``setup.cfg``); run with ``pytest -m slow``.
"""
from __future__ import annotations

import pytest
import torch

import attnx
from conftest import max_abs_diff, randomize_

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def timm_model(name):
    import timm

    torch.manual_seed(0)
    return randomize_(timm.create_model(name, pretrained=False, num_classes=10), seed=1).eval()


@pytest.mark.parametrize("name,prefix,fused", [("vit_tiny_patch16_224", 1, True), ("deit_tiny_distilled_patch16_224", 2, True),
                                               ("vit_small_patch16_224", 1, True), ("vit_tiny_patch16_224", 1, False)])
def test_timm_224(name, prefix, fused):
    """``fused=False``: the user switched timm's SDPA off; the intercept adapter then sees the
    attention written out (softmax, ``attn_drop``, ``attn @ v``)."""
    model = timm_model(name)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    native = attnx.Explainer(model)
    generic = attnx.Explainer(model, adapter="intercept")
    a = native.capture(x, target=[1, 2, 3], gradients=True)
    b = generic.capture(x, target=[1, 2, 3], gradients=True)
    assert len(a.attentions) == 12 and a.attentions[0].shape[-1] == 196 + prefix
    for l in range(12):
        assert max_abs_diff(a.attentions[l], b.attentions[l]) <= 1e-5
        assert max_abs_diff(a.gradients[l], b.gradients[l]) <= 1e-5 * max(1.0, a.gradients[l].abs().max().item())
    for method in ("rollout", "grad_rollout", "generic", "attn_gradcam"):
        e = native.explain(x, method=method, target=[1, 2, 3])
        assert e.scores.shape == (3, 196) and e.grid == (14, 14) and e.heatmap().shape == (3, 224, 224)
        for i in range(3):
            alone = native.explain(x[i : i + 1], method=method, target=[[1, 2, 3][i]])
            assert max_abs_diff(alone.scores[0], e.scores[i]) <= 1e-5 * max(1.0, e.scores.abs().max().item())


def test_hf_vit_224_at_384():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                    intermediate_size=768, num_labels=10)
    torch.manual_seed(0)
    model = randomize_(ViTForImageClassification._from_config(cfg, attn_implementation="sdpa"), seed=2).eval()
    x = torch.randn(2, 3, 384, 288)
    a = attnx.Explainer(model).capture(x, target=[0, 1], gradients=True)
    b = attnx.Explainer(model, adapter="intercept").capture(x, target=[0, 1], gradients=True)
    assert a.layout.grid == (24, 18) and a.attentions[0].shape[-1] == 1 + 24 * 18
    for l in range(12):
        assert max_abs_diff(a.attentions[l], b.attentions[l]) <= 1e-5
        assert max_abs_diff(a.gradients[l], b.gradients[l]) <= 1e-5 * max(1.0, a.gradients[l].abs().max().item())
    e = attnx.explain(model, x, method="rollout", discard_ratio=0.9)
    assert e.heatmap().shape == (2, 384, 288)
