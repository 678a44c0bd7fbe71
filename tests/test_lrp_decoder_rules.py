"""The rules for the ops modern decoders bring, each against its explicit formula in float64.

Same pattern as :mod:`test_lrp_rules`: a tiny module doing the op, an engine with the preset (or a
registry holding the rule) in strict mode, one backward from a random modified gradient ``seed``
of the output (``R_y = y ⊙ seed``), and the input relevance compared with a reference written
here from the rule's formula (explicit matrices, explicit sums; none of the library's helpers).

* RMSNorm (RMS held constant): ``R_x = x ⊙ w' ⊙ g / rms(x)`` with ``w' = w`` (Llama, T5,
  ``nn.RMSNorm``, ``F.rms_norm``) or ``1 + w`` (Gemma), i.e. ``R_x = R_y``; ε-stabilised in
  ``attnlrp``; a module taken for an RMSNorm that is not one raises.
* GPT-2's ``Conv1D`` (weight ``(in, out)``): every linear rule against the matrix ``M = Wᵀ``.
* MoE grouped products ``grouped_mm``: block by block against their matrices (float32: the CPU
  kernel has no float64).
* tanh-GELU written out (``NewGELUActivation``, ``GELUTanh``, ``FastGELUActivation``,
  ``F.gelu(approximate="tanh")``) and soft-capping ``tanh(x / c) * c``: identity, ``R_x = R_y``.
* Gated MLP ``down(act(gate(x)) * up(x))`` under each preset: identity on the activation,
  each operand of the product half (after ``safe_divide`` for ``chefer2021``), the preset's
  linear rule on the three projections.
* Rotary embeddings ``q cos + rotate_half(q) sin``: the linear map of the block rotation matrix.
* A Mixtral MoE block: routing weights constant, so ``R_x`` is the sum over each token's
  selected experts of the gated-MLP relevance of ``w_k E_k(x)``.
* ALiBi and T5 relative position biases: constants, against the AttnLRP attention written
  independently in lxt's form (gradients of ``q, k`` divided by 4, of ``v`` by 2).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnx.lrp import presets, rules
from attnx.lrp.kinds import RMS_NORM
from test_lrp_rules import (
    DT, LINEAR_RULES, assert_same, chefer_safe_divide, differs, randn, ref_alpha_beta, ref_epsilon, registry, run_engine,
)

transformers = pytest.importorskip("transformers")


def rule_names(engine) -> dict:
    return {op: rule for (op, rule) in engine.coverage}


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------
class MyRMSNorm(nn.Module):
    """A user's own RMSNorm in float64 (recognised by its name)."""

    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(weight), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


