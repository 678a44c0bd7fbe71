"""Attention flow: maximum flows checked by hand and against networkx, and the method end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attnx
from attnx.core.layout import Layout
from attnx.core.trace import Trace
from attnx.core.layout import Readout
from attnx.methods.attention_flow import RESOLUTION, max_flows
from conftest import CASES, max_abs_diff, with_batch

TOL = 1e-8  # capacities are rounded to multiples of 2**-30


# the solver ----------------------------------------------------------------------------------
def test_one_layer_by_hand():
    m = np.array([[[0.7, 0.3], [0.4, 0.6]]])
    # readout = token 0: the only paths are the edges of its row
    np.testing.assert_allclose(max_flows(m, np.array([1.0, 0.0])), [0.7, 0.3], atol=TOL)
    # readout feeding both tokens with 1/2 (pooled model): flow_j = sum_i min(1/2, m[i, j]),
    # where rollout would give sum_i m[i, j] / 2 = [0.55, 0.45]
    np.testing.assert_allclose(max_flows(m, np.array([0.5, 0.5])), [0.9, 0.8], atol=TOL)


def test_min_cut_by_hand_two_layers():
    # token 0 at the top sends 1/2 to each token below; token 1 of the middle boundary keeps half
    # of what it gets and passes half down to token 0.
    upper = [[0.5, 0.5], [0.5, 0.5]]
    lower = [[1.0, 0.0], [0.5, 0.5]]
    flows = max_flows(np.array([lower, upper]), np.array([1.0, 0.0]))
    # to input 0: 1/2 through each middle token (min cut: the two upper edges, 1/2 + 1/2)
    # to input 1: only through middle token 1, bottleneck min(1/2, 1/2) = 1/2
    np.testing.assert_allclose(flows, [1.0, 0.5], atol=TOL)


def test_flow_is_bounded_by_the_bottleneck_while_rollout_multiplies():
    """The hand-built case through the method: A chosen so that Â = rownorm((A + I) / 2) is the
    graph above. Rollout multiplies along the path (1/2 · 1/2) and sums over paths; the flow to
    input 1 is the bottleneck 1/2, to input 0 the cut 1."""
    a1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # Â1 = [[1, 0], [.5, .5]]
    a2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # Â2 = [[.5, .5], [.5, .5]]
    captured = Trace(
        attentions=[a1.view(1, 1, 2, 2), a2.view(1, 1, 2, 2)], gradients=None,
        logits=torch.zeros(1, 3, dtype=torch.float64), targets=torch.zeros(1, dtype=torch.long),
        layout=Layout(num_tokens=2, prefix_tokens=1, readout=0, grid=(1, 1)),
    )
    readout = Readout(captured.layout, 1, torch.device("cpu"))
    flow = attnx.get_method("attention_flow").fn(captured, readout, normalize=False)
    rollout = attnx.get_method("rollout").fn(captured, readout)
    torch.testing.assert_close(rollout, torch.tensor([[0.75, 0.25]], dtype=torch.float64))
    torch.testing.assert_close(flow, torch.tensor([[1.0, 0.5]], dtype=torch.float64), atol=TOL, rtol=0)
    normalized = attnx.get_method("attention_flow").fn(captured, readout)
    torch.testing.assert_close(normalized, torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64), atol=TOL, rtol=0)


def random_graph(rng, L, n, density=0.6):
    m = rng.random((L, n, n)) * (rng.random((L, n, n)) < density)
    m /= np.maximum(m.sum(-1, keepdims=True), 1e-12) * rng.uniform(1.0, 2.0, size=(L, n, 1))
    src = rng.random(n) * (rng.random(n) < 0.7)
    return m, src / max(src.sum(), 1e-12)


def test_against_networkx_on_random_graphs():
    nx = pytest.importorskip("networkx")
    rng = np.random.default_rng(0)
    for _ in range(60):
        L, n = int(rng.integers(1, 4)), int(rng.integers(1, 6))
        m, src = random_graph(rng, L, n)
        g = nx.DiGraph()
        g.add_node("readout")
        g.add_nodes_from((0, j) for j in range(n))
        g.add_edges_from(("readout", (L, i), {"capacity": src[i]}) for i in range(n) if src[i] > 0)
        for l in range(1, L + 1):
            g.add_edges_from(
                ((l, i), (l - 1, k), {"capacity": m[l - 1, i, k]}) for i in range(n) for k in range(n) if m[l - 1, i, k] > 0
            )
        expected = [nx.maximum_flow_value(g, "readout", (0, j)) for j in range(n)]
        np.testing.assert_allclose(max_flows(m, src), expected, atol=n * n * L / RESOLUTION + 1e-12)


def test_solver_rejects_bad_capacities():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        max_flows(np.full((1, 2, 2), 1.5), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="finite"):
        max_flows(np.full((1, 2, 2), np.nan), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"\(L, n, n\)"):
        max_flows(np.zeros((2, 3)), np.zeros(3))


# the method ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timm_vit", "timm_avgpool", "hf_bert_sdpa", "hf_bert_eager"])
def test_through_explain(name):
    case = CASES[name]
    model = case.model()
    lengths = [9, 6, 4] if case.is_text else None
    x = case.inputs(3, lengths=lengths)
    e = attnx.explain(model, x, method="attention_flow")
    P = case.num_tokens - case.prefix_tokens
    assert e.method == "attention_flow" and e.scores.shape == (3, P)
    assert e.token_relevance.shape == (3, case.num_tokens) and e.scores.dtype == torch.float32
    assert (e.token_relevance >= 0).all() and (e.scores > 0).any(1).all()
    # normalised over the real tokens (prefix tokens included), as the authors do
    torch.testing.assert_close(e.token_relevance.double().sum(1), torch.ones(3, dtype=torch.float64))
    if case.is_text:
        assert (e.scores[~x["attention_mask"].bool()] == 0).all()
    else:
        assert e.heatmap().shape == (3, *case.image_size)
    raw = attnx.explain(model, x, method="attention_flow", normalize=False)
    assert (raw.token_relevance >= 0).all() and (raw.token_relevance <= 1 + TOL).all()


@pytest.mark.parametrize("name", ["timm_vit", "timm_avgpool", "timm_deit_distilled", "hf_bert_eager"])
@pytest.mark.parametrize("head_fusion", ["mean", "max"])
def test_flow_is_at_least_rollout(name, head_fusion):
    """Rollout's products route one feasible flow to all inputs at once (Â is row-stochastic), so
    the maximum flow to each input is never below rollout's value for it."""
    case = CASES[name]
    model = case.model(torch.float64)
    x = case.inputs(2, dtype=torch.float64, lengths=[9, 5] if case.is_text else None)
    explainer = attnx.Explainer(model)
    flow = explainer(x, method="attention_flow", normalize=False, head_fusion=head_fusion)
    rollout = explainer(x, method="rollout", head_fusion=head_fusion)
    assert (flow.token_relevance >= rollout.token_relevance - 1e-6).all()
    assert (flow.token_relevance > rollout.token_relevance + 1e-3).any(), "flow should differ from rollout"


