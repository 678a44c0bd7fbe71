"""LRP through the model's own attention kernel (``attnx.lrp.FusedAttention``).

``attnlrp`` and ``cplrp`` run ``F.scaled_dot_product_attention`` by its kernel with scaled
gradients at ``q, k, v`` instead of writing it out. Checked in float64:

* on one SDPA call against the AttnLRP / CP-LRP formulas on the written-out attention, computed
  here by hand (masks, causal, grouped-query attention, a given scale);
* on tiny random models (Llama, Qwen2, GPT-2 classifiers with right padding, a Llama language
  model with left padding, BERT, a timm ViT, a Hugging Face ViT): the input relevance equals the
  written-out path (the registry with ``Decompose`` on SDPA) and the eager kernel's;
* no ``(N, N)`` tensor is kept for the backward; the model is left as found;
* where the rules of the parts are not gradient scalings (Chefer's), dropout is on or the mask
  carries relevance, the call is written out, as the coverage table shows.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnx
from attnx.lrp import LRPEngine, rules
from attnx.lrp.fused_attention import FusedAttention
from attnx.lrp.registry import attnlrp, chefer2021, cplrp
from conftest import CASES as MODEL_CASES
from decoder_models import DecoderCase
from test_lrp_registry import build, inputs

tr = pytest.importorskip("transformers")

DT = torch.float64
SDPA = F.scaled_dot_product_attention
PRESETS = {"attnlrp": attnlrp, "cplrp": cplrp}


def written_out(preset: str) -> attnx.lrp.Registry:
    """The preset with SDPA written out (the path before the fused rule)."""
    reg = PRESETS[preset]().copy(f"{preset}-written-out")
    return reg.register(SDPA, rules.Decompose(rules.sdpa_decomposition))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def rules_used(e, op: str = "scaled_dot_product_attention") -> list[str]:
    return e.coverage.rule_of(op)


# --------------------------------------------------------------------------------------------
# one kernel call against the rules' formulas
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """``SDPA(x Wq, x Wk, x Wv)`` with the call's options: a relevance-carrying q, k and v."""

    def __init__(self, heads: int = 4, kv_heads: int = 4, dim: int = 6, **sdpa) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wq = nn.Parameter(torch.randn(dim, heads * dim, generator=g, dtype=DT) / 2)
        self.wk = nn.Parameter(torch.randn(dim, kv_heads * dim, generator=g, dtype=DT) / 2)
        self.wv = nn.Parameter(torch.randn(dim, kv_heads * dim, generator=g, dtype=DT))
        self.heads, self.kv_heads, self.dim, self.sdpa = heads, kv_heads, dim, sdpa

    def qkv(self, x):
        B, N, _ = x.shape
        split = lambda t, h: t.view(B, N, h, self.dim).transpose(1, 2)  # noqa: E731
        return split(x @ self.wq, self.heads), split(x @ self.wk, self.kv_heads), split(x @ self.wv, self.kv_heads)

    def forward(self, x):
        return SDPA(*self.qkv(x), **self.sdpa)


