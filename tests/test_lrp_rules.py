"""Every LRP rule against its explicit formula on a single op, in float64 (zennit's pattern).

The reference of each rule is written here, in matrix form, from the formula in the rule's
docstring (and for the ``chefer2021`` rules from Chefer et al.'s reference code, whose
``safe_divide`` is replicated below): a linear or convolution layer becomes an explicit matrix
``M`` (the convolution matrix is built with loops over its indices) and relevance is computed
with explicit sums over inputs ``i`` and outputs ``j``. None of the library's helpers is used.

The library side runs the way users run it: a tiny module that does only that op, an
:class:`attnx.lrp.LRPEngine` with a registry holding the rule, ``x = engine.track(x)``, a
forward, ``torch.autograd.grad(out, x, seed)`` and ``R_x = x * grad``. So the tests also cover
the module hooks (module keys) and the ``TorchFunctionMode`` (function keys). The seed is a
random modified gradient ``g̃(y)`` of the output: the relevance arriving at the op is
``R_y = y ⊙ seed``.

The rules for the ops modern decoders bring follow the same pattern (with the preset, or a registry
holding the rule, in strict mode), their references written from each rule's formula:

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

from attnx.lrp import LRPEngine, Registry, presets, rules
from attnx.lrp.kinds import RMS_NORM

DT = torch.float64


# --------------------------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=DT)


def run_engine(module: nn.Module, registry: Registry, *inputs: torch.Tensor, seed: torch.Tensor):
    """``(y, [R_x for each input], engine)``: one LRP pass of ``module`` through the engine."""
    engine = LRPEngine(module, registry, strict=True)
    with engine:
        xs = [engine.track(x.detach().clone()) for x in inputs]
        y = module(*xs)
    engine.check_coverage()  # strict: raises if the op was not handled
    grads = torch.autograd.grad(y, xs, seed, allow_unused=True)
    rel = [x.detach() * (torch.zeros_like(x) if g is None else g) for x, g in zip(xs, grads)]
    return y.detach(), rel, engine


def rule_calls(engine: LRPEngine, rule_name: str) -> int:
    """How many calls the coverage table reports for ``rule_name`` (whatever the op's spelling)."""
    return sum(n for (op, rule), n in engine.coverage.items() if rule == rule_name)


def registry(*pairs) -> Registry:
    reg = Registry("test")
    for key, rule in pairs:
        reg.register(key, rule)
    return reg


def assert_same(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-10) -> None:
    assert got.shape == expected.shape, (tuple(got.shape), tuple(expected.shape))
    assert got.dtype == DT
    scale = max(1.0, expected.abs().max().item())
    err = (got - expected).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3e} (scale {scale:.3e})"


def differs(a: torch.Tensor, b: torch.Tensor, by: float = 1e-6) -> bool:
    return (a - b).abs().max().item() > by * max(1.0, b.abs().max().item())


def chefer_safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``safe_divide`` of Chefer et al.'s ``layers_ours.py``, verbatim."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def sign1(z: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1 (the ε-rule convention)."""
    return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


# --------------------------------------------------------------------------------------------
# linear layers in matrix form
# --------------------------------------------------------------------------------------------
def conv_matrix(weight: torch.Tensor, in_shape, stride, padding, dilation) -> tuple[torch.Tensor, tuple]:
    """The convolution (no bias) as a dense matrix ``M``: ``y.flatten() = M @ x.flatten()`` per
    sample; built with loops over output channel, output position, input channel and tap."""
    cout, cin, kh, kw = weight.shape
    _, H, W = in_shape
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    M = torch.zeros(cout, Ho, Wo, cin, H, W, dtype=weight.dtype)
    for o in range(cout):
        for p in range(Ho):
            for q in range(Wo):
                for c in range(cin):
                    for a in range(kh):
                        for b in range(kw):
                            r = p * stride[0] - padding[0] + a * dilation[0]
                            s = q * stride[1] - padding[1] + b * dilation[1]
                            if 0 <= r < H and 0 <= s < W:
                                M[o, p, q, c, r, s] += weight[o, c, a, b]
    return M.reshape(cout * Ho * Wo, cin * H * W), (cout, Ho, Wo)


def ref_alpha_beta(x, M, R, alpha, beta, divide=chefer_safe_divide):
    """Chefer's ``Linear.relprop``: rows of ``x`` (n, I), ``M`` (J, I), ``R`` (n, J); bias ignored.

    R_i = α Σ_j (x⁺_i M⁺_ji + x⁻_i M⁻_ji) R_j / z⁺_j − β Σ_j (x⁺_i M⁻_ji + x⁻_i M⁺_ji) R_j / z⁻_j
    """
    xp, xn = x.clamp(min=0)[:, None, :], x.clamp(max=0)[:, None, :]
    Mp, Mn = M.clamp(min=0)[None], M.clamp(max=0)[None]
    act = xp * Mp + xn * Mn  # (n, J, I) activating contributions
    inh = xp * Mn + xn * Mp  # inhibiting contributions
    out = alpha * (act * divide(R, act.sum(-1))[..., None]).sum(1)
    if beta:
        out = out - beta * (inh * divide(R, inh.sum(-1))[..., None]).sum(1)
    return out