class FunctionalRMSNorm(nn.Module):
    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight), eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rms_module(kind: str, w: torch.Tensor, eps: float) -> tuple[nn.Module, torch.Tensor, float]:
    """``(module, effective weight w', tolerance)``; Hugging Face modules compute in float32."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    if kind == "mine":
        return MyRMSNorm(w, eps), w, 1e-12
    if kind == "nn.RMSNorm":
        m = nn.RMSNorm(w.shape[0], eps=eps).to(DT)
    elif kind == "F.rms_norm":
        return FunctionalRMSNorm(w, eps), w, 1e-12
    elif kind == "llama":
        m = LlamaRMSNorm(w.shape[0], eps=eps).to(DT)
    elif kind == "t5":
        m = T5LayerNorm(w.shape[0], eps=eps).to(DT)
    else:  # gemma: (1 + weight)
        m = Gemma2RMSNorm(w.shape[0], eps=eps).to(DT)
        with torch.no_grad():
            m.weight.copy_(w - 1)
        return m, w, 1e-6
    with torch.no_grad():
        m.weight.copy_(w)
    return m, w, 1e-12 if kind == "nn.RMSNorm" else 1e-6


RMS_KINDS = ["mine", "nn.RMSNorm", "F.rms_norm", "llama", "t5", "gemma"]


@pytest.mark.parametrize("preset", ["cplrp", "attnlrp", "chefer2021"])
@pytest.mark.parametrize("kind", RMS_KINDS)
def test_rmsnorm_holds_the_rms_constant(kind, preset):
    w, eps = 1 + 0.5 * randn(6, seed=40), 0.3  # a large ε: an rms without it would show
    module, w_eff, tol = rms_module(kind, w, eps)
    x = randn(2, 3, 6, seed=41) * 0.7
    seed = randn(2, 3, 6, seed=42)
    y, (R_x,), engine = run_engine(module, presets[preset](), x, seed=seed)
    assert set(rule_names(engine).values()) == {"rmsnorm-const-rms"}, engine.report()
    rms = torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps)
    g = seed
    if preset == "attnlrp":  # the incoming relevance ε-stabilised first: R_y ⊙ y / (y + ε sign y)
        e = 1e-6
        yy = x * w_eff / rms
        g = seed * yy / (yy + e * torch.where(yy >= 0, 1.0, -1.0))
    assert_same(R_x, x * w_eff * g / rms, tol)
    # the rule replaced the backward: plain gradient x input differs
    plain = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(module(plain), plain, seed)
    assert differs(R_x, x * grad)


def test_rmsnorm_epsilon_stabilisation_is_the_layernorm_one():
    w, eps = 1 + 0.5 * randn(6, seed=40), 1e-6
    module = MyRMSNorm(w, eps)
    x, seed = randn(2, 3, 6, seed=41), randn(2, 3, 6, seed=42)
    y, (R_x,), _ = run_engine(module, registry((RMS_NORM, rules.RMSNormConstantRMS(0.5))), x, seed=seed)
    y = y.detach()
    assert_same(R_x, (y * seed) * y / (y + 0.5 * torch.where(y >= 0, 1.0, -1.0)))


class CenteredNorm(nn.Module):
    """Named like an RMSNorm, but subtracts the mean (a LayerNorm)."""

    def __init__(self):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(6, dtype=DT)), 1e-6

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def test_a_module_taken_for_an_rmsnorm_that_is_not_one_raises():
    CenteredNorm.__name__ = "CenteredRMSNorm"  # the name predicate takes it
    module = CenteredNorm()
    x = randn(2, 3, 6, seed=43) + 1.0
    with pytest.raises(ValueError, match=r"CenteredRMSNorm.*not x / rms\(x\).*Registry.register"):
        run_engine(module, presets["attnlrp"](), x, seed=torch.ones(2, 3, 6, dtype=DT))


def test_the_rmsnorm_kind():
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    for m in (nn.RMSNorm(4), Gemma3RMSNorm(4), Qwen3RMSNorm(4), T5LayerNorm(4), MyRMSNorm(torch.ones(4), 1e-6)):
        assert RMS_NORM.matches("x", m), type(m).__name__
    for m in (nn.LayerNorm(4), nn.BatchNorm1d(4), nn.Linear(4, 4)):
        assert not RMS_NORM.matches("x", m), type(m).__name__
    # Cohere's LayerNorm looks like T5's (no bias, variance_epsilon) but centres: the rule refuses it
    cohere = CohereLayerNorm(6, eps=1e-5).to(DT)
    assert RMS_NORM.matches("x", cohere)
    with pytest.raises(ValueError, match="CohereLayerNorm"):
        run_engine(cohere, presets["cplrp"](), randn(2, 3, 6, seed=44) + 1.0, seed=torch.ones(2, 3, 6, dtype=DT))


# --------------------------------------------------------------------------------------------
# GPT-2's Conv1D and MoE grouped products: linear layers
# --------------------------------------------------------------------------------------------
def conv1d():
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(5, 6).to(DT)  # nf=5 outputs, nx=6 inputs: weight (6, 5)
    w = randn(6, 5, seed=45)
    w[:, 2] = 0  # an output with zero denominators
    w[:, 3] *= 1e-6
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(randn(5, seed=46) * 0.5)
    return m


@pytest.mark.parametrize("rule", list(LINEAR_RULES))
def test_conv1d_is_a_linear_layer_with_a_transposed_weight(rule):
    make, reference, rule_name = LINEAR_RULES[rule]
    from attnx.lrp.kinds import HF_CONV1D

    module = conv1d()
    x = randn(2, 3, 6, seed=47)
    seed = randn(2, 3, 5, seed=48)
    y, (R_x,), engine = run_engine(module, registry((HF_CONV1D, make())), x, seed=seed)
    assert rule_names(engine) == {"Conv1D": rule_name}, engine.report()
    M = module.weight.detach().T  # (out, in)
    expected = reference(x.reshape(-1, 6), M, module.bias.detach(), (y * seed).reshape(-1, 5)).reshape(x.shape)
    assert_same(R_x, expected)


@pytest.mark.parametrize("preset,rule", [("chefer2021", "alpha-beta"), ("attnlrp", "epsilon"), ("attnlrp-gamma", "gamma"), ("cplrp", "gradient")])
def test_presets_treat_conv1d_as_their_linear_layer(preset, rule):
    class GPT2MLPLike(nn.Module):  # "mlp" in the name: a feed-forward block for attnlrp-gamma
        def __init__(self):
            super().__init__()
            self.c_fc = conv1d()

        def forward(self, x):
            return self.c_fc(x)

    y, _, engine = run_engine(GPT2MLPLike(), presets[preset](), randn(2, 3, 6, seed=47), seed=randn(2, 3, 5, seed=48))
    assert rule_names(engine) == {"Conv1D": rule}


def grouped_case():
    """Rows of ``x`` in three groups (sizes 2, 0, 3) over three experts' ``(in, out)`` weights
    (sizes multiple of 4 floats: the kernel wants 16-byte strides)."""
    x = randn(5, 4, seed=49).float()
    w = randn(3, 4, 4, seed=50).float()
    w[0, :, 1] = 0
    offs = torch.tensor([2, 2, 5], dtype=torch.int32)
    return x, w, offs


class Grouped(nn.Module):
    def __init__(self, w, offs):
        super().__init__()
        self.w, self.offs = nn.Parameter(w), offs

    def forward(self, x):
        return torch._grouped_mm(x, self.w, offs=self.offs)


@pytest.mark.skipif(not rules.GROUPED_MM, reason="this torch has no grouped_mm")
@pytest.mark.parametrize("rule", ["alpha1beta0", "epsilon"])
def test_grouped_mm_is_a_linear_layer_per_group(rule):
    make, reference, rule_name = LINEAR_RULES[rule]
    x, w, offs = grouped_case()
    module = Grouped(w, offs)
    seed = randn(5, 4, seed=51).float()
    engine_y, (R_x,), engine = run_engine_f32(module, registry((torch._grouped_mm, make())), x, seed)
    assert rule_names(engine) == {"_grouped_mm": rule_name}, engine.report()
    # reference in float64, block by block: rows start:end use M_e = w[e]ᵀ
    R_y = (engine_y.double() * seed.double())
    expected = torch.zeros(5, 4, dtype=DT)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            M = w[e].double().T
            expected[start:end] = reference(x[start:end].double(), M, torch.zeros(4, dtype=DT), R_y[start:end])
        start = end
    scale = expected.abs().max().item()
    assert (R_x.double() - expected).abs().max().item() <= 1e-5 * scale


def run_engine_f32(module, reg, x, seed):
    from attnx.lrp import LRPEngine

    engine = LRPEngine(module, reg)
    with engine:
        xt = engine.track(x.clone())
        y = module(xt)
    engine.check_coverage()
    (g,) = torch.autograd.grad(y, xt, seed)
    return y.detach(), (xt.detach() * g,), engine


# --------------------------------------------------------------------------------------------
# activations written out, soft-capping: identity
# --------------------------------------------------------------------------------------------
class GeluTanhF(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class SoftCap(nn.Module):
    """Gemma 2's ``tanh(x / c) * c`` (attention logits and final logits)."""

    def forward(self, x):
        return torch.tanh(x / 2.0) * 2.0


