"""Every model of the matrix × every method: shapes, finiteness, heat maps, targets, dtypes."""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.core.layout import Readout
from conftest import ALL, CASES, GRADIENT_METHODS, IMAGE, ids, max_abs_diff, run_model

pytestmark = pytest.mark.matrix  # the model matrix: one model per architecture in the fast tier (conftest.FAST_CASES)


def test_the_matrix_covers_every_adapter():
    assert {c.adapter for c in ALL} == {"timm_vit", "torchvision_vit", "hf"}
    assert set(attnx.adapters.adapter_names()) >= {"timm_vit", "torchvision_vit", "hf", "intercept"}
    assert {"raw_attention", "rollout", "grad_rollout", "generic", "attn_gradcam"} <= set(attnx.list_methods())


def test_adapter_and_layout(case):
    model = case.model()
    explainer = attnx.Explainer(model)
    assert explainer.adapter.name == case.adapter
    x = case.inputs(2, lengths=[9, 5] if case.is_text else None)
    layout = attnx.Explainer(model).capture(x).layout
    assert layout.num_tokens == case.num_tokens
    assert layout.prefix_tokens == case.prefix_tokens
    read = Readout(layout, 2, torch.device("cpu")).weights[0]
    assert torch.nonzero(read).flatten().tolist() == (list(case.readout_rows) or list(range(case.prefix_tokens, case.num_tokens)))
    assert torch.allclose(read[read != 0], read[read != 0][0])  # equal weights
    assert layout.grid == case.grid
    assert layout.input_size == case.image_size
    if case.is_text:
        assert layout.valid.tolist() == x["attention_mask"].bool().tolist()


def test_shapes_values_and_targets(case, method):
    model = case.model()
    B = 3
    x = case.inputs(B, lengths=[9, 6, 4] if case.is_text else None)
    logits = run_model(case, model, x).detach()
    e = attnx.Explainer(model).explain(x, method=method)
    P = case.num_tokens - case.prefix_tokens
    assert e.scores.shape == (B, P)
    assert torch.isfinite(e.scores).all()
    assert e.scores.dtype == torch.float32
    assert e.method == method and len(e) == B
    # default target: the predicted class
    assert e.targets.tolist() == logits.argmax(1).tolist()
    assert max_abs_diff(e.logits, logits) < 1e-5
    if e.token_relevance is not None:  # (methods to the input may only have content scores)
        assert e.token_relevance.shape == (B, case.num_tokens)
        assert torch.isfinite(e.token_relevance).all()
        # the content scores are the token relevance without the prefix tokens
        assert torch.equal(e.scores, e.token_relevance[:, case.prefix_tokens :] * (
            x["attention_mask"].bool() if case.is_text else 1))
    if case.is_text:  # padding scores are exactly 0
        assert (e.scores[~x["attention_mask"].bool()] == 0).all()
    if method != "attn_gradcam":  # the only method whose clamp may legitimately zero a whole map
        assert (e.scores.abs().sum(1) > 0).all(), "an all-zero explanation"
    if case.is_text:
        assert e.grid is None
        with pytest.raises(ValueError, match="text"):
            e.heatmap()
        return
    assert e.grid == case.grid
    assert e.patch_map().shape == (B, *case.grid)
    heat = e.heatmap()
    assert heat.shape == (B, *case.image_size)
    assert torch.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1
    for b in range(B):  # min-max normalised per sample (unless the map is constant)
        if e.scores[b].max() > e.scores[b].min():
            assert heat[b].min() == 0 and abs(heat[b].max().item() - 1) < 1e-6
    assert e.heatmap(size=20).shape == (B, 20, 20)
    assert e.heatmap(size=(12, 18)).shape == (B, 12, 18)


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_explicit_targets(case, method):
    """Per-sample targets are explained as given, and gradient methods depend on them."""
    model = case.model()
    x = case.inputs(2, lengths=[9, 6] if case.is_text else None)
    explainer = attnx.Explainer(model)
    a = explainer.explain(x, method=method, target=[0, 3])
    b = explainer.explain(x, method=method, target=[1, 2])
    assert a.targets.tolist() == [0, 3] and b.targets.tolist() == [1, 2]
    for i in range(2):
        assert not torch.allclose(a.scores[i], b.scores[i]), f"sample {i}: the target made no difference"
    # an int is the same class for every sample; a tensor works as a list
    c = explainer.explain(x, method=method, target=3)
    assert c.targets.tolist() == [3, 3]
    torch.testing.assert_close(c.scores[1], a.scores[1])
    d = explainer.explain(x, method=method, target=torch.tensor([0, 3]))
    torch.testing.assert_close(d.scores, a.scores)


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_callable_target(case):
    """A callable gets the model output and returns (B,) scalars; targets is then None."""
    model = case.model()
    x = case.inputs(2, lengths=[9, 6] if case.is_text else None)
    seen = []

    def target(output):
        logits = output if isinstance(output, torch.Tensor) else output.logits
        seen.append(logits.shape)
        return logits[:, 2] - logits[:, 0]

    explainer = attnx.Explainer(model)
    e = explainer.explain(x, method="grad_rollout", target=target)
    assert e.targets is None and seen == [(2, case.num_classes)]
    assert e.scores.shape == (2, case.num_tokens - case.prefix_tokens)
    assert torch.isfinite(e.scores).all()
    # a callable picking one logit equals that int target
    k = 4 % case.num_classes

    def pick(output):
        return (output if isinstance(output, torch.Tensor) else output.logits)[:, k]

    by_callable = explainer.explain(x, method="generic", target=pick)
    by_int = explainer.explain(x, method="generic", target=k)
    torch.testing.assert_close(by_callable.scores, by_int.scores)
    assert "targets=None" in repr(by_callable)