def ref_epsilon(x, M, bias, R, eps):
    """R_i = Σ_j x_i M_ji R_j / (z_j + ε sign z_j), z_j = Σ_i x_i M_ji + b_j."""
    c = x[:, None, :] * M[None]
    z = c.sum(-1) + bias
    return (c * (R / (z + eps * sign1(z)))[..., None]).sum(1)


def ref_gamma(x, M, bias, R, gamma, eps):
    """Generalised LRP-γ (Montavon et al. 2019; zennit's ``Gamma``), the γ-modified bias in the
    denominator.

    Outputs with y_j > 0: contributions x⁺_i (M + γM⁺)_ji + x⁻_i (M + γM⁻)_ji (the positive
    ones, amplified) and the bias b_j + γ b⁺_j; outputs with y_j ≤ 0: x⁺_i (M + γM⁻)_ji +
    x⁻_i (M + γM⁺)_ji and b_j + γ b⁻_j. Then R_i = Σ_j c_ji R_j / (Σ_i c_ji + bias_j + ε sign).
    """
    xp, xn = x.clamp(min=0)[:, None, :], x.clamp(max=0)[:, None, :]
    Mup = (M + gamma * M.clamp(min=0))[None]
    Mdn = (M + gamma * M.clamp(max=0))[None]
    y = (x[:, None, :] * M[None]).sum(-1) + bias
    pos = y > 0
    c = torch.where(pos[..., None], xp * Mup + xn * Mdn, xp * Mdn + xn * Mup)
    b = torch.as_tensor(bias, dtype=x.dtype).expand_as(y)
    z = c.sum(-1) + torch.where(pos, b + gamma * b.clamp(min=0), b + gamma * b.clamp(max=0))
    return (c * (R / (z + eps * sign1(z)))[..., None]).sum(1)


def ref_zbox(x, M, R, lo, hi):
    """z^B (Chefer's ``Conv2d.relprop`` for the pixels): per row bounds ``lo``, ``hi`` (n,).

    q_ji = M_ji x_i − M⁺_ji l − M⁻_ji h, R_i = Σ_j q_ji R_j / (Σ_i q_ji + 1e-9).
    """
    q = x[:, None, :] * M[None] - lo[:, None, None] * M.clamp(min=0)[None] - hi[:, None, None] * M.clamp(max=0)[None]
    z = q.sum(-1) + 1e-9
    return (q * (R / z)[..., None]).sum(1)


class FunctionalLinear(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FunctionalConv(nn.Module):
    def __init__(self, weight, bias, **conv):
        super().__init__()
        self.weight, self.bias, self.conv = nn.Parameter(weight), nn.Parameter(bias), conv

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, **self.conv)


#: conv configurations: (stride, padding, dilation, input H, W); the second leaves the last input
#: row unused (the backward needs the right output padding), the third is dilated and asymmetric
CONVS = {
    "s1p1": ((1, 1), (1, 1), (1, 1), 5, 6),
    "s2p0": ((2, 2), (0, 0), (1, 1), 6, 7),
    "s12p10d2": ((1, 2), (1, 0), (2, 1), 6, 7),
}


def linear_case(kind: str):
    """``(module, input, registry keys, M, bias_per_output, to_rows, from_rows, coverage name)``.

    The weights have one all-zero output (zero denominators: ``safe_divide`` gives 0) and one
    output with weights of size 1e-6 (denominators of size 1e-6, where the stabiliser shows).
    """
    if kind in ("linear", "F.linear"):
        w = randn(5, 6, seed=1)
        w[2] = 0
        w[3] *= 1e-6
        b = randn(5, seed=2) * 0.5
        x = randn(2, 3, 6, seed=3)
        module = nn.Linear(6, 5).to(DT) if kind == "linear" else FunctionalLinear(w, b)
        if kind == "linear":
            with torch.no_grad():
                module.weight.copy_(w)
                module.bias.copy_(b)
        keys = (nn.Linear, F.linear)
        name = "Linear" if kind == "linear" else "linear"
        return module, x, keys, w, b, (lambda t: t.reshape(-1, t.shape[-1])), (lambda t, like: t.reshape(like.shape)), name
    cfg = kind.split("-")[1]
    stride, padding, dilation, H, W = CONVS[cfg]
    w = randn(3, 2, 3, 2, seed=4)
    w[1] = 0
    w[2] *= 1e-6
    b = randn(3, seed=5) * 0.5
    x = randn(2, 2, H, W, seed=6)
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    if kind.startswith("conv-"):
        module = nn.Conv2d(2, 3, (3, 2), **conv).to(DT)
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)
        name = "Conv2d"
    else:
        module = FunctionalConv(w, b, **conv)
        name = "conv2d"
    M, out_shape = conv_matrix(w, x.shape[1:], stride, padding, dilation)
    bias_full = b[:, None, None].expand(out_shape).reshape(-1)
    return module, x, (nn.Conv2d, F.conv2d), M, bias_full, (lambda t: t.reshape(t.shape[0], -1)), (lambda t, like: t.reshape(like.shape)), name


