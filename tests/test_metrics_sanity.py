"""attnx.metrics sanity check: the correlations against values computed by hand, and the
model-parameter randomisation test on a tiny real ViT.

The expected numbers are written as fractions with the arithmetic beside them; none is
obtained by calling the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnx
from attnx import metrics as M
from conftest import CASES
from metrics_toys import close


# --------------------------------------------------------------------------------------------
# correlations and parameter randomisation
# --------------------------------------------------------------------------------------------
def test_spearman_and_pearson_by_hand():
    a = torch.tensor([[1.0, 2, 3, 4], [1.0, 2, 2, 3]])
    b = torch.tensor([[1.0, 3, 2, 4], [1.0, 2, 3, 4]])
    # row 0: d = (0, -1, 1, 0), Σ d² = 2, rho = 1 - 6 * 2 / (4 * 15) = 4/5
    # row 1: ranks of a (1, 2.5, 2.5, 4); centred (-1.5, 0, 0, 1.5) and (-1.5, -.5, .5, 1.5):
    #        4.5 / sqrt(4.5 * 5) = sqrt(9/10)
    assert close(M.spearman(a, b), [4 / 5, math.sqrt(0.9)])
    # pearson((1, 2, 3), (1, 2, 4)): centred (-1, 0, 1), (-4/3, -1/3, 5/3): 3 / sqrt(2 * 42/9) = 9 / sqrt(84)
    assert close(M.pearson(torch.tensor([[1.0, 2, 3]]), torch.tensor([[1.0, 2, 4]])), [9 / math.sqrt(84)])
    assert close(M.spearman(a, 10 * a + 3), [1, 1])
    # a mask keeps each sample's True entries: row 0 without its last entry: (1, 2, 3) vs (1, 3, 2):
    # d = (0, -1, 1), rho = 1 - 6 * 2 / (3 * 8) = 1/2; row 1 without its first: (2, 2, 3) vs (2, 3, 4):
    # ranks (1.5, 1.5, 3) centred (-.5, -.5, 1) vs (-1, 0, 1): 1.5 / sqrt(1.5 * 2) = sqrt(3)/2
    keep = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]).bool()
    assert close(M.spearman(a, b, keep), [1 / 2, math.sqrt(3) / 2])
    assert torch.isnan(M.pearson(torch.ones(1, 3), torch.rand(1, 3))).all()


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for n, m in model.named_modules()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "params": {n: id(p) for n, p in model.named_parameters()},
    }


def test_parameter_randomisation_leaves_the_model_untouched():
    case = CASES["timm_vit"]
    model = case.model()
    model.blocks[1].train()  # mixed modes must survive (the tiny model has no dropout)
    handle = model.head.register_forward_hook(lambda m, i, o: None)
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)
    before = snapshot(model)
    x = case.inputs(batch=2)
    r = M.parameter_randomisation(model, x, "generic")
    after = snapshot(model)
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    assert before["training"] == after["training"] and before["hooks"] == after["hooks"]
    assert before["params"] == after["params"]
    assert after["grads"][next(iter(after["grads"]))] is first.grad and torch.equal(first.grad, torch.full_like(first, 0.5))
    assert all(g is None for n, g in list(after["grads"].items())[1:])
    handle.remove()
    # default steps: the head (final norm + classifier), the blocks top down, the embeddings
    assert r.layers == ["none", "head", "blocks.2", "blocks.1", "blocks.0", "embeddings"]
    assert r.spearman.shape == (6, 2) and r.maps.shape == (6, 2, 16)
    assert close(r.spearman[0], [1, 1]) and close(r.pearson[0], [1, 1])
    assert (r.spearman[-1] < 0.999).all()  # a fully random model explains differently


def test_parameter_randomisation_without_layers_and_orders():
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(batch=2)
    r = M.parameter_randomisation(model, x, "rollout", layers=[])
    assert r.layers == ["none"] and close(r.spearman, [[1, 1]]) and close(r.spearman_abs, [[1, 1]])
    casc = M.parameter_randomisation(model, x, "rollout", layers=["blocks.2", "blocks.1"], seed=3)
    ind = M.parameter_randomisation(model, x, "rollout", layers=["blocks.2", "blocks.1"], seed=3, order="independent")
    # the first step randomises the same parameters with the same draws in both orders
    assert torch.equal(casc.maps[1], ind.maps[1])
    assert not torch.equal(casc.maps[2], ind.maps[2])  # cascade has blocks.2 still randomised
    only_1 = M.parameter_randomisation(model, x, "rollout", layers=["blocks.1"], seed=3)
    assert not torch.equal(only_1.maps[1], ind.maps[2])  # the seed includes the step index
    assert [row["layer"] for row in casc.summary()] == ["none", "blocks.2", "blocks.1"]

    def fn(m, inputs, target):  # a callable method returning a tensor
        return attnx.explain(m, inputs, method="rollout", target=target).heatmap()

    rf = M.parameter_randomisation(model, x, fn, layers=["head"])
    assert rf.maps.shape == (2, 2, 32 * 32) and close(rf.spearman[0], [1, 1])
    with pytest.raises(ValueError, match="neither a module nor a parameter"):
        M.parameter_randomisation(model, x, "rollout", layers=["blocks.9"])
    with pytest.raises(ValueError, match="order"):
        M.parameter_randomisation(model, x, "rollout", order="random")


def test_randomised_copy_is_the_cascades_last_step():
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(batch=2)
    before = snapshot(model)
    work = M.randomised_copy(model, seed=2)
    after = snapshot(model)
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    changed = {n for n, p in work.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])}
    assert changed == {n for n, _ in model.named_parameters()}  # every parameter re-drawn
    r = M.parameter_randomisation(model, x, "generic", target=[0, 1], seed=2)
    own = attnx.explain(work, x, method="generic", target=[0, 1]).scores
    assert torch.allclose(own.to(r.maps.dtype), r.maps[-1], atol=1e-6)  # the same draws as the full cascade
    assert torch.equal(next(M.randomised_copy(model, seed=2).parameters()), next(work.parameters()))