def test_last_layer_alone_equals_rollout():
    """With one layer and a class token the flow to j is the readout row's capacity Â[cls, j]."""
    case = CASES["timm_vit"]
    model = case.model(torch.float64)
    x = case.inputs(2, dtype=torch.float64)
    explainer = attnx.Explainer(model)
    flow = explainer(x, method="attention_flow", start_layer=-1)
    rollout = explainer(x, method="rollout", start_layer=-1)
    assert max_abs_diff(flow.token_relevance, rollout.token_relevance) < 1e-8


@pytest.mark.parametrize("name", ["timm_vit", "hf_bert_eager"])
def test_batch_independence_and_padding(name):
    case = CASES[name]
    model = case.model(torch.float64)
    lengths = [9, 6, 4]
    x = case.inputs(3, dtype=torch.float64, lengths=lengths if case.is_text else None)
    explainer = attnx.Explainer(model)
    batch = explainer(x, method="attention_flow", target=[1, 0, 2], head_fusion="max")
    for b in range(3):
        if case.is_text:  # the text alone, without any padding
            alone_x = {k: v[b : b + 1, : lengths[b]] for k, v in x.items()}
        else:
            alone_x = with_batch(x, [b])
        alone = explainer(alone_x, method="attention_flow", target=[[1, 0, 2][b]], head_fusion="max")
        n = alone.scores.shape[1]
        assert max_abs_diff(alone.scores[0], batch.scores[b, :n]) < 1e-9


def test_options():
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(2)
    assert attnx.get_method("attention_flow").options == {
        "head_fusion": "mean", "discard_ratio": 0.0, "start_layer": 0, "normalize": True
    }
    explainer = attnx.Explainer(model)
    a = explainer(x, method="attention_flow", start_layer=1, discard_ratio=0.5, head_fusion="min")
    assert a.options == {"start_layer": 1, "discard_ratio": 0.5, "head_fusion": "min"}
    assert (a.token_relevance >= 0).all()
    with pytest.raises(ValueError, match="head_fusion"):
        explainer(x, method="attention_flow", head_fusion="sum")
    with pytest.raises(ValueError, match="out of range"):
        explainer(x, method="attention_flow", start_layer=3)
    with pytest.raises(TypeError, match="unknown option"):
        explainer(x, method="attention_flow", layers=2)