LINEAR_KINDS = ["linear", "F.linear", "conv-s1p1", "conv-s2p0", "F.conv2d-s12p10d2"]


def test_conv_matrix_is_the_convolution():
    """The reference's matrix form reproduces F.conv2d (so the references below see the real op)."""
    for stride, padding, dilation, H, W in CONVS.values():
        w, x = randn(3, 2, 3, 2, seed=4), randn(2, 2, H, W, seed=6)
        M, shape = conv_matrix(w, x.shape[1:], stride, padding, dilation)
        y = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
        assert y.shape[1:] == shape
        assert_same((x.reshape(2, -1) @ M.T).reshape(y.shape), y, 1e-13)


LINEAR_RULES = {
    "alpha1beta0": (lambda: rules.AlphaBeta(1.0, 0.0), lambda x, M, b, R: ref_alpha_beta(x, M, R, 1.0, 0.0), "alpha-beta"),
    "alpha2beta1": (lambda: rules.AlphaBeta(2.0, 1.0), lambda x, M, b, R: ref_alpha_beta(x, M, R, 2.0, 1.0), "alpha-beta"),
    "epsilon": (lambda: rules.Epsilon(0.05), lambda x, M, b, R: ref_epsilon(x, M, b, R, 0.05), "epsilon"),
    "gamma": (lambda: rules.Gamma(0.5, epsilon=1e-2), lambda x, M, b, R: ref_gamma(x, M, b, R, 0.5, 1e-2), "gamma"),
}


@pytest.mark.parametrize("kind", LINEAR_KINDS)
@pytest.mark.parametrize("rule", list(LINEAR_RULES))
def test_linear_rules_match_their_formula(rule, kind):
    make, reference, rule_name = LINEAR_RULES[rule]
    module, x, keys, M, bias, to_rows, from_rows, op_name = linear_case(kind)
    reg = registry(*[(k, make()) for k in keys])
    y_plain = module(x).detach()
    seed = randn(*y_plain.shape, seed=7)
    y, (R_x,), engine = run_engine(module, reg, x, seed=seed)
    assert torch.equal(y, y_plain), "the rule changed the forward"
    assert engine.coverage[(op_name, rule_name)] == 1, engine.report()
    R_y = to_rows(y * seed)
    expected = from_rows(reference(to_rows(x), M, bias, R_y), x)
    assert_same(R_x, expected)
    if rule == "alpha2beta1":
        # the test sees the stabiliser: on the output with 1e-6 weights, the inhibiting
        # denominator is negative and tiny, and z + 1e-9 sign(z) would give another answer
        signed = from_rows(ref_alpha_beta(to_rows(x), M, R_y, 2.0, 1.0, divide=signed_divide), x)
        assert differs(R_x, signed, 1e-8), "the test cannot tell b + 1e-9 from b + 1e-9 sign(b)"


@pytest.mark.parametrize("reached", [3, 40], ids=["few-rows", "many-rows"])
@pytest.mark.parametrize("rule", list(LINEAR_RULES))
def test_a_head_reached_at_few_outputs(rule, reached, monkeypatch):
    """A language model's head: 256 outputs, relevance at ``reached`` of them. With few (at most
    an eighth) the rule computes on those rows of ``W`` only; either way the relevance is the
    reference formula's on the whole layer."""
    from attnx.lrp.linear import LinearCall

    make, reference, rule_name = LINEAR_RULES[rule]
    w, b, x = randn(256, 6, seed=11), randn(256, seed=12) * 0.5, randn(2, 3, 6, seed=13)
    module = nn.Linear(6, 256).to(DT)
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    seed = torch.zeros(2, 3, 256, dtype=DT)
    rows = torch.randperm(256, generator=gen(14))[:reached]
    seed[1, 2, rows] = randn(reached, seed=15)  # one token of one sample, as a next-token target
    restricted = []
    original = LinearCall.restricted
    monkeypatch.setattr(LinearCall, "restricted", lambda c, r: restricted.append(len(r)) or original(c, r))
    y, (R_x,), _ = run_engine(module, registry((nn.Linear, make())), x, seed=seed)
    R_y = (y * seed).reshape(-1, 256)
    assert_same(R_x, reference(x.reshape(-1, 6), w, b, R_y).reshape(x.shape))
    assert R_x[1, 2].abs().sum() > 0 and not R_x[0].any()
    assert restricted == ([] if rule == "epsilon" or reached * 8 > 256 else [reached])


def signed_divide(a, b):
    return torch.where(b != 0, a / (b + 1e-9 * sign1(b)), torch.zeros_like(a))