def attention_by_hand(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The written-out attention: ``softmax(q kᵀ · scale + mask) v`` with its probabilities."""
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    N = q.shape[-2]
    if is_causal:
        scores = scores.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, -1) @ v


class ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient times ``factor``."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def relevance_by_hand(module: Attention, x: torch.Tensor, preset: str) -> torch.Tensor:
    """The rules' relevance at ``x`` on the written-out attention (gradient × input form).

    AttnLRP: ``Q Kᵀ`` and ``A V`` uniform (each operand half), softmax its own gradient × input,
    so ``q, k`` get a quarter of their plain gradient and ``v`` half (AttnLRP Eq. 7, 13).
    CP-LRP: the probabilities are constants, ``A V`` is linear in ``v``.
    """
    x = x.detach().requires_grad_(True)
    q, k, v = module.qkv(x)
    if preset == "attnlrp":
        q, k, v = ScaleGradient.apply(q, 0.25), ScaleGradient.apply(k, 0.25), ScaleGradient.apply(v, 0.5)
    else:
        q, k = q.detach(), k.detach()
    out = attention_by_hand(q, k, v, **module.sdpa)
    (g,) = torch.autograd.grad(out, x, out.detach())  # relevance out at the output: R = z
    return x * g


def relevance_with(module: nn.Module, x: torch.Tensor, registry) -> tuple[torch.Tensor, LRPEngine]:
    with LRPEngine(module, registry) as engine:
        xt = engine.track(x)
        out = module(xt)
    engine.check_coverage()
    (g,) = torch.autograd.grad(out, xt, out.detach())
    return xt * g, engine


N = 7
KEEP = torch.rand(2, 1, N, N, generator=torch.Generator().manual_seed(1)) > 0.3
KEEP[..., 0] = True  # every query sees a key
CALLS = {
    "plain": {},
    "causal": dict(is_causal=True),
    "bool_mask": dict(attn_mask=KEEP),
    "float_mask": dict(attn_mask=torch.randn(2, 1, N, N, generator=torch.Generator().manual_seed(2), dtype=DT)),
    "scale": dict(scale=0.3),
    "gqa": dict(enable_gqa=True),
}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("call", list(CALLS))
def test_one_call_is_the_rules_formula(call, preset):
    module = Attention(kv_heads=2 if call == "gqa" else 4, **CALLS[call])
    x = torch.randn(2, N, 6, generator=torch.Generator().manual_seed(3), dtype=DT)
    expected = relevance_by_hand(module, x, preset)
    fused, engine = relevance_with(module, x, PRESETS[preset]())
    assert engine.summary().rule_of("scaled_dot_product_attention") == ["fused-attention"]
    assert relative_error(fused, expected) <= 1e-12
    decomposed, engine = relevance_with(module, x, written_out(preset))
    assert engine.summary().rule_of("scaled_dot_product_attention") == ["decompose"]
    assert relative_error(decomposed, expected) <= 1e-12
    if preset == "attnlrp":  # not the plain gradient: the rules act
        plain = x * torch.autograd.grad(module(x.requires_grad_(True)), x, module(x).detach())[0]
        assert relative_error(fused, plain) > 1e-2


def test_only_q_carrying_gets_its_plain_gradient():
    """``q kᵀ`` and ``A V`` with one relevance-carrying operand each are linear in it."""

    class QueryOnly(Attention):
        def forward(self, x):
            q, k, v = self.qkv(x)
            return SDPA(q, k.detach(), v.detach())

    module, x = QueryOnly(), torch.randn(1, N, 6, generator=torch.Generator().manual_seed(4), dtype=DT)
    fused, _ = relevance_with(module, x, attnlrp())
    xr = x.clone().requires_grad_(True)
    out = module(xr)
    plain = xr * torch.autograd.grad(out, xr, out.detach())[0]
    assert relative_error(fused, plain) <= 1e-12
    decomposed, _ = relevance_with(module, x, written_out("attnlrp"))
    assert relative_error(decomposed, plain) <= 1e-12


# --------------------------------------------------------------------------------------------
# stock models: fused = written out = the eager kernel
# --------------------------------------------------------------------------------------------
def decoder(family):
    return lambda impl: build(family, impl, DT)


def conftest_model(name):
    return lambda impl: MODEL_CASES[f"{name}_{impl}"].model(DT)


def llama_lm(impl):
    return DecoderCase("llama", "lm", impl).model(DT)


def timm_vit(impl):
    case = MODEL_CASES["timm_vit" if impl == "sdpa" else "timm_vit_unfused"]
    return case.model(DT)


def text(lengths=(9, 6, 9)):
    return lambda: inputs(3, lengths)


MODELS = {
    "llama": (decoder("llama"), text(), [1, 2, 0]),
    "qwen2": (decoder("qwen2"), text(), [1, 2, 0]),
    "gpt2": (decoder("gpt2"), text(), [1, 2, 0]),
    "llama_lm_left_padding": (llama_lm, lambda: DecoderCase("llama", "lm", "sdpa").inputs([9, 5]), None),
    "bert": (conftest_model("hf_bert"), lambda: MODEL_CASES["hf_bert_sdpa"].inputs(2, lengths=[16, 11]), [1, 0]),
    "hf_vit": (conftest_model("hf_vit"), lambda: MODEL_CASES["hf_vit_sdpa"].inputs(2, dtype=DT), [1, 3]),
    "timm_vit": (timm_vit, lambda: MODEL_CASES["timm_vit"].inputs(2, dtype=DT), [1, 3]),
}
#: transformers' eager kernels of the decoders and of ViT compute the softmax in float32 inside float64 models;
#: a float64 Llama with left padding gives NaN logits with its eager kernel (a padding query's
#: scores are all float64's lowest value, -inf in float32), so there is no eager reference
EAGER_TOLERANCE = {"llama": 1e-5, "qwen2": 1e-5, "hf_vit": 1e-5, "llama_lm_left_padding": None}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_equals_written_out_and_eager(name, preset):
    make, x, target = MODELS[name]
    model = make("sdpa")
    fused = attnx.explain(model, x(), method="lrp", preset=preset, target=target)
    assert rules_used(fused) == ["fused-attention"]
    decomposed = attnx.explain(model, x(), method="lrp", preset=written_out(preset), target=target)
    assert rules_used(decomposed) == ["decompose"]
    assert torch.equal(fused.targets, decomposed.targets)
    assert relative_error(fused.input_relevance, decomposed.input_relevance) <= 1e-10
    tolerance = EAGER_TOLERANCE.get(name, 1e-8)
    if tolerance is not None:
        eager = attnx.explain(make("eager"), x(), method="lrp", preset=preset, target=target)
        assert "scaled_dot_product_attention" not in str(eager.coverage)
        assert relative_error(fused.input_relevance, eager.input_relevance) <= tolerance


def test_the_model_is_left_as_found():
    model = build("llama", "sdpa", DT)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    attnx.explain(model, inputs(), method="lrp", preset="attnlrp", target=[1, 2, 0])
    assert model.config._attn_implementation == "sdpa"
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def saved_shapes(model: nn.Module, x: dict, registry) -> list[tuple[int, ...]]:
    """The shapes of every tensor the forward under ``registry`` saves for the backward."""
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    emb = model.get_input_embeddings()
    with LRPEngine(model, registry) as engine, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.track_output_of(emb)
        model(**x)
    return shapes


def test_no_attention_map_is_kept_for_the_backward():
    """64 tokens, no padding: the written-out path keeps (64, 64) maps, the fused one none."""
    model, n = build("llama", "sdpa", DT), 64
    x = {"input_ids": torch.randint(3, 60, (1, n), generator=torch.Generator().manual_seed(0))}
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    square = lambda shapes: [s for s in shapes if s[-2:] == (n, n)]  # noqa: E731
    assert square(saved_shapes(model, x, written_out("attnlrp")))
    for preset in PRESETS:
        assert square(saved_shapes(model, x, PRESETS[preset]())) == []


# --------------------------------------------------------------------------------------------
# where the kernel is written out instead
# --------------------------------------------------------------------------------------------
def test_rules_that_are_not_gradient_scalings_write_the_kernel_out():
    """Chefer's rules with the fused rule registered: the kernel is written out, as chefer2021."""
    model = build("llama", "sdpa", DT)
    reg = chefer2021().copy("chefer-with-fused")
    reg.register(SDPA, FusedAttention())
    got = attnx.explain(model, inputs(), method="lrp", preset=reg, target=[1, 2, 0])
    ref = attnx.explain(model, inputs(), method="lrp", preset="chefer2021", target=[1, 2, 0])
    assert rules_used(got) == ["decompose"]
    assert relative_error(got.input_relevance, ref.input_relevance) <= 1e-12


def test_an_overridden_softmax_rule_is_honoured():
    """A user's softmax rule on a copy of attnlrp reaches the attention (the kernel is written out)."""
    model = build("llama", "sdpa", DT)
    reg = attnlrp().copy("attnlrp-identity-softmax")
    reg.register(F.softmax, rules.Identity())
    got = attnx.explain(model, inputs(), method="lrp", preset=reg, target=[1, 2, 0])
    assert rules_used(got) == ["decompose"]
    assert ("softmax", "identity") in got.coverage.handled
    fused = attnx.explain(model, inputs(), method="lrp", preset="attnlrp", target=[1, 2, 0])
    assert relative_error(got.input_relevance, fused.input_relevance) > 1e-3


def test_dropout_and_a_relevance_carrying_mask_write_the_kernel_out():
    class WithMask(Attention):
        def forward(self, x):
            q, k, v = self.qkv(x)
            return SDPA(q, k, v, (x @ x.transpose(-2, -1))[:, None] / 10)  # a mask computed from the input

    x = torch.randn(2, N, 6, generator=torch.Generator().manual_seed(5), dtype=DT)
    _, engine = relevance_with(WithMask(), x, attnlrp())
    assert engine.summary().rule_of("scaled_dot_product_attention") == ["decompose"]
    module = Attention(dropout_p=0.5)
    with LRPEngine(module, attnlrp()) as engine:
        module(engine.track(x))
    assert engine.summary().rule_of("scaled_dot_product_attention") == ["decompose"]


def test_the_plain_backward_of_the_same_forward_is_the_gradient():
    """With plain edges (one forward, a plain and a relevance backward) the plain backward is
    the exact gradient and the relevance backward the rules'."""
    module = Attention(is_causal=True)
    x = torch.randn(2, N, 6, generator=torch.Generator().manual_seed(6), dtype=DT)
    for preset in PRESETS:
        with LRPEngine(module, PRESETS[preset](), plain_edges=True) as engine:
            xt = engine.track(x)
            out = module(xt)
        with engine.propagation.plain():
            (plain,) = torch.autograd.grad(out, xt, out.detach(), retain_graph=True)
        (modified,) = torch.autograd.grad(out, xt, out.detach())
        xr = x.clone().requires_grad_(True)
        ref = module(xr)
        assert relative_error(plain, torch.autograd.grad(ref, xr, ref.detach())[0]) <= 1e-12
        assert relative_error(xt * modified, relevance_by_hand(module, x, preset)) <= 1e-12