def activation(kind: str) -> nn.Module:
    from transformers import activations as A

    return {
        "NewGELUActivation": A.NewGELUActivation, "GELUTanh": lambda: A.GELUTanh(use_gelu_tanh_python=True),
        "FastGELUActivation": A.FastGELUActivation, "QuickGELUActivation": A.QuickGELUActivation,
        "F.gelu(tanh)": GeluTanhF, "softcap": SoftCap,
    }[kind]()


@pytest.mark.parametrize("preset", ["chefer2021", "attnlrp", "cplrp"])
@pytest.mark.parametrize("kind", ["NewGELUActivation", "GELUTanh", "FastGELUActivation", "QuickGELUActivation", "F.gelu(tanh)", "softcap"])
def test_elementwise_activations_and_soft_capping_are_identity(kind, preset):
    module = activation(kind)
    x = randn(2, 3, 6, seed=52) * 3
    seed = randn(2, 3, 6, seed=53)
    y, (R_x,), engine = run_engine(module, presets[preset](), x, seed=seed)
    assert not engine.uncovered
    assert "identity" in rule_names(engine).values(), engine.report()
    assert_same(R_x, module(x).detach() * seed, 1e-12)  # R_x = R_y
    plain = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(module(plain), plain, seed)
    assert differs(R_x, x * g)


