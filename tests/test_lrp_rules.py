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
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnx.lrp import LRPEngine, Registry, rules

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
