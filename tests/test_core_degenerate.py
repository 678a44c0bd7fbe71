"""Never a silent degenerate map (attnx.core.degenerate).

* A sample whose map is constant or all zero over its real content tokens gets a
  :class:`attnx.DegenerateMapWarning` naming the method, the sample and the likely cause: an
  uncovered op, a target logit of zero, a readout token that attends only to itself;
  samples whose maps vary get none, and neither do padding-only differences hide a constant map.
* NaN or infinite relevance raises :class:`attnx.NonFiniteMapError`, also from ``heatmap()``.
* "Constant" is precise: ``max - min <= 8 eps(dtype) max |value|`` over the real content tokens,
  so a map with a real 1e-4 variation in float32 passes and one with a one-ulp variation does not.
"""
from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnx
from attnx.core.degenerate import check_map, constant_samples
from attnx.core.layout import Layout
from attnx.methods import unregister_method
from conftest import CASES

DT = torch.float64


@pytest.fixture
def method_returning():
    """Register a method whose token relevance is ``make(trace)``; unregistered afterwards."""
    names = []

    def register(make):
        name = f"test_degenerate_{len(names)}"

        @attnx.register_method(name, options=())
        def fn(trace, readout):
            return make(trace)

        names.append(name)
        return name

    yield register
    for name in names:
        unregister_method(name)


def tokens_like(trace, fill):
    B, N = trace.logits.shape[0], trace.layout.num_tokens
    return torch.full((B, N), fill, dtype=trace.logits.dtype)


def test_constant_map_warns_and_names_method_and_samples(method_returning):
    def make(trace):
        t = tokens_like(trace, 0.7)
        t[0, 3] = 1.0  # sample 0 varies, samples 1 and 2 are constant
        return t

    name = method_returning(make)
    x = CASES["timm_vit"].inputs(3)
    with pytest.warns(attnx.DegenerateMapWarning, match=rf"method '{name}' gave sample\(s\) \[1, 2\] a constant map") as record:
        attnx.explain(CASES["timm_vit"].model(), x, method=name)
    assert len(record) == 1
    assert "Likely cause" in str(record[0].message)


def test_all_zero_map_is_named_so(method_returning):
    name = method_returning(lambda trace: tokens_like(trace, 0.0))
    with pytest.warns(attnx.DegenerateMapWarning, match=r"\[0, 1\] an all-zero map"):
        attnx.explain(CASES["timm_vit"].model(), CASES["timm_vit"].inputs(2), method=name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_map_raises(method_returning, bad):
    def make(trace):
        t = tokens_like(trace, 0.5) + torch.arange(trace.layout.num_tokens)
        t[1, 2] = bad
        return t

    name = method_returning(make)
    with pytest.raises(attnx.NonFiniteMapError, match=rf"'{name}' gave sample\(s\) \[1\] non-finite"):
        attnx.explain(CASES["timm_vit"].model(), CASES["timm_vit"].inputs(2), method=name)


def test_heatmap_refuses_nan():
    e = attnx.explain(CASES["timm_vit"].model(), CASES["timm_vit"].inputs(2), method="rollout")
    assert torch.isfinite(e.heatmap()).all()
    e.scores = e.scores.clone()
    e.scores[1, 0] = float("nan")
    with pytest.raises(attnx.NonFiniteMapError, match=r"sample\(s\) \[1\]"):
        e.heatmap()
    lrp = attnx.explain(CASES["timm_vit"].model(), CASES["timm_vit"].inputs(2), method="lrp")
    lrp.pixel_relevance = lrp.pixel_relevance.clone()
    lrp.pixel_relevance[0, 5, 5] = float("nan")
    with pytest.raises(attnx.NonFiniteMapError, match=r"sample\(s\) \[0\]"):
        lrp.heatmap()


@pytest.mark.parametrize("name", ["timm_vit", "hf_bert_sdpa", "torchvision_vit"])
def test_normal_maps_do_not_warn(name):
    case = CASES[name]
    model = case.model()
    x = case.inputs(2, lengths=[9, 6] if case.is_text else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnx.DegenerateMapWarning)
        for method in attnx.list_methods():
            if method == "attn_gradcam":  # its ReLU may legitimately leave nothing (tested below)
                continue
            attnx.explain(model, x, method=method, target=[1, 2])


# --------------------------------------------------------------------------------------------
# likely causes
# --------------------------------------------------------------------------------------------
class Net(nn.Module):
    """conv patches -> ``activation`` -> linear head: a tiny image classifier (generic adapter)."""

    def __init__(self, activation=F.gelu):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.head = nn.Linear(16, 5)
        self.activation = activation
        self.to(DT)

    def forward(self, x):
        return self.head(self.activation(self.conv(x)).flatten(1))


def images(batch=2):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=DT)