def test_alpha1_beta0_keeps_positive_contributions_and_conserves():
    """α=1, β=0: relevance is conserved over the outputs whose denominator is non-zero, and an
    input with only negative contributions to every output gets none."""
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT)
    w = torch.tensor([[1.0, 1.0, -1.0], [2.0, 0.0, 1.0]], dtype=DT)
    # contributions x_i w_ji: output 0: (1, -2, -0.5); output 1: (2, 0, 0.5)
    module = nn.Linear(3, 2, bias=False).to(DT)
    with torch.no_grad():
        module.weight.copy_(w)
    seed = torch.tensor([[3.0, -1.0]], dtype=DT)
    y, (R_x,), _ = run_engine(module, registry((nn.Linear, rules.AlphaBeta(1.0, 0.0))), x, seed=seed)
    R_y = y * seed  # y = (-1.5, 2.5) -> R_y = (-4.5, -2.5)
    # by hand: output 0 keeps only input 0 (z⁺ = 1); output 1 splits 2 : 0.5 (z⁺ = 2.5)
    by_hand = torch.tensor([[-4.5 / (1 + 1e-9) + (-2.5) * 2 / (2.5 + 1e-9), 0.0, -2.5 * 0.5 / (2.5 + 1e-9)]], dtype=DT)
    assert_same(R_x, by_hand, 1e-14)
    assert abs(R_x.sum().item() - R_y.sum().item()) < 1e-8


def test_alpha1_beta0_with_vanishing_denominators_and_zero_inputs():
    """An output with no positive contribution (z⁺ = 0) but relevance (its bias makes y > 0),
    inputs at exactly 0, and large weights on the zero input: the relevance equals the reference
    formula (nothing leaks from the huge R / (0 + ε) of the empty output) and is finite."""
    x = torch.tensor([[1.0, 0.0, -2.0], [0.5, -1.0, 0.0]], dtype=DT)
    w = torch.tensor([[-1.0, -1e6, 2.0], [1.0, -3.0, 0.5], [0.0, 0.0, 0.0]], dtype=DT)
    module = nn.Linear(3, 3).to(DT)
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(torch.tensor([5.0, 0.1, 2.0], dtype=DT))
    # sample 0, output 0: contributions (-1, 0, -4): z⁺ = 0 while y = 0 (+5 bias); output 2: all 0
    seed = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 1.0]], dtype=DT)
    y, (R_x,), _ = run_engine(module, registry((nn.Linear, rules.AlphaBeta(1.0, 0.0))), x, seed=seed)
    assert torch.isfinite(R_x).all()
    assert_same(R_x, ref_alpha_beta(x, w, y * seed, 1.0, 0.0), 1e-12)


def test_mask_helpers_match_their_definitions():
    """safe_divide, divide_or_zero and relative_share (float masks) against the written-out
    formulas, with zeros, negatives and broadcasting."""
    from attnx.lrp.relay import divide_or_zero, relative_share, safe_divide

    a = torch.tensor([[1.0, -2.0, 3.0, 0.0], [4.0, 5.0, -6.0, 7.0]], dtype=DT)
    b = torch.tensor([[0.0, 2.0, -1e-3, 0.0], [1e-12, -4.0, 3.0, 0.0]], dtype=DT)
    assert_same(safe_divide(a, b), chefer_safe_divide(a, b), 1e-15)
    expected = torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))
    assert torch.equal(divide_or_zero(a, b), expected)
    column = torch.tensor([[2.0], [0.0]], dtype=DT)
    assert torch.equal(divide_or_zero(a, column), torch.stack([a[0] / 2, torch.zeros(4, dtype=DT)]))
    g = randn(2, 4, seed=3)
    assert_same(relative_share(b, g, 1e-9, 0.5), chefer_safe_divide(b * g, b) * 0.5, 1e-15)


# --------------------------------------------------------------------------------------------
# z^B at the input
# --------------------------------------------------------------------------------------------
class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1).to(DT)
        self.conv2 = nn.Conv2d(4, 2, 2, stride=2).to(DT)
        with torch.no_grad():
            for i, m in enumerate((self.conv1, self.conv2)):
                m.weight.copy_(randn(*m.weight.shape, seed=20 + i))
                m.bias.copy_(randn(*m.bias.shape, seed=30 + i) * 0.3)

    def forward(self, x):
        return self.conv2(self.conv1(x))


def zbox_input() -> torch.Tensor:
    """Two samples with very different value ranges (per-sample bounds matter)."""
    u = torch.rand(2, 3, 4, 6, generator=gen(8), dtype=DT)
    return torch.stack([u[0] * 3.0 - 1.0, u[1] * 0.5 - 2.0])


def test_zbox_at_the_input_conv():
    model = TwoConvs()
    x = zbox_input()
    seed = randn(*model(x).shape, seed=9)
    reg = registry((nn.Conv2d, rules.ZBox(otherwise=rules.AlphaBeta(1.0, 0.0))))
    y, (R_x,), engine = run_engine(model, reg, x, seed=seed)
    assert engine.coverage[("Conv2d", "z-box")] == 2
    # conv2 does not see the input: it falls back to α=1 β=0
    h = model.conv1(x).detach()
    M2, _ = conv_matrix(model.conv2.weight.detach(), h.shape[1:], (2, 2), (0, 0), (1, 1))
    R_h = ref_alpha_beta(h.reshape(2, -1), M2, (y * seed).reshape(2, -1), 1.0, 0.0)
    # conv1 sees the pixels: z^B with each sample's own min and max
    M1, _ = conv_matrix(model.conv1.weight.detach(), x.shape[1:], (1, 1), (1, 1), (1, 1))
    lo = torch.tensor([x[b].min().item() for b in range(2)], dtype=DT)
    hi = torch.tensor([x[b].max().item() for b in range(2)], dtype=DT)
    expected = ref_zbox(x.reshape(2, -1), M1, R_h, lo, hi).reshape(x.shape)
    assert_same(R_x, expected)
    # bounds taken over the whole batch would give another answer
    whole = ref_zbox(x.reshape(2, -1), M1, R_h, lo.min().expand(2), hi.max().expand(2)).reshape(x.shape)
    assert differs(R_x, whole)