# --------------------------------------------------------------------------------------------
# gated MLP
# --------------------------------------------------------------------------------------------
def llama_mlp(act: str = "silu"):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    m = LlamaMLP(LlamaConfig(hidden_size=6, intermediate_size=7, hidden_act=act, num_attention_heads=1)).to(DT)
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(randn(*p.shape, seed=60 + i) * 0.8)
    return m


def ref_linear(kind: str, x, W, R):
    """Relevance through ``x Wᵀ`` (no bias) for the preset's linear rule."""
    if kind == "alpha-beta":
        return ref_alpha_beta(x, W, R, 1.0, 0.0)
    return ref_epsilon(x, W, torch.zeros(W.shape[0], dtype=DT), R, 1e-6 if kind == "epsilon" else 0.0)


def ref_gated_mlp(x, Wg, Wu, Wd, act, R_y, linear: str, chefer: bool):
    """``y = Wd (act(Wg x) ⊙ Wu x)``: the preset's rule on Wd, then the product ``z = a ⊙ b``
    gives each operand ½ of ``a ⊙ b ⊙ S`` (``S = R / z``; Chefer: ``safe_divide``), the identity
    passes ``R_a`` to ``Wg x``, and the preset's rule on Wg and Wu."""
    pre, b = x @ Wg.T, x @ Wu.T
    a = act(pre)
    z = a * b
    R_z = ref_linear(linear, z, Wd, R_y)
    S = chefer_safe_divide(R_z, z) if chefer else R_z / z
    R_a = R_b = 0.5 * a * b * S
    return ref_linear(linear, x, Wg, R_a) + ref_linear(linear, x, Wu, R_b)


PRESET_LINEAR = {"chefer2021": "alpha-beta", "attnlrp": "epsilon", "cplrp": "gradient"}


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("preset", list(PRESET_LINEAR))
def test_gated_mlp(preset, act):
    m = llama_mlp(act)
    x = randn(2, 3, 6, seed=54)
    seed = randn(2, 3, 6, seed=55)
    y, (R_x,), engine = run_engine(m, presets[preset](), x, seed=seed)
    assert "bilinear" in rule_names(engine).values() and not engine.uncovered, engine.report()
    Wg, Wu, Wd = (p.weight.detach() for p in (m.gate_proj, m.up_proj, m.down_proj))
    act_fn = F.silu if act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    expected = ref_gated_mlp(x.reshape(-1, 6), Wg, Wu, Wd, act_fn, (y * seed).reshape(-1, 6), PRESET_LINEAR[preset], preset == "chefer2021")
    assert_same(R_x, expected.reshape(x.shape), 1e-9)
    if preset == "cplrp":  # no bias: the product's halves and the identity conserve
        assert_same(R_x.sum(), (y * seed).sum(), 1e-12)


def test_chefer2021_products_with_constants_stay_linear():
    """The gate rule of chefer2021 takes only products of two carrying tensors: ``q * scale``
    stays plain gradient, and remembers its scale (Chefer's stabiliser is stated unscaled)."""

    class Scaled(nn.Module):
        def forward(self, q):
            s = q * 0.25
            return s @ q.transpose(-2, -1)

    q = randn(2, 4, 3, seed=56)
    y, (R_q,), engine = run_engine(Scaled(), presets["chefer2021"](), q, seed=randn(2, 4, 4, seed=57))
    assert engine.coverage[("mul", "gradient (linear)")] == 1 and engine.coverage[("matmul", "bilinear")] == 1


# --------------------------------------------------------------------------------------------
# rotary embeddings: linear in q
# --------------------------------------------------------------------------------------------
class Rotary(nn.Module):
    def __init__(self, cos, sin):
        super().__init__()
        self.cos, self.sin = cos, sin

    def forward(self, q):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb(q, q, self.cos, self.sin)[0]


