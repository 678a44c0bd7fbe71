"""The model is left exactly as it was found (DESIGN.md §6), also after an error mid-way, on every
kind of model (``contracts.KINDS``: ViT, BERT, GPT-2, Llama, Swin, CLIP and OpenCLIP through the
dual-encoder path) and every model of the matrix (``conftest.CASES``); the inputs are left as found.

Checked on every module: parameter and buffer values, ``training`` flags (on a model in mixed
train/eval mode), timm ``fused_attn``, Hugging Face ``config._attn_implementation``, every hook
dictionary, every plain attribute (flags, markers), parameters' ``.grad`` (still ``None``),
``requires_grad`` and tensor hooks; globally: module hooks, the torch function mode stack and
the grad mode.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attnx
from conftest import ALL, CASES, GENERIC_OK, GRADIENT_METHODS, Case, ids, max_abs_diff, run_model, timm_vit, with_adapters
from contracts import KINDS, assert_inputs_unchanged, assert_unchanged, freeze_some_, input_snapshot, mixed_mode, snapshot

pytestmark = pytest.mark.matrix  # the model matrix: one model per architecture in the fast tier (conftest.FAST_CASES)

def inputs_of(case, batch=2):
    return case.inputs(batch, lengths=[9, 5][:batch] if case.is_text else None)


def test_model_left_as_found(case, method):
    model = mixed_mode(case.model())
    x = inputs_of(case)
    before = snapshot(model)
    if case.fused is not None:
        assert all(m.fused_attn == case.fused for m in model.modules() if hasattr(m, "fused_attn"))
    if case.attn_implementation is not None:
        assert model.config._attn_implementation == case.attn_implementation
    e = attnx.Explainer(model).explain(x, method=method)
    assert torch.isfinite(e.scores).all()
    assert_unchanged(before, model)


@pytest.mark.parametrize("method", ["rollout", "generic", "lrp"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_of_model_left_as_found(kind, method):
    """A model in mixed train/eval mode, partly frozen, with a hook of its user's, explained by an
    attention method, a gradient method and the relevance pass: everything restored, the inputs
    untouched."""
    k = KINDS[kind]
    model = freeze_some_(mixed_mode(k.build()))
    user_hook = model.register_forward_hook(lambda m, args, out: None)  # kept, and nothing added beside it
    x = k.inputs()
    before, inputs_before = snapshot(model), input_snapshot(x)
    e = attnx.explain(model, x, method=method, **k.call())
    assert_unchanged(before, model)
    assert_inputs_unchanged(inputs_before, x)
    parts = (e.image, e.text) if isinstance(e, attnx.ImageTextExplanation) else (e,)
    assert all(torch.isfinite(part.scores).all() for part in parts)
    assert model._forward_hooks.keys() == {user_hook.id}


@pytest.mark.parametrize("case", GENERIC_OK, ids=ids(GENERIC_OK))
def test_model_left_as_found_generic_adapter(case):
    model = mixed_mode(case.model())
    x = inputs_of(case)
    before = snapshot(model)
    explainer = attnx.Explainer(model, adapter="intercept")
    for method in ("rollout", "generic"):
        explainer.explain(x, method=method)
        assert_unchanged(before, model)
    explainer.capture(x, gradients=True)
    assert_unchanged(before, model)


class Boom(RuntimeError):
    pass


def raise_in_layer(case, model):
    """Register our own hook that raises inside the second attention layer's forward."""
    if case.family == "timm":
        mod = model.blocks[1].attn
    elif case.family == "torchvision":
        mod = model.encoder.layers[1].self_attention
    else:
        base = getattr(model, model.base_model_prefix)
        layers = getattr(base, "layers", None) or getattr(getattr(base, "encoder", None), "layer", None) or base.transformer.layer
        mod = layers[1].attention

    def hook(m, args, output):
        raise Boom("boom in layer 1")

    return mod.register_forward_hook(hook)