# --------------------------------------------------------------------------------------------
# identity rule
# --------------------------------------------------------------------------------------------
class Softmax(nn.Module):
    def forward(self, x):
        return x.softmax(-1)


class Tanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


def layer_norm() -> nn.LayerNorm:
    ln = nn.LayerNorm(6).to(DT)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * randn(6, seed=11))
        ln.bias.copy_(0.3 * randn(6, seed=12))
    return ln


IDENTITY_OPS = {
    "gelu": (nn.GELU, nn.GELU, "GELU"),
    "softmax": (Softmax, F.softmax, "softmax"),
    "layernorm": (layer_norm, nn.LayerNorm, "LayerNorm"),
    "tanh": (Tanh, torch.tanh, "tanh"),
}


@pytest.mark.parametrize("op", list(IDENTITY_OPS))
def test_identity_rule_passes_relevance_elementwise(op):
    make, key, name = IDENTITY_OPS[op]
    module = make().to(DT)
    x = randn(2, 3, 6, seed=13)
    y_plain = module(x).detach()
    seed = randn(*y_plain.shape, seed=14)
    y, (R_x,), engine = run_engine(module, registry((key, rules.Identity())), x, seed=seed)
    assert engine.coverage[(name, "identity")] == 1, engine.report()
    assert torch.equal(y, y_plain)
    assert_same(R_x, y_plain * seed, 1e-12)
    # plain gradient x input is something else (the rule really replaced the backward)
    plain = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(module(plain), plain, seed)
    assert differs(R_x, x * g)


# --------------------------------------------------------------------------------------------
# LayerNorm with the standard deviation held constant
# --------------------------------------------------------------------------------------------
class FunctionalLayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def ref_layernorm_constant_std(x, weight, bias, eps_ln, seed, epsilon):
    """Autograd of a LayerNorm whose σ is detached, times the input (seed ε-stabilised first)."""
    x = x.detach().clone().requires_grad_()
    mu = x.mean(-1, keepdim=True)
    sigma = ((x - mu) ** 2).mean(-1, keepdim=True).add(eps_ln).sqrt().detach()
    y = (x - mu) / sigma * weight.detach() + bias.detach()
    g = seed if epsilon == 0 else y.detach() * seed / (y.detach() + epsilon * sign1(y.detach()))
    (grad,) = torch.autograd.grad(y, x, g)
    return x.detach() * grad


