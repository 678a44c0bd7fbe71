"""The capture, checked independently of attnx.

(a) The recorded attention probabilities equal ``softmax(q kᵀ · scale + mask)`` recomputed here
    from each layer's own projection weights on that layer's input (grabbed with our own hooks).
(b) The recorded gradients ``∂y/∂A`` equal central finite differences in float64: a forward in
    which ``eps · D`` is added to one layer's probabilities (our own hook / function mode) gives
    ``(y(+eps) - y(-eps)) / (2 eps) ≈ ⟨G, D⟩``.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import attnx
from conftest import ALL, CASES, max_abs_diff, run_model, with_adapters
from contracts import attention_layers, grab_layer_inputs, split_heads

pytestmark = pytest.mark.matrix  # the model matrix: one model per architecture in the fast tier (conftest.FAST_CASES)

DT = torch.float64
LENGTHS = [9, 6, 4]  # padded text batch of three


def inputs_of(case, batch=3, dtype=DT):
    return case.inputs(batch, dtype=dtype, lengths=LENGTHS[:batch] if case.is_text else None)


def runs_float32_softmax(case, adapter):
    """Transformers' ViT/DeiT eager kernel runs (native adapter, or the model built eager)."""
    return case.family == "hf_vision" and (adapter == "native" or case.attn_implementation == "eager")