@pytest.mark.parametrize("failure", ["bad_target", "raising_callable", "mid_forward", "wrong_callable_shape"])
@pytest.mark.parametrize("case,adapter", with_adapters(ALL))
def test_model_left_as_found_after_an_error(case, adapter, failure):
    model = mixed_mode(case.model())
    x = inputs_of(case)
    before = snapshot(model)
    explainer = attnx.Explainer(model, adapter=None if adapter == "native" else "intercept")
    if failure == "bad_target":
        with pytest.raises(ValueError, match="out of range"):
            explainer.explain(x, method="grad_rollout", target=[0, 99])
    elif failure == "raising_callable":
        def target(out):
            raise Boom("boom in target")

        with pytest.raises(Boom):
            explainer.explain(x, method="generic", target=target)
    elif failure == "wrong_callable_shape":
        with pytest.raises(ValueError, match="one scalar per sample"):
            explainer.explain(x, method="generic", target=lambda out: torch.zeros(5))
    else:
        handle = raise_in_layer(case, model)
        try:
            with pytest.raises(Boom):
                explainer.explain(x, method="grad_rollout")
        finally:
            handle.remove()
    assert_unchanged(before, model)
    # and the model still explains (and runs) normally afterwards
    assert torch.isfinite(explainer.explain(x, method="generic").scores).all()
    assert_unchanged(before, model)


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_frozen_model_gets_the_same_gradient_results(case):
    model = case.model()
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    x = inputs_of(case)
    before = snapshot(frozen)
    for method in GRADIENT_METHODS:
        a = attnx.Explainer(model).explain(x, method=method, target=[1, 2])
        b = attnx.Explainer(frozen).explain(x, method=method, target=[1, 2])
        assert (b.scores.abs().sum(1) > 0).all() or method == "attn_gradcam"
        assert max_abs_diff(a.scores, b.scores) <= 1e-6 * max(1.0, a.scores.abs().max().item()), method
    captured = attnx.Explainer(frozen).capture(x, target=[1, 2], gradients=True)
    assert all(g.abs().max() > 0 for g in captured.gradients)
    assert_unchanged(before, frozen)
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("case", [CASES[n] for n in ("hf_bert_sdpa", "timm_vit")], ids=["hf_bert_sdpa", "timm_vit"])
def test_frozen_model_with_the_generic_adapter(case):
    model = case.model()
    frozen = copy.deepcopy(model)
    frozen.requires_grad_(False)
    x = inputs_of(case)
    a = attnx.Explainer(model, adapter="intercept").explain(x, method="generic", target=[1, 2])
    b = attnx.Explainer(frozen, adapter="intercept").explain(x, method="generic", target=[1, 2])
    assert max_abs_diff(a.scores, b.scores) <= 1e-6 * max(1.0, a.scores.abs().max().item())


DROPOUT_CASES = [
    Case("timm_vit_dropout", "timm", "timm_vit",
         timm_vit(drop_rate=0.5, attn_drop_rate=0.5, proj_drop_rate=0.5, drop_path_rate=0.5, pos_drop_rate=0.5),
         (32, 32), 1, 0, (4, 4), fused=True),
    CASES["hf_bert_sdpa"],  # hidden and attention dropout 0.1
    CASES["hf_vit_eager"],
    CASES["torchvision_vit"],
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=ids(DROPOUT_CASES))
def test_training_mode_model_is_explained_in_eval_mode(case):
    """Dropout is off while explaining: a model in train mode gives the eval-mode result."""
    model = case.model()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    x = inputs_of(case)
    reference = {m: attnx.Explainer(model).explain(x, method=m, target=[1, 2]).scores for m in ("rollout", "generic")}
    model.train()
    before = snapshot(model)
    for method, expected in reference.items():
        for _ in range(2):
            got = attnx.Explainer(model).explain(x, method=method, target=[1, 2]).scores
            assert torch.equal(got, expected), method
    assert_unchanged(before, model)
    assert all(m.training for m in model.modules())
    # dropout is really active in train mode (otherwise this test would prove nothing)
    with torch.no_grad():
        out = [run_model(case, model, x) for _ in range(2)]
    assert not torch.equal(out[0], out[1])


def test_grad_mode_of_the_caller_is_kept():
    case = CASES["timm_vit"]
    model = case.model()
    x = case.inputs(2)
    with torch.no_grad():
        e = attnx.Explainer(model).explain(x, method="grad_rollout", target=[0, 1])
        assert not torch.is_grad_enabled()
    with torch.enable_grad():
        f = attnx.Explainer(model).explain(x, method="grad_rollout", target=[0, 1])
        assert torch.is_grad_enabled()
    assert torch.equal(e.scores, f.scores)
    assert not e.scores.requires_grad and not x.requires_grad and x.grad is None


def test_inputs_are_not_modified():
    case = CASES["hf_bert_eager"]
    model = case.model()
    x = inputs_of(case)
    copy_x = {k: v.clone() for k, v in x.items()}
    attnx.Explainer(model).explain(x, method="generic")
    assert all(torch.equal(x[k], copy_x[k]) for k in x)
    img = CASES["timm_vit"].inputs(2).requires_grad_(False)
    img_copy = img.clone()
    attnx.Explainer(CASES["timm_vit"].model()).explain(img, method="generic")
    assert torch.equal(img, img_copy) and img.grad is None and not img.requires_grad