def test_target_logit_zero_is_named():
    model = Net()
    with torch.no_grad():  # class 3's logit is exactly 0 for every input
        model.head.weight[3] = 0
        model.head.bias[3] = 0
    with pytest.warns(attnx.DegenerateMapWarning, match=r"\[0, 1\] an all-zero map.*target logit zero"):
        attnx.explain(model, images(), method="lrp", preset="attnlrp", target=3, patch_size=4)


def test_uncovered_op_is_named():
    def silenced(h):  # sin has no rule; a product with 0 then kills the relevance
        return torch.sin(h) * 0.0

    with pytest.warns(UserWarning) as record:
        attnx.explain(Net(silenced), images(), method="lrp", preset="cplrp", target=1, patch_size=4, strict=False)
    assert [w.category for w in record] == [UserWarning, attnx.DegenerateMapWarning]
    assert "'sin': 1 call(s) in model (Net)" in str(record[0].message)
    assert "all-zero map" in str(record[1].message) and "uncovered op(s) ['sin']" in str(record[1].message)


class CausalViT(nn.Module):
    """A class token first, then patches, with causal self-attention: token 0 sees only itself."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.qkv = nn.ModuleList(nn.Linear(8, 24) for _ in range(2))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.patch(x).flatten(2).transpose(1, 2)], 1)
        for qkv in self.qkv:
            q, k, v = qkv(h).reshape(h.shape[0], h.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + a.transpose(1, 2).reshape(h.shape)
        return self.head(h[:, 0])


def test_readout_row_that_sees_only_itself_is_named():
    with pytest.warns(attnx.DegenerateMapWarning, match=r"all-zero map.*readout row sees only itself"):
        attnx.explain(CausalViT(), torch.randn(2, 3, 16, 16), method="rollout")


def test_attn_gradcam_relu_is_named_when_it_leaves_nothing():
    """When every weighted attention is negative, Grad-CAM's ReLU leaves an all-zero map."""
    case = CASES["timm_vit"]
    model = case.model()
    x = case.inputs(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = attnx.explain(model, x, method="attn_gradcam", target=[0, 1, 2, 3])
    zero = [b for b in range(4) if e.scores[b].abs().max() == 0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        attnx.explain(model, x, method="attn_gradcam", target=[0, 1, 2, 3])
    messages = [str(w.message) for w in record if issubclass(w.category, attnx.DegenerateMapWarning)]
    if zero:
        assert len(messages) == 1 and f"{zero} an all-zero map" in messages[0] and "positive part" in messages[0]
    else:
        assert not messages


# --------------------------------------------------------------------------------------------
# what "constant" means
# --------------------------------------------------------------------------------------------
def test_constant_is_relative_to_the_dtype():
    base = torch.linspace(1.0, 2.0, 16, dtype=torch.float32)
    one = torch.ones(16, dtype=torch.float32)
    ulp = one.clone()
    ulp[3] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    small = one.clone()
    small[3] = 1.0 + 1e-4
    values = torch.stack([base, one, ulp, small, torch.zeros(16)])
    constant, zero = constant_samples(values)
    assert constant == [1, 2] and zero == [4]
    # in float64 a 1e-12 variation is real
    v64 = torch.ones(2, 16, dtype=DT)
    v64[1, 0] += 1e-12
    assert constant_samples(v64) == ([0], [])


def trace_of(layout, logits, **kw):
    return types.SimpleNamespace(layout=layout, logits=logits, targets=None, coverage=None, input_relevance=None,
                                 attention_relevance=None, attentions=None, **kw)


def test_padding_neither_hides_nor_makes_a_constant_map():
    layout = Layout(num_tokens=5, prefix_tokens=0, readout=0, valid=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool())
    trace = trace_of(layout, torch.zeros(2, 3))
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    with pytest.warns(attnx.DegenerateMapWarning, match=r"sample\(s\) \[0\] a constant map"):
        check_map(scores, None, trace, "m")
    # NaN at padding (e.g. 0 * inf) is not shown and not reported
    scores[0, 4] = float("nan")
    scores[0, 0] = 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_map(scores, None, trace, "m")


def test_low_precision_is_named():
    layout = Layout(num_tokens=4, prefix_tokens=0, readout=None)
    trace = trace_of(layout, torch.zeros(1, 3, dtype=torch.float16))
    with pytest.raises(attnx.NonFiniteMapError, match="fp16 overflow"):
        check_map(torch.tensor([[1.0, math.inf, 0.0, 2.0]], dtype=torch.float16), None, trace, "m")
    with pytest.warns(attnx.DegenerateMapWarning, match="torch.float16 under/overflow"):
        check_map(torch.zeros(1, 4, dtype=torch.float16), None, trace, "m")