@pytest.mark.parametrize("path", ["module", "functional"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_layernorm_constant_std(path, epsilon):
    ln = layer_norm()
    ln.eps = 1e-2  # large enough that a wrong σ (without eps, or unbiased) shows
    module = ln if path == "module" else FunctionalLayerNorm(ln)
    x = randn(2, 3, 6, seed=15) * 0.3
    seed = randn(2, 3, 6, seed=16)
    key, name = (nn.LayerNorm, "LayerNorm") if path == "module" else (F.layer_norm, "layer_norm")
    y, (R_x,), engine = run_engine(module, registry((key, rules.LayerNormConstantStd(epsilon))), x, seed=seed)
    assert engine.coverage[(name, "layernorm-const-std")] == 1
    assert torch.equal(y, ln(x).detach())
    assert_same(R_x, ref_layernorm_constant_std(x, ln.weight, ln.bias, ln.eps, seed, epsilon))
    if epsilon == 0:
        # σ constant and zero bias: y is linear in x, so relevance is conserved per token
        ln0 = layer_norm()
        ln0.eps = 1e-2
        with torch.no_grad():
            ln0.bias.zero_()
        y0, (R0,), _ = run_engine(ln0, registry((nn.LayerNorm, rules.LayerNormConstantStd(0.0))), x, seed=seed)
        assert_same(R0.sum(-1), (y0 * seed).sum(-1), 1e-12)


# --------------------------------------------------------------------------------------------
# products of two relevance-carrying tensors
# --------------------------------------------------------------------------------------------
class QK(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k):
        if self.spelling == "matmul":
            return torch.matmul(q, k.transpose(-2, -1))
        if self.spelling == "@":
            return q @ k.transpose(-2, -1)
        if self.spelling == "einsum":
            return torch.einsum("bhid,bhjd->bhij", q, k)
        B, H, N, D = q.shape  # bmm on (B*H, N, D)
        return torch.bmm(q.reshape(B * H, N, D), k.reshape(B * H, N, D).transpose(1, 2)).reshape(B, H, N, N)


class AV(nn.Module):
    def forward(self, a, v):
        return a @ v


def ref_bilinear_qk(q, k, R, share, chefer):
    """z_ij = Σ_d q_id k_jd; R_q[i,d] = share Σ_j q_id k_jd S_ij, R_k[j,d] = share Σ_i q_id k_jd S_ij,
    S = R / z (Chefer: safe_divide(R, z))."""
    c = q[..., :, None, :] * k[..., None, :, :]  # (B, H, i, j, d)
    z = c.sum(-1)
    S = chefer_safe_divide(R, z) if chefer else R / z
    w = c * S[..., None]
    return share * w.sum(-2), share * w.sum(-3)


def ref_bilinear_av(a, v, R, share, chefer):
    """z_id = Σ_j a_ij v_jd; R_a[i,j] = share Σ_d a_ij v_jd S_id, R_v[j,d] = share Σ_i a_ij v_jd S_id."""
    c = a[..., :, :, None] * v[..., None, :, :]  # (B, H, i, j, d)
    z = c.sum(-2)
    S = chefer_safe_divide(R, z) if chefer else R / z
    w = c * S[..., :, None, :]
    return share * w.sum(-1), share * w.sum(-3)


def qk_inputs():
    q, k = randn(2, 2, 4, 3, seed=17), randn(2, 2, 4, 3, seed=18)
    # make z[0, 0, 0, 0] = q_0·k_0 = 1e-7, where Chefer's + 1e-9 changes the answer by 1%
    qq = q[0, 0, 0]
    k[0, 0, 0] = k[0, 0, 0] - (qq @ k[0, 0, 0]) / (qq @ qq) * qq + 1e-7 * qq / (qq @ qq)
    return q, k


@pytest.mark.parametrize("spelling", ["matmul", "@", "einsum", "bmm"])
@pytest.mark.parametrize("chefer", [False, True], ids=["plain", "chefer"])
def test_bilinear_query_key(spelling, chefer):
    q, k = qk_inputs()
    module = QK(spelling)
    z = module(q, k)
    assert abs(z[0, 0, 0, 0].item() - 1e-7) < 1e-15
    seed = randn(*z.shape, seed=19)
    key = {"matmul": torch.matmul, "@": torch.matmul, "einsum": torch.einsum, "bmm": torch.bmm}[spelling]
    y, (R_q, R_k), engine = run_engine(module, registry((key, rules.Bilinear(0.5, chefer=chefer))), q, k, seed=seed)
    assert rule_calls(engine, "bilinear") == 1, engine.report()
    exp_q, exp_k = ref_bilinear_qk(q, k, y * seed, 0.5, chefer)
    assert_same(R_q, exp_q)
    assert_same(R_k, exp_k)
    other_q, _ = ref_bilinear_qk(q, k, y * seed, 0.5, not chefer)
    assert differs(R_q, other_q, 1e-6), "the test cannot tell chefer=True from chefer=False"
    if not chefer:  # each operand gets exactly half of the relevance
        assert_same(R_q.sum((-2, -1)), 0.5 * (y * seed).sum((-2, -1)))
        assert_same(R_k.sum((-2, -1)), 0.5 * (y * seed).sum((-2, -1)))


@pytest.mark.parametrize("chefer", [False, True], ids=["plain", "chefer"])
def test_bilinear_attention_times_values(chefer):
    a = torch.softmax(randn(2, 2, 4, 4, seed=21) * 2, -1)
    v = randn(2, 2, 4, 3, seed=22)
    seed = randn(2, 2, 4, 3, seed=23)
    y, (R_a, R_v), engine = run_engine(AV(), registry((torch.matmul, rules.Bilinear(0.5, chefer=chefer))), a, v, seed=seed)
    assert rule_calls(engine, "bilinear") == 1, engine.report()
    exp_a, exp_v = ref_bilinear_av(a, v, y * seed, 0.5, chefer)
    assert_same(R_a, exp_a)
    assert_same(R_v, exp_v)


def test_bilinear_with_one_carrying_operand_is_gradient_times_input():
    """``x @ W`` with a constant W is linear in x: no halving."""

    class XW(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", randn(4, 3, seed=24))

        def forward(self, x):
            return torch.matmul(x, self.w)

    x, seed = randn(2, 5, 4, seed=25), randn(2, 5, 3, seed=26)
    module = XW()
    _, (R_x,), _ = run_engine(module, registry((torch.matmul, rules.Bilinear(0.5))), x, seed=seed)
    expected = torch.zeros_like(x)
    for b in range(2):
        for t in range(5):
            for i in range(4):
                expected[b, t, i] = sum(x[b, t, i] * module.w[i, j] * seed[b, t, j] for j in range(3))
    assert_same(R_x, expected)


def test_bilinear_elementwise_gate():
    """``a * b`` of two carrying tensors (AttnLRP's gates): each gets half, elementwise."""

    class Gate(nn.Module):
        def forward(self, a, b):
            return a * b

    a, b, seed = randn(2, 7, seed=27), randn(2, 7, seed=28), randn(2, 7, seed=29)
    y, (R_a, R_b), engine = run_engine(Gate(), registry((torch.mul, rules.Bilinear(0.5))), a, b, seed=seed)
    assert rule_calls(engine, "bilinear") == 1, engine.report()
    assert_same(R_a, 0.5 * y * seed, 1e-12)
    assert_same(R_b, 0.5 * y * seed, 1e-12)


# --------------------------------------------------------------------------------------------
# Chefer's residual addition
# --------------------------------------------------------------------------------------------
def ref_normalized_add(u, v, R):
    """Chefer's ``Add.relprop`` per sample: split R in proportion (u ⊙ R/z, v ⊙ R/z), then
    rescale each branch to |Σa| / (|Σa| + |Σb|) · ΣR. ``v`` may be (1, ...) broadcast."""
    Ru, Rv = [], []
    for b in range(u.shape[0]):
        vb = v[b] if v.shape[0] == u.shape[0] else v[0]
        z = u[b] + vb
        S = chefer_safe_divide(R[b], z)
        a, c = u[b] * S, vb * S
        a_fact = chefer_safe_divide(a.sum().abs(), a.sum().abs() + c.sum().abs()) * R[b].sum()
        c_fact = chefer_safe_divide(c.sum().abs(), a.sum().abs() + c.sum().abs()) * R[b].sum()
        Ru.append(a * chefer_safe_divide(a_fact, a.sum()))
        Rv.append(c * chefer_safe_divide(c_fact, c.sum()))
    return torch.stack(Ru), torch.stack(Rv)


class AddParameter(nn.Module):
    """``x + pos``: the position embedding of a ViT (a parameter broadcast over the batch)."""

    def __init__(self, spelling: str):
        super().__init__()
        # against sample 0 (opposite-signed shares: the rescaling matters there)
        self.pos = nn.Parameter(-0.5 * two_samples(32)[:1] + 0.2 * randn(1, 4, 3, seed=31))
        self.spelling = spelling

    def forward(self, x):
        if self.spelling == "+":
            return x + self.pos
        if self.spelling == "torch.add":
            return torch.add(x, self.pos)
        return x.add(self.pos)


def two_samples(seed: int) -> torch.Tensor:
    """(2, 4, 3) with the samples on very different scales (per-sample sums matter)."""
    x = randn(2, 4, 3, seed=seed)
    x[1] = x[1] * 7.0 + 2.0
    return x


@pytest.mark.parametrize("spelling", ["+", "torch.add", "Tensor.add"])
def test_normalized_add_with_a_parameter(spelling):
    module = AddParameter(spelling)
    x, seed = two_samples(32), randn(2, 4, 3, seed=33)
    y, (R_x,), engine = run_engine(module, registry((torch.add, rules.NormalizedAdd())), x, seed=seed)
    assert rule_calls(engine, "normalized-add") == 1, engine.report()
    R = y * seed
    exp_x, _ = ref_normalized_add(x, module.pos.detach(), R)
    assert_same(R_x, exp_x)
    # each sample's total is its own share |Σa| / (|Σa| + |Σb|) · ΣR
    signs = []
    for b in range(2):
        S = chefer_safe_divide(R[b], y[b])
        a_sum, b_sum = (x[b] * S).sum(), (module.pos[0].detach() * S).sum()
        signs.append(bool(a_sum * b_sum < 0))
        share = a_sum.abs() / (a_sum.abs() + b_sum.abs() + 1e-9) * R[b].sum()
        assert abs(R_x[b].sum().item() - share.item()) <= 1e-9 * max(1.0, abs(share.item()))
    assert signs[0], "test premise: opposite-signed shares in sample 0, where the rescaling acts"
    # sums over the whole batch (the reference code's B = 1 shortcut) would give another answer
    whole, _ = ref_normalized_add(x.reshape(1, 8, 3), module.pos.detach().repeat(1, 2, 1), R.reshape(1, 8, 3))
    assert differs(R_x, whole.reshape(x.shape))


def test_normalized_add_of_two_carrying_tensors():
    class Residual(nn.Module):
        def forward(self, u, v):
            return u + v

    u, seed = two_samples(34), randn(2, 4, 3, seed=36)
    v = 0.2 * randn(2, 4, 3, seed=35)
    v[0] -= 0.6 * u[0]  # opposite-signed shares in sample 0
    y, (R_u, R_v), _ = run_engine(Residual(), registry((torch.add, rules.NormalizedAdd())), u, v, seed=seed)
    exp_u, exp_v = ref_normalized_add(u, v, y * seed)
    assert differs(R_u, u * seed), "test premise: the rescaling changes the proportional split"
    assert_same(R_u, exp_u)
    assert_same(R_v, exp_v)
    # conserved per sample
    assert_same(R_u.sum((1, 2)) + R_v.sum((1, 2)), (y * seed).sum((1, 2)), 1e-9)


def test_normalized_add_of_a_constant_is_gradient_times_input():
    """A constant (a mask, a buffer) added to a carrying tensor takes no relevance share."""

    class AddMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", randn(1, 4, 3, seed=37))

        def forward(self, x):
            return x + self.mask

    x, seed = randn(2, 4, 3, seed=38), randn(2, 4, 3, seed=39)
    _, (R_x,), _ = run_engine(AddMask(), registry((torch.add, rules.NormalizedAdd())), x, seed=seed)
    assert_same(R_x, x * seed, 1e-14)


# --------------------------------------------------------------------------------------------
# constant
# --------------------------------------------------------------------------------------------
class AttentionHead(nn.Module):
    """``softmax(x xᵀ) x``: a single attention head without projections."""

    def forward(self, x):
        return F.softmax(x @ x.transpose(-2, -1), dim=-1) @ x


def test_constant_attention_probabilities():
    """CP-LRP: with the probabilities A held constant, R_x[j,d] = Σ_i x_jd A_ij g̃_id only
    through the value path (the query/key path gets nothing)."""
    x, seed = randn(2, 4, 3, seed=40), randn(2, 4, 3, seed=41)
    reg = registry((F.softmax, rules.Constant()), (torch.matmul, rules.Bilinear(0.5)))
    y, (R_x,), engine = run_engine(AttentionHead(), reg, x, seed=seed)
    assert engine.coverage[("softmax", "constant")] == 1
    expected = torch.zeros_like(x)
    for b in range(2):
        scores = torch.tensor([[sum(x[b, i, d] * x[b, j, d] for d in range(3)) for j in range(4)] for i in range(4)], dtype=DT)
        A = scores.exp() / scores.exp().sum(-1, keepdim=True)
        assert_same(y[b], A @ x[b], 1e-12)
        for j in range(4):
            for d in range(3):
                expected[b, j, d] = sum(x[b, j, d] * A[i, j] * seed[b, i, d] for i in range(4))
    assert_same(R_x, expected)
    assert_same(R_x.sum(), (y * seed).sum(), 1e-10)  # conserved


class RecordedAttentionHead(nn.Module):
    """:class:`AttentionHead` keeping its probabilities, to differentiate at them."""

    def forward(self, x):
        self.probs = F.softmax(x @ x.transpose(-2, -1), dim=-1)
        return self.probs @ x


def test_pruned_attention_probabilities_keep_their_gradient():
    """LibraGrad: with the softmax pruned, ``∂/∂x`` flows only through the value path
    (``Σ_i A_ij g_id``, as with the probabilities held constant) and the gradient *at* A is the
    plain one, ``g Vᵀ`` (``Σ_d g_id x_jd``)."""
    x, seed = randn(2, 4, 3, seed=42), randn(2, 4, 3, seed=43)
    head = RecordedAttentionHead()
    reg = registry((F.softmax, rules.Pruned()), (torch.matmul, rules.Bilinear(0.5)))
    engine = LRPEngine(head, reg, strict=True)
    with engine:
        xt = engine.track(x.clone())
        y = head(xt)
    engine.check_coverage()
    assert engine.coverage[("softmax", "pruned")] == 1
    g_x, g_A = torch.autograd.grad(y, [xt, head.probs], seed)
    for b in range(2):
        scores = torch.tensor([[sum(x[b, i, d] * x[b, j, d] for d in range(3)) for j in range(4)] for i in range(4)], dtype=DT)
        A = scores.exp() / scores.exp().sum(-1, keepdim=True)
        assert_same(y[b].detach(), A @ x[b], 1e-12)
        for j in range(4):
            for d in range(3):
                assert_same(g_x[b, j, d], sum(A[i, j] * seed[b, i, d] for i in range(4)), 1e-12)
        for i in range(4):
            for j in range(4):
                assert_same(g_A[b, i, j], sum(seed[b, i, d] * x[b, j, d] for d in range(3)), 1e-12)


def test_derived_weights_are_made_once_and_dropped_after_the_last_use():
    """A weight used by two layers: ``|W|`` is made once for both backwards and let go after the
    second; the cache holds nothing once every use is done."""
    from attnx.lrp.relay import Propagation

    state, w, made = Propagation(), randn(3, 4, seed=2), []

    def make(t):
        made.append(1)
        return t.abs()

    state.will_use(w)
    state.will_use(w)
    first = state.derived(w, "abs", make)
    state.used(w)
    assert state.derived(w, "abs", make) is first and len(made) == 1
    state.used(w)
    assert state.weights == {} and state.uses == {}


def test_shared_weight_relevance_matches_the_formula():
    """One nn.Linear applied twice (the derived weights serve both backwards, then go)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False).to(DT)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    module = Twice()
    with torch.no_grad():
        module.lin.weight.copy_(randn(4, 4, seed=5))
    x, seed = randn(2, 4, seed=6), randn(2, 4, seed=7)
    reg = registry((nn.Linear, rules.AlphaBeta(1.0, 0.0)), (torch.relu, rules.Identity()))
    y, (R_x,), engine = run_engine(module, reg, x, seed=seed)
    W = module.lin.weight.detach()
    h = torch.relu(x @ W.T)
    R_h = ref_alpha_beta(h, W, y * seed, 1.0, 0.0)
    expected = ref_alpha_beta(x, W, R_h, 1.0, 0.0)  # relu's identity rule: R at its input = R at h
    assert_same(R_x, expected, 1e-12)
    assert engine.propagation.weights == {}


# ============================================================================================
# the ops modern decoders bring
# ============================================================================================
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
