"""Layer folds (``attnx.core.layer_fold``): methods that keep only what they read of each layer.

Each folding method's map must equal its formula written out here on a full trace (every
layer's ``A`` and ``dy_t/dA``, as the pass kept them before folds); the folding pass must keep
no attention or gradient, and must give every layer its true gradient (also layers on separate
branches of the graph).
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx.core.layer_fold import AttentionLayer, LayerFold, fold_backward
from attnx.core.layout import Readout
from attnx.core.recorder import AttentionRecorder
from attnx.methods import get_method

from conftest import CASES, max_abs_diff
from decoder_models import DecoderCase

FULL = attnx.Needs(attentions=True, gradients=True)


# --------------------------------------------------------------------------------------------
# the methods' formulas, written out on every layer's A and dy_t/dA (no attnx method code)
# --------------------------------------------------------------------------------------------
def readout_row(readout: Readout, m: torch.Tensor) -> torch.Tensor:
    """Row vector ``w (B, N)`` times ``m (B, ..., N, N)`` over the query axis."""
    w = readout.weights.to(m.dtype)
    return torch.einsum("bi,b...ij->b...j", w, m)


def roll(mats: list[torch.Tensor], readout: Readout) -> torch.Tensor:
    """Readout row of ``M_L ... M_1`` (forward order given)."""
    product = mats[0]
    for m in mats[1:]:
        product = m @ product
    return readout_row(readout, product)


def written_generic(A, G, readout, start_layer=0):
    eye = torch.eye(A[0].shape[-1], dtype=A[0].dtype)
    return roll([eye + (g * a).clamp(min=0).mean(1) for a, g in zip(A[start_layer:], G[start_layer:])], readout)


def written_grad_rollout(A, G, readout, start_layer=0):
    eye = torch.eye(A[0].shape[-1], dtype=A[0].dtype)
    mats = []
    for a, g in zip(A[start_layer:], G[start_layer:]):
        m = ((a * g).mean(1).clamp(min=0) + eye) / 2
        mats.append(m / m.sum(-1, keepdim=True))
    return roll(mats, readout)


def written_attn_gradcam(A, G, readout, layer=-1):
    a, g = readout_row(readout, A[layer]), readout_row(readout, G[layer])  # (B, H, N)
    content = readout.visible().to(g.dtype)
    w = (g * content[:, None]).sum(-1) / content.sum(-1)[:, None]  # (B, H)
    return (w[..., None] * a).mean(1).clamp(min=0)


def written_legrad(A, G, readout, start_layer=-2):
    """G: each layer's ``∂s^l/∂A^l`` (a full trace with per-layer readouts), averaged from ``start_layer``."""
    pairs = readout.pairs().to(G[-1].dtype)
    layers = G[start_layer:]
    e = sum((g.clamp(min=0).mean(1) * pairs).sum(1) for g in layers) / len(layers)
    return e / pairs.amax(-1).sum(-1, keepdim=True).clamp(min=1)


WRITTEN = {"generic": written_generic, "grad_rollout": written_grad_rollout,
           "attn_gradcam": written_attn_gradcam, "legrad": written_legrad}
OPTIONS = [("generic", {}), ("generic", {"start_layer": 1}), ("grad_rollout", {}), ("grad_rollout", {"start_layer": -2}),
           ("attn_gradcam", {}), ("attn_gradcam", {"layer": 0}), ("legrad", {}), ("legrad", {"start_layer": -1}),
           ("legrad", {"start_layer": 0})]
#: the full trace of a method whose gradients are its per-layer readouts' (every layer's ∂s^l/∂A^l)
FULL_OF = {"legrad": attnx.Needs(attentions=True, gradients=True, layer_readouts=True)}


def setups():
    """(name, explainer, inputs) of models with a class token, pooled patches, heads folded into
    the batch axis (``nn.MultiheadAttention``), padded text, and a causal language model (float64, unpadded: a float64 Llama with left padding
    gives NaN logits with its eager kernel)."""
    out = []
    for name in ("timm_vit", "timm_avgpool", "torchvision_vit", "hf_bert_eager"):
        case = CASES[name]
        out.append(pytest.param(name, case.model(torch.float64), case.inputs(batch=2, dtype=torch.float64), id=name))
    lm = DecoderCase("llama", "lm", "eager")
    out.append(pytest.param("llama_lm", lm.model(torch.float64), lm.inputs(lengths=[7, 7]), id="llama_lm"))
    return out


@pytest.mark.parametrize("name, options", OPTIONS)
@pytest.mark.parametrize("case_name, model, inputs", setups())
def test_folded_map_equals_the_formula_on_a_full_trace(case_name, model, inputs, name, options):
    explainer = attnx.Explainer(model)
    e = explainer.explain(inputs, method=name, **options)
    full = explainer.trace(inputs, None, FULL_OF.get(name, FULL))
    readout = Readout(full.layout, full.logits.shape[0], full.logits.device)
    expected = WRITTEN[name](full.attentions, full.gradients, readout, **options)
    assert max_abs_diff(e.token_relevance, expected) < 1e-12
    assert e.token_relevance.abs().max() > 0


