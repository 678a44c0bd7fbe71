"""Baselines: seeded random relevance, and gradient × input against plain autograd."""
from __future__ import annotations

import warnings

import pytest
import torch

import attnx
from conftest import CASES, max_abs_diff, run_model, with_batch

DT = torch.float64


def test_listed():
    assert {"random", "gradient_x_input", "attention_flow"} <= set(attnx.list_methods())
    assert attnx.get_method("random").options == {"seed": 0}
    assert attnx.get_method("gradient_x_input").options == {"patch_size": None, "libragrad": False}


# random --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timm_vit", "timm_reg4", "hf_bert_sdpa"])
def test_random_is_reproducible_and_seeded(name):
    case = CASES[name]
    model = case.model()
    x = case.inputs(3, lengths=[9, 7, 5] if case.is_text else None)
    explainer = attnx.Explainer(model)
    a = explainer(x, method="random")
    b = explainer(x, method="random", seed=0)
    c = explainer(x, method="random", seed=1)
    P = case.num_tokens - case.prefix_tokens
    assert a.scores.shape == (3, P) and a.scores.dtype == torch.float32 and a.method == "random"
    assert torch.equal(a.scores, b.scores)
    assert not torch.equal(a.scores, c.scores)
    assert not torch.equal(a.scores[0], a.scores[1]), "different samples get different maps"
    assert (a.scores >= 0).all() and (a.scores < 1).all()
    assert (a.token_relevance[:, : case.prefix_tokens] == 0).all()
    logits = run_model(case, model, x)
    assert a.targets.tolist() == logits.argmax(1).tolist()  # targets resolved as usual
    if case.is_text:
        mask = x["attention_mask"].bool()
        assert (a.scores[~mask] == 0).all() and (a.scores[mask] > 0).all()
    else:
        assert (a.scores > 0).all() and a.heatmap().shape == (3, *case.image_size)


def test_random_is_independent_of_the_model_and_of_the_batch():
    x = CASES["timm_vit"].inputs(3)
    a = attnx.explain(CASES["timm_vit"].model(), x, method="random", seed=5)
    b = attnx.explain(CASES["torchvision_vit"].model(), x, method="random", seed=5)
    assert torch.equal(a.scores, b.scores)
    explainer = attnx.Explainer(CASES["timm_vit"].model(DT))
    batch = explainer(x.to(DT), method="random", seed=5)
    assert batch.scores.dtype == DT
    for i in range(3):
        alone = explainer(with_batch(x.to(DT), [i]), method="random", seed=5)
        assert torch.equal(alone.scores[0], batch.scores[i])
        assert max_abs_diff(alone.scores[0], a.scores[i]) < 1e-7  # float32 copy of the same draw


def test_random_padding_does_not_matter():
    case = CASES["hf_bert_eager"]
    x = case.inputs(2, lengths=[9, 4])
    explainer = attnx.Explainer(case.model())
    batch = explainer(x, method="random", target=[0, 1])
    alone = explainer({k: v[1:, :4] for k, v in x.items()}, method="random", target=[1])
    assert torch.equal(alone.scores[0], batch.scores[1, :4])


def test_random_seed_must_be_an_int():
    case = CASES["timm_vit"]
    with pytest.raises(TypeError, match="seed"):
        attnx.explain(case.model(), case.inputs(1), method="random", seed=0.5)


# gradient x input ----------------------------------------------------------------------------
def autograd_image(case, model, x, targets):
    x = x.detach().clone().requires_grad_(True)
    logits = run_model(case, model, x)
    (g,) = torch.autograd.grad(logits[torch.arange(len(targets)), torch.tensor(targets)].sum(), x)
    return (g * x).detach()


def autograd_text(model, inputs, targets):
    stored = []

    def hook(module, args, output):
        output = output.detach().requires_grad_(True)
        stored.append(output)
        return output

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logits[torch.arange(len(targets)), torch.tensor(targets)].sum(), stored[0])
    return (g * stored[0]).detach()


@pytest.mark.parametrize("name", ["timm_vit", "timm_avgpool", "torchvision_vit", "hf_vit_sdpa", "hf_vit_eager_40x56"])
def test_gradient_x_input_equals_autograd_on_images(name):
    case = CASES[name]
    model = case.model(DT)
    x = case.inputs(3, dtype=DT)
    targets = [1, 4, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every op is handled: no coverage warning
        e = attnx.explain(model, x, method="gradient_x_input", target=targets)
    expected = autograd_image(case, model, x, targets)
    assert e.method == "gradient_x_input" and e.targets.tolist() == targets
    assert e.input_relevance.shape == x.shape and e.input_relevance.dtype == DT
    assert max_abs_diff(e.input_relevance, expected) <= 1e-12 * max(1.0, expected.abs().max().item())
    h, w = case.grid
    ph, pw = case.image_size[0] // h, case.image_size[1] // w
    per_patch = expected.sum(1).reshape(3, h, ph, w, pw).sum((2, 4)).reshape(3, h * w)
    assert max_abs_diff(e.scores, per_patch) <= 1e-12 * max(1.0, per_patch.abs().max().item())
    assert e.heatmap().shape == (3, *case.image_size)


@pytest.mark.parametrize("name", ["hf_bert_sdpa", "hf_distilbert_eager"])
def test_gradient_x_input_equals_autograd_on_text(name):
    case = CASES[name]
    model = case.model(DT)
    x = case.inputs(3, lengths=[9, 6, 4])
    targets = [1, 4, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = attnx.explain(model, x, method="gradient_x_input", target=targets)
    expected = autograd_text(model, x, targets)
    assert e.input_relevance.shape == expected.shape == (3, 9, 32)
    assert max_abs_diff(e.input_relevance, expected) <= 1e-12 * max(1.0, expected.abs().max().item())
    per_token = expected.sum(-1) * x["attention_mask"]
    assert max_abs_diff(e.scores, per_token) <= 1e-12 * max(1.0, per_token.abs().max().item())
    assert (e.scores[~x["attention_mask"].bool()] == 0).all()


@pytest.mark.parametrize("name", ["timm_vit", "hf_bert_eager"])
def test_gradient_x_input_batch_independence(name):
    case = CASES[name]
    model = case.model(DT)
    x = case.inputs(3, dtype=DT, lengths=[9, 6, 4] if case.is_text else None)
    explainer = attnx.Explainer(model)
    batch = explainer(x, method="gradient_x_input", target=[0, 3, 1])
    for b in range(3):
        alone = explainer(with_batch(x, [b]), method="gradient_x_input", target=[[0, 3, 1][b]])
        assert max_abs_diff(alone.scores[0], batch.scores[b]) <= 1e-10 * max(1.0, batch.scores.abs().max().item())


def test_gradient_x_input_of_a_callable_target():
    """A callable target (a logit difference) is differentiated as given: x ⊙ ∂s/∂x by autograd."""
    case = CASES["timm_vit"]
    model = case.model(torch.float64)
    x = case.inputs(2, dtype=torch.float64)
    e = attnx.explain(model, x, method="gradient_x_input", target=lambda out: out[:, 0] - out[:, 3])
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    (g,) = torch.autograd.grad((out[:, 0] - out[:, 3]).sum(), xr)
    assert e.targets is None
    assert max_abs_diff(e.input_relevance, (xr * g).detach()) <= 1e-12