def recomputed_attention(q, k, scale, key_mask=None):
    scores = (q @ k.transpose(-2, -1)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


@pytest.mark.parametrize("case,adapter", with_adapters(ALL))
def test_attention_equals_softmax_of_own_qk(case, adapter):
    model = case.model(DT)
    x = inputs_of(case)
    layers = attention_layers(case, model)
    # the pass alone: the forward check would run the layers once more
    explainer = attnx.Explainer(model, adapter=None if adapter == "native" else "intercept", check_forward="never")
    with grab_layer_inputs(layers) as seen:
        captured = explainer.capture(x)
    assert len(seen) == len(layers) == len(captured.attentions) == 3
    key_mask = x["attention_mask"].bool() if case.is_text else None
    # transformers' ViT/DeiT eager kernel (the native capture, and the model as built when it
    # is eager) computes the softmax in float32 even for float64 models
    tolerance = 1e-6 if runs_float32_softmax(case, adapter) else 1e-10
    for l, ((_, qk, scale), h) in enumerate(zip(layers, seen)):
        with torch.no_grad():
            expected = recomputed_attention(*qk(h), scale, key_mask)
        got = captured.attentions[l]
        assert got.shape == (3, 4, case.num_tokens, case.num_tokens)
        assert got.dtype == DT
        assert max_abs_diff(got, expected) < tolerance, f"layer {l}"
        if key_mask is not None:  # padding keys get exactly zero attention
            assert (got.transpose(1, 3)[~key_mask] == 0).all()


# --------------------------------------------------------------------------------------------
# finite differences of dy/dA
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def perturbed_attention(case, model, layer: int, delta: torch.Tensor):
    """Run forwards of ``model`` with ``delta`` added to the probabilities of ``layer``.

    timm: a forward hook on ``attn_drop`` (explicit path, fused_attn=False); torchvision: the
    layer's ``nn.MultiheadAttention`` output replaced by an explicit recomputation; Hugging Face
    (eager kernel): a function mode adding ``delta`` to the result of the layer's softmax.
    """
    if case.family == "timm":
        attns = [b.attn for b in model.blocks]
        old = [a.fused_attn for a in attns]
        for a in attns:
            a.fused_attn = False
        handle = attns[layer].attn_drop.register_forward_hook(lambda m, args, out: out + delta)
        try:
            yield
        finally:
            handle.remove()
            for a, f in zip(attns, old):
                a.fused_attn = f
    elif case.family == "torchvision":
        mha = model.encoder.layers[layer].self_attention
        D, H = mha.embed_dim, mha.num_heads

        def hook(m, args, kwargs, output):
            x = args[0]
            q, k = (split_heads(F.linear(x, mha.in_proj_weight[i * D : (i + 1) * D], mha.in_proj_bias[i * D : (i + 1) * D]), H)
                    for i in range(2))
            v = split_heads(F.linear(x, mha.in_proj_weight[2 * D :], mha.in_proj_bias[2 * D :]), H)
            a = recomputed_attention(q, k, (D // H) ** -0.5) + delta
            o = (a @ v).transpose(1, 2).reshape(x.shape)
            out = mha.out_proj(o)
            if (delta == 0).all():  # our recomputation is the layer itself
                assert max_abs_diff(out, output[0]) < 1e-10
            return out, None

        handle = mha.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
    else:
        assert model.config._attn_implementation == "eager"

        class AddToSoftmax(TorchFunctionMode):
            count = 0

            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = dict(kwargs or {})
                if func is F.softmax:  # ViT's eager kernel upcasts to float32: keep float64 exact
                    kwargs.pop("dtype", None)
                out = func(*args, **kwargs)
                if func in (F.softmax, torch.softmax, torch.Tensor.softmax) and out.dim() == 4:
                    if AddToSoftmax.count == layer:
                        out = out + delta
                    AddToSoftmax.count += 1
                return out

        with AddToSoftmax():
            yield
        assert AddToSoftmax.count == 3


def target_score(case, model, x, targets):
    logits = run_model(case, model, x)
    return logits.gather(1, targets[:, None]).sum()


FD_CASES = [CASES[n] for n in (
    "timm_vit", "timm_vit_unfused", "timm_deit_distilled", "timm_reg4", "timm_avgpool", "timm_dynamic_40x56",
    "torchvision_vit", "hf_vit_sdpa_40x56", "hf_deit_teacher_eager", "hf_bert_sdpa", "hf_roberta_eager",
    "hf_distilbert_sdpa",
)]


@pytest.mark.parametrize("case,adapter", with_adapters(FD_CASES))
def test_gradients_match_finite_differences(case, adapter):
    model = case.model(DT)
    x = inputs_of(case)
    targets = torch.tensor([1, 4, 2])
    captured = attnx.Explainer(model, adapter=None if adapter == "native" else "intercept").capture(
        x, target=targets.tolist(), gradients=True
    )
    assert captured.targets.tolist() == targets.tolist()
    probe = copy.deepcopy(model)
    if case.attn_implementation == "sdpa":
        probe.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(5)
    eps = 1e-5
    # transformers' ViT/DeiT eager kernel computes its softmax in float32
    tolerance = 1e-5 if runs_float32_softmax(case, adapter) else 1e-6
    for layer in range(3):
        G = captured.gradients[layer]
        assert G.shape == captured.attentions[layer].shape
        D = torch.randn(G.shape, generator=g, dtype=DT)
        with torch.no_grad():
            ys = []
            for sign in (1, -1):
                with perturbed_attention(case, probe, layer, sign * eps * D):
                    ys.append(target_score(case, probe, x, targets))
            with perturbed_attention(case, probe, layer, torch.zeros_like(D)):
                y0 = target_score(case, probe, x, targets)
        assert abs(y0.item() - captured.logits.gather(1, targets[:, None]).sum().item()) < tolerance
        fd = ((ys[0] - ys[1]) / (2 * eps)).item()
        analytic = (G * D).sum().item()
        assert abs(analytic) > 1e-3, "degenerate probe"
        assert abs(fd - analytic) <= tolerance * max(1.0, abs(analytic)), f"layer {layer}: fd {fd} vs <G,D> {analytic}"


def test_gradients_of_callable_target_match_finite_differences():
    """A callable target (here log-softmax of class 3 minus the logit of class 0) is differentiated as given."""
    case = CASES["timm_deit_distilled"]
    model = case.model(DT)
    x = case.inputs(2, dtype=DT)

    def objective(out):
        return out.log_softmax(-1)[:, 3] - out[:, 0]

    captured = attnx.Explainer(model).capture(x, target=objective, gradients=True)
    assert captured.targets is None
    D = torch.randn(captured.gradients[1].shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    eps = 1e-5
    with torch.no_grad():
        ys = []
        for sign in (1, -1):
            with perturbed_attention(case, model, 1, sign * eps * D):
                ys.append(objective(model(x)).sum())
    fd = ((ys[0] - ys[1]) / (2 * eps)).item()
    analytic = (captured.gradients[1] * D).sum().item()
    assert abs(analytic) > 1e-3
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_capture_without_gradients_has_none_and_rows_sum_to_one(case):
    model = case.model()
    x = case.inputs(2, lengths=[9, 5] if case.is_text else None)
    captured = attnx.Explainer(model).capture(x)
    assert captured.gradients is None
    assert len(captured.attentions) == 3
    for a in captured.attentions:
        assert a.shape == (2, 4, case.num_tokens, case.num_tokens)
        assert not a.requires_grad
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=0)
    expected = run_model(case, model, x)
    assert max_abs_diff(captured.logits, expected) < 1e-5
    assert captured.targets.tolist() == expected.argmax(1).tolist()