@pytest.mark.parametrize("preset", ["attnlrp", "cplrp", "chefer2021"])
def test_rotary_embedding_is_the_rotation_matrix(preset):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    B, H, T, D = 2, 2, 5, 6
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=H * D, num_attention_heads=H, rope_theta=10.0))
    q = randn(B, H, T, D, seed=58)
    cos, sin = rope(q, torch.arange(T)[None].expand(B, T))
    seed = randn(B, H, T, D, seed=59)
    y, (R_q,), engine = run_engine(Rotary(cos.to(DT), sin.to(DT)), presets[preset](), q, seed=seed)
    assert not engine.uncovered, engine.report()
    ops = rule_names(engine)
    assert ops["cat"] == ops["neg"] == ops["mul"] == "gradient (linear)"
    if preset == "chefer2021":  # its residual rule normalises every sum: nothing more to check
        assert ops["add"] == "normalized-add"
        return
    # position t rotates the pairs (i, i + D/2) by the angles t θ_i
    theta = 10.0 ** (-torch.arange(0, D, 2, dtype=DT) / D)
    R = torch.zeros(T, D, D, dtype=DT)
    for t in range(T):
        for i in range(D // 2):
            c, s = math.cos(t * theta[i]), math.sin(t * theta[i])
            R[t, i, i], R[t, i, i + D // 2] = c, -s
            R[t, i + D // 2, i], R[t, i + D // 2, i + D // 2] = s, c
    assert_same(y, torch.einsum("tij,bhtj->bhti", R, q), 1e-6)  # the rotation matrix is the op
    expected = q * torch.einsum("tij,bhti->bhtj", R, seed)  # q ⊙ Rᵀ g
    assert_same(R_q, expected, 1e-6)  # cos / sin come in float32


# --------------------------------------------------------------------------------------------
# a mixture-of-experts block: routing weights constant
# --------------------------------------------------------------------------------------------
def mixtral_block(experts: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=8, intermediate_size=4, num_local_experts=3, num_experts_per_tok=2, num_attention_heads=1)
    cfg._experts_implementation = experts
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for i, p in enumerate(block.parameters()):
            p.copy_(randn(*p.shape, seed=70 + i) * 0.8)
    return block


@pytest.mark.parametrize("preset", list(PRESET_LINEAR))
@pytest.mark.parametrize("experts", ["eager", "grouped_mm"])
def test_moe_block_holds_the_routing_weights_constant(experts, preset):
    dtype = DT if experts == "eager" else torch.float32  # the CPU grouped_mm has no float64
    block = mixtral_block(experts).to(dtype)
    x = randn(2, 4, 8, seed=71).to(dtype)
    seed = randn(2, 4, 8, seed=72).to(dtype)
    if dtype == DT:
        y, (R_x,), engine = run_engine(block, presets[preset](), x, seed=seed)
    else:
        y, (R_x,), engine = run_engine_f32(block, presets[preset](), x, seed)
    ops = rule_names(engine)
    assert ops["MixtralTopKRouter"] == "constant" and not engine.uncovered, engine.report()
    # the reference: route every token by hand, then each selected expert's gated MLP with
    # its output relevance w_k E_k(x) ⊙ g
    x64, g64, y64 = x.double().reshape(-1, 8), seed.double().reshape(-1, 8), y.double().reshape(-1, 8)
    probs = torch.softmax((x64 @ block.gate.weight.double().T).float(), -1)  # Mixtral routes in float32
    top, idx = probs.topk(2, -1)
    top = (top / top.sum(-1, keepdim=True)).double()
    gate_up, down = block.experts.gate_up_proj.double(), block.experts.down_proj.double()
    expected = torch.zeros_like(x64)
    out = torch.zeros_like(x64)
    for t in range(x64.shape[0]):
        for k in range(2):
            e = idx[t, k].item()
            Wg, Wu = gate_up[e].chunk(2, 0)
            xt = x64[t : t + 1]
            E = (F.silu(xt @ Wg.T) * (xt @ Wu.T)) @ down[e].T
            out[t] += top[t, k] * E[0]
            R_out = top[t, k] * E * g64[t : t + 1]
            R_in = ref_gated_mlp(xt, Wg, Wu, down[e], F.silu, R_out, PRESET_LINEAR[preset], preset == "chefer2021")[0]
            if preset == "chefer2021":  # the experts gather their tokens: Chefer's IndexSelect rule
                R_in = R_in * chefer_safe_divide(xt[0], xt[0])
            expected[t] += R_in
    tol = 1e-9 if dtype == DT else 1e-4
    assert (out - y64).abs().max() <= tol * out.abs().max()  # the routing by hand is the block's
    assert (R_x.double().reshape(-1, 8) - expected).abs().max() <= tol * expected.abs().max()


# --------------------------------------------------------------------------------------------
# ALiBi and relative position biases: constants
# --------------------------------------------------------------------------------------------
class BiasedAttention(nn.Module):
    """One attention layer whose scores get a position bias: ALiBi slopes ``-m_h |i - j|`` or a
    T5-style learned bias looked up by relative-position bucket."""

    def __init__(self, kind: str, D: int = 6, H: int = 2):
        super().__init__()
        self.kind, self.H, self.d = kind, H, D // H
        self.qkv, self.out = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.rel = nn.Embedding(9, H)
        self.to(DT)
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_(randn(*p.shape, seed=80 + i))

    def bias(self, T: int) -> torch.Tensor:
        pos = torch.arange(T)
        rel = pos[None, :] - pos[:, None]
        if self.kind == "alibi":
            slopes = torch.tensor([2.0 ** -(h + 1) for h in range(self.H)], dtype=DT)
            return -slopes[:, None, None] * rel.abs()[None].to(DT)
        return self.rel(rel.clamp(-4, 4) + 4).permute(2, 0, 1)

    def forward(self, x, scale_grad=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.H, self.d).permute(2, 0, 3, 1, 4)
        if scale_grad is not None:  # lxt's form of the uniform rule
            q, k, v = scale_grad(q, 4), scale_grad(k, 4), scale_grad(v, 2)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d) + self.bias(T), -1)
        return self.out((a @ v).transpose(1, 2).reshape(B, T, -1))


class DivideGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g / ctx.factor, None


@pytest.mark.parametrize("kind", ["alibi", "t5"])
def test_position_biases_are_constants(kind):
    module = BiasedAttention(kind)
    x, seed = randn(2, 5, 6, seed=90), randn(2, 5, 6, seed=91)
    reg = presets["attnlrp"]()
    reg.register(nn.Linear, rules.Passthrough())  # ε -> 0, as in lxt's efficient mode
    y, (R_x,), engine = run_engine(module, reg, x, seed=seed)
    assert not engine.uncovered, engine.report()
    # AttnLRP in lxt's form: plain autograd with q, k gradients / 4, v / 2; the bias a constant
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(module(xr, scale_grad=DivideGradient.apply), xr, seed)
    assert_same(R_x, x * g, 1e-10)
    # CP-LRP: the attention is constant, so the layer is linear in x and conserves
    _, (R_cp,), _ = run_engine(module, presets["cplrp"](), x, seed=seed)
    assert_same(R_cp.sum((1, 2)), (y * seed).sum((1, 2)), 1e-12)


class NamedRouter(nn.Module):
    """A router returning a named tuple, as some MoE implementations do."""

    Routing = __import__("collections").namedtuple("Routing", "logits weights")

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 2, bias=False).to(DT)

    def forward(self, x):
        logits = self.proj(x)
        return self.Routing(logits, torch.softmax(logits, -1))


class TwoExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = NamedRouter()
        self.experts = nn.ModuleList(nn.Linear(4, 4, bias=False).to(DT) for _ in range(2))

    def forward(self, x):
        w = self.router(x).weights
        return w[..., :1] * self.experts[0](x) + w[..., 1:] * self.experts[1](x)


def test_router_returning_a_named_tuple_is_constant():
    model = TwoExperts()
    x, seed = randn(3, 4, seed=92), randn(3, 4, seed=93)
    reg = presets["attnlrp"]().register(nn.Linear, rules.Passthrough())  # its softmax is not constant
    y, (R_x,), engine = run_engine(model, reg, x, seed=seed)
    assert rule_names(engine)["NamedRouter"] == "constant"
    w = torch.softmax(model.router.proj(x), -1).detach()
    W0, W1 = (e.weight.detach() for e in model.experts)
    expected = x * ((w[:, :1] * seed) @ W0 + (w[:, 1:] * seed) @ W1)  # x ⊙ Σ_k w_k W_kᵀ g
    assert_same(R_x, expected)