@pytest.mark.parametrize("name, options", OPTIONS)
def test_the_folding_pass_keeps_no_attention_and_the_method_reads_either_trace(name, options):
    case = CASES["timm_vit"]
    model, x = case.model(torch.float64), case.inputs(batch=2, dtype=torch.float64)
    explainer = attnx.Explainer(model)
    spec = get_method(name)
    method_options, _ = spec.resolve(options)
    folded = explainer.trace(x, None, spec.needs, first_layer=spec.first_layer_for(method_options),
                             fold=spec.fold_for(method_options))
    assert folded.attentions is None and folded.gradients is None
    assert len(folded.folded) == 3 and folded.last_rows.shape == (2, 17)
    kept = [k for k in folded.folded if k is not None]
    assert kept and all(t.shape[-1] == 17 and t.dim() <= 3 for k in kept for t in (k if isinstance(k, tuple) else (k,))
                        if isinstance(t, torch.Tensor))
    full = explainer.trace(x, None, spec.needs)
    readout = Readout(full.layout, 2, full.logits.device)
    assert max_abs_diff(spec.fn(folded, readout, **method_options), spec.fn(full, readout, **method_options)) < 1e-12


class UnknownViT(torch.nn.Module):
    """A model no adapter knows (its readout is measured after the pass): the head reads patch 4."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(3, 16, 8, 8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.attn = torch.nn.ModuleList([torch.nn.MultiheadAttention(16, 2, batch_first=True) for _ in range(2)])
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1)
        for a in self.attn:
            t = t + a(t, t, t)[0]
        return self.head(torch.tanh(t[:, 5]))


def test_an_undeclared_readout_keeps_the_read_layer_whole():
    """Where the readout is measured after the pass, GradCAM's fold keeps the layer's whole maps
    and the method reads the measured row afterwards."""
    model = UnknownViT().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    explainer = attnx.Explainer(model)
    spec = get_method("attn_gradcam")
    trace = explainer.trace(x, 0, spec.needs, first_layer=spec.first_layer_for({"layer": -1}),
                            fold=spec.fold_for({"layer": -1}))
    a, g, used = trace.folded[-1]
    assert used is None and a.shape == g.shape == (2, 2, 17, 17) and trace.folded[0] is None
    e = explainer.explain(x, method="attn_gradcam", target=0)  # a class whose map is not all zero
    assert e.readout.rows(0) == [5] and "measured" in e.readout.description
    full = explainer.trace(x, 0, FULL)
    readout = Readout(e.layout, 2, full.logits.device)
    assert max_abs_diff(e.token_relevance, written_attn_gradcam(full.attentions, full.gradients, readout)) < 1e-12
    assert (e.token_relevance.abs().amax(1) > 0).all()


def test_layers_on_separate_branches_get_their_own_gradient():
    """Two attention stacks whose backward never meet (two towers): the backward must run to the
    lowest layer of each, or the upper one's hook would never fire and its gradient read as 0."""
    torch.manual_seed(0)
    B, H, N = 2, 2, 4
    x = torch.randn(B, H, N, N, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, N, N, dtype=torch.float64)
    recorder = AttentionRecorder(B)

    def attention(inp, weight):
        a = (inp @ weight).softmax(-1)
        recorder.record(a)
        return a

    left = attention(attention(x, w[0]), w[1])  # layers 0, 1
    right = attention(x.flip(-1), w[2])  # layer 2, a branch of its own
    top = attention(left + right, w[3])  # layer 3
    score = (top * w[0]).sum() + (right * w[1]).sum()
    expected = torch.autograd.grad(score, recorder.probs, retain_graph=True)
    keep = LayerFold(lambda at: at.gradient.clone())
    folded, last_rows = fold_backward(recorder, score, keep, None)
    for i, (got, want) in enumerate(zip(folded, expected)):
        assert max_abs_diff(got, want) == 0, f"layer {i}"
    assert all(p is None for p in recorder.probs)  # released
    assert max_abs_diff(last_rows, expected[-1].abs().sum(dim=(1, 3))) < 1e-14


def test_a_layer_the_score_does_not_depend_on_gets_zeros():
    B, H, N = 1, 1, 3
    x = torch.randn(B, H, N, N, dtype=torch.float64, requires_grad=True)
    recorder = AttentionRecorder(B)
    a0 = x.softmax(-1)
    recorder.record(a0)
    a1 = (x * 2).softmax(-1)
    recorder.record(a1)  # unused by the score
    folded, _ = fold_backward(recorder, (a0 * a0).sum(), LayerFold(lambda at: at.gradient), None)
    assert torch.equal(folded[1], torch.zeros(B, H, N, N, dtype=torch.float64))
    assert max_abs_diff(folded[0], 2 * a0.detach()) < 1e-15


def test_a_fold_sees_each_layer_once_from_the_top_down():
    seen = []

    def note(at: AttentionLayer):
        seen.append((at.index, at.num_layers, at.gradient is not None))

    case = CASES["timm_vit"]
    explainer = attnx.Explainer(case.model(torch.float64))
    trace = explainer.trace(case.inputs(batch=1, dtype=torch.float64), None, FULL, fold=LayerFold(note))
    assert seen == [(2, 3, True), (1, 3, True), (0, 3, True)]
    assert trace.folded == [None, None, None]


@pytest.mark.parametrize("readout", [torch.tensor([6, 0, 3]), torch.tensor([[0.2, 0.0, 0.3, 0.0, 0.1, 0.0, 0.4]] * 3)],
                         ids=["rows", "weights"])
def test_row_tiles_of_a_readout_sum_to_its_read(readout):
    """``Readout.row(tile, rows)``: what each tile of query rows adds to the readout row, so that
    a fold joined by summing (attn_gradcam's) sees the whole layer's read."""
    from attnx.core.layout import Layout

    m = torch.randn(3, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = Readout(Layout(7, 0, readout), 3, torch.device("cpu"))
    whole = r.row(m)
    for size in (1, 2, 3, 7):
        tiles = [slice(s, min(s + size, 7)) for s in range(0, 7, size)]
        assert torch.allclose(sum(r.row(m[..., t, :], t) for t in tiles), whole, atol=1e-14)