def test_float64_model_gives_float64_scores(case, method):
    model = case.model(torch.float64)
    x = case.inputs(2, dtype=torch.float64, lengths=[9, 6] if case.is_text else None)
    e = attnx.Explainer(model).explain(x, method=method)
    assert e.scores.dtype == torch.float64
    assert e.token_relevance is None or e.token_relevance.dtype == torch.float64
    assert e.logits.dtype == torch.float64
    if not case.is_text:
        assert e.heatmap().dtype == torch.float64
    # and it is the float32 result, up to float32 precision
    e32 = attnx.Explainer(case.model()).explain(
        case.inputs(2, lengths=[9, 6] if case.is_text else None), method=method, target=e.targets.tolist()
    )
    scale = e.scores.abs().max().item()
    assert max_abs_diff(e32.scores, e.scores) < 1e-3 * max(scale, 1.0)


def test_explain_function_and_call_alias():
    case = CASES["timm_vit"]
    model = case.model()
    x = case.inputs(2)
    a = attnx.explain(model, x, method="rollout", head_fusion="max")
    b = attnx.Explainer(model)(x, method="rollout", head_fusion="max")
    assert torch.equal(a.scores, b.scores)
    assert a.options == {"head_fusion": "max"}
    assert "rollout" in repr(a) and "grid=(4, 4)" in repr(a)
    torch.testing.assert_close(a.probabilities, a.logits.softmax(-1))


@pytest.mark.parametrize("case", IMAGE, ids=ids(IMAGE))
def test_batch_of_one_and_larger_batches(case):
    model = case.model()
    for B in (1, 5):
        e = attnx.Explainer(model).explain(case.inputs(B), method="rollout")
        assert e.scores.shape == (B, case.grid[0] * case.grid[1])
        assert e.heatmap().shape == (B, *case.image_size)


def test_register_method():
    """A user method over captured tensors is found by name, gets its options, and is run."""
    from attnx.methods import unregister_method

    @attnx.register_method("test_last_layer_head0")
    def head0(captured, readout, *, head: int = 0):
        """Readout row of one head of the last layer."""
        return readout.row(captured.attentions[-1][:, head])

    try:
        assert "test_last_layer_head0" in attnx.list_methods()
        assert attnx.get_method("test_last_layer_head0").options == {"head": 0}
        case = CASES["timm_vit"]
        model, x = case.model(), case.inputs(2)
        e = attnx.explain(model, x, method="test_last_layer_head0", head=2)
        captured = attnx.Explainer(model).capture(x)
        torch.testing.assert_close(e.scores, captured.attentions[-1][:, 2, 0, 1:])
    finally:
        unregister_method("test_last_layer_head0")
