"""Relevance propagation rules.

Convention (DESIGN §5): the relevance at a tensor ``t`` is ``t ⊙ g̃(t)``, where ``g̃`` is a
*modified gradient*. Plain autograd is then already the right rule for every op that is linear in
its relevance-carrying inputs (reshapes, indexing, concatenation, sums, products with constants,
the z-rule on additions), and an LRP pass is one backward. A rule replaces the backward of one op:
it receives ``g̃`` of the op's output and returns ``g̃`` of each relevance-carrying input.

Every rule is a callable ``rule(op) -> output`` where ``op`` is an :class:`Op` describing one call
(its function or module, arguments, which arguments carry relevance); it returns the op's
output, connected to the relevance-carrying inputs through :func:`relay`, whose backward is the
rule.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import AttnxValueError
from .decompositions import mha_decomposition, sdpa_decomposition
from .kinds import rms_epsilon, rms_norm_spread
from .linear import GROUPED_MM, AlphaBeta, Epsilon, Gamma, LinearRule, ZBox, grouped_linear, linear_parts
from .relay import (
    Kept,
    Op,
    Propagation,
    Rule,
    active,
    divide_or_zero,
    divide_or_zero_,
    epsilon_share,
    hold_constant,
    output_like,
    plain_edges,
    propagation,
    relative_share,
    relay,
    safe_divide,
    scale_of,
    scratch_like,
    stabilize,
)

__all__ = [
    "Op",
    "Rule",
    "Propagation",
    "propagation",
    "relay",
    "divide_or_zero",
    "GROUPED_MM",
    "LinearRule",
    "grouped_linear",
    "linear_parts",
    "safe_divide",
    "stabilize",
    "Passthrough",
    "Identity",
    "Constant",
    "Pruned",
    "Epsilon",
    "AlphaBeta",
    "Gamma",
    "ZBox",
    "Bilinear",
    "NormalizedAdd",
    "LayerNormConstantStd",
    "RMSNormConstantRMS",
    "Decompose",
    "Stabilized",
    "sdpa_decomposition",
    "mha_decomposition",
]


class Passthrough(Rule):
    """Plain autograd: gradient × input, i.e. LRP-0 on linear ops (the default for unmapped
    linear ops; registering it marks an op as handled)."""

    name = "gradient"

    def __call__(self, op: Op) -> Any:
        return op.func(*op.args, **op.kwargs) if op.output is None else op.output


class Identity(Rule):
    """Identity rule ``R_x = R_y`` for elementwise / normalising ops (GELU, LayerNorm, softmax ...).

    The op's output is computed as usual; all relevance at the output passes to its first
    relevance-carrying input, element by element (input and output have the same shape).
    """

    name = "identity"

    def __call__(self, op: Op) -> Any:
        y = op.compute()
        x = op.inputs[0]
        if x.shape != y.shape:
            raise AttnxValueError(f"identity rule needs matching input/output shapes, got {tuple(x.shape)} -> {tuple(y.shape)}")
        kept = Kept(x.detach(), y.detach())
        n = len(op.inputs)
        state = active()

        def backward(g):
            xd, yd = kept.get()
            return (divide_or_zero_(torch.mul(yd, g, out=output_like(state, yd)), xd, state),) + (None,) * (n - 1)

        return relay(y, op.inputs, backward)


class Constant(Rule):
    """Treat the op's output as a constant: no relevance flows back through it (CP-LRP's rule for
    attention probabilities)."""

    name = "constant"

    def __call__(self, op: Op) -> Any:
        out = op.compute()
        if plain_edges():  # the plain backward still flows through the op, relevance does not
            return _map_tensors(out, lambda t: _constant_edge(t) if t.requires_grad and t.is_floating_point() else t)
        return detach_all(out)


class Pruned(Constant):
    """Prune the backward paths into the op: its output stays in the graph, so the gradient *at* it
    is computed (and recorded where a pass reads it, e.g. ``∂y/∂A``), but nothing flows on to its
    inputs, and the tensors it multiplies are linear in the other operand (LibraGrad's pruned
    ``Q``, ``K`` paths: the attention probabilities are a constant of the backward)."""

    name = "pruned"

    def __call__(self, op: Op) -> Any:
        if plain_edges():  # the plain backward still flows through the op, as for Constant
            return super().__call__(op)
        out = op.compute()
        if not any(isinstance(x, torch.Tensor) and x.requires_grad for x in op.inputs):
            return out
        def edge(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return t
            anchor = torch.zeros((), device=t.device, requires_grad=True)  # a graph for the output alone, no path back
            pruned = relay(t.detach(), [anchor], lambda g: (None,))
            hold_constant(pruned)
            return pruned

        return _map_tensors(out, edge)


def _constant_edge(t: torch.Tensor) -> torch.Tensor:
    out = relay(t, [], lambda g: ())
    hold_constant(out)
    return out


def _map_tensors(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        return type(out)(*(_map_tensors(o, fn) for o in out))
    if isinstance(out, (list, tuple)):
        return type(out)(_map_tensors(o, fn) for o in out)
    if isinstance(out, dict):
        return type(out)({k: _map_tensors(v, fn) for k, v in out.items()})
    return out


def detach_all(out: Any) -> Any:
    """``out`` with every tensor in it detached (modules such as MoE routers return tuples)."""
    return _map_tensors(out, torch.Tensor.detach)


def _operands(op: Op) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(f, a, b)`` with ``f(a, b)`` the bilinear op (matmul, bmm, einsum, mul)."""
    if op.func is torch.einsum:
        eq = op.args[0]
        operands = op.args[1] if len(op.args) == 2 and isinstance(op.args[1], (list, tuple)) else op.args[1:]
        if len(operands) != 2:
            raise AttnxValueError("the bilinear rule handles einsum with two operands only")
        return (lambda a, b: torch.einsum(eq, a, b)), operands[0], operands[1]
    if len(op.args) != 2:
        raise AttnxValueError(f"the bilinear rule expects two operands, got {len(op.args)} arguments")
    func = op.func
    return (lambda a, b: func(a, b)), op.args[0], op.args[1]


class Bilinear(Rule):
    """Products of two relevance-carrying tensors (``Q Kᵀ``, ``A V``, gates).

    Each operand gets gradient × input relevance, scaled by ``share`` (½: the uniform rule of
    AttnLRP and the halving of Chefer et al.). With ``chefer=True`` the incoming relevance is first
    divided by the output with Chefer's ``safe_divide``, as the reference code does. With
    ``products_only=True`` the rule takes only calls where both operands carry relevance (a gate
    ``act(gate(x)) * up(x)``); a product with a constant is then left to the engine as linear.
    """

    name = "bilinear"

    def __init__(self, share: float = 0.5, chefer: bool = False, eps: float = 1e-9, products_only: bool = False) -> None:
        self.share, self.chefer, self.eps, self.products_only = share, chefer, eps, products_only

    def applies(self, op: Op) -> bool:
        if not self.products_only:
            return True
        try:
            f, a, b = _operands(op)
        except ValueError:  # not a product of two operands: not a gate
            return False
        carrying = [op.args[i] for i in op.carrying]
        return all(isinstance(t, torch.Tensor) and any(c is t or _in(c, t) for c in carrying) for t in (a, b))

    def __call__(self, op: Op) -> Any:
        f, a, b = _operands(op)
        carrying = [op.args[i] for i in op.carrying]
        track = [isinstance(t, torch.Tensor) and any(c is t or _in(c, t) for c in carrying) for t in (a, b)]
        if not all(track):  # linear in the one relevance-carrying operand: plain gradient x input
            return Passthrough()(op)
        # the product's own backward gives both operands their gradient x input share: the
        # rule only rescales the gradient it receives (no recomputation of the product)
        z = op.compute(graph=True)
        share, chefer = self.share, self.chefer
        kept = Kept(z.detach()) if chefer else None  # only Chefer's division reads the output
        # the stabiliser is stated for the product of the unscaled operands: timm scales q before
        # Q Kᵀ, Chefer et al.'s reference after it
        eps = self.eps * scale_of(a) * scale_of(b)
        state = active()

        def backward(g):
            return (relative_share(kept.get()[0], g, eps, share, state) if chefer else g * share,)

        return relay(z, [], backward, through_output=True)


def _in(container: Any, t: torch.Tensor) -> bool:
    return isinstance(container, (list, tuple)) and any(c is t for c in container)


class NormalizedAdd(Rule):
    """Chefer et al.'s residual ``Add``: split ``R`` in proportion to each input's contribution
    (``u ⊙ R/z``, ``v ⊙ R/z``), then rescale each branch so that its total is
    ``|Σu'| / (|Σu'| + |Σv'|) · ΣR`` (sums per sample). The second operand may be a parameter
    (the position embedding); its share of relevance is absorbed.
    """

    name = "normalized-add"

    def __init__(self, eps: float = 1e-9, constants: bool = False) -> None:
        self.eps = eps
        #: also normalise additions of constant tensors (attention masks), as the BERT reference does
        self.constants = constants

    def __call__(self, op: Op) -> Any:
        if op.func in (torch.add, torch.Tensor.add) and (len(op.args) > 2 or "alpha" in op.kwargs):
            raise AttnxValueError("normalized-add does not support add(..., alpha=...)")
        u, v = op.args[0], op.args[1]
        both = all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (u, v))
        absorbing = both and (self.constants or all(i in op.carrying or op.args[i].requires_grad for i in (0, 1)))
        if not absorbing:  # a constant (mask, scalar) is added: plain gradient x input
            return Passthrough()(op)
        z = op.compute()
        kept = Kept(u.detach(), v.detach(), z.detach())
        dims = tuple(range(1, z.dim()))
        inputs = [op.args[i] for i in op.carrying]
        shapes = {i: op.args[i].shape for i in op.carrying}
        eps = self.eps
        state = active()

        def backward(g):
            ud, vd, zd = kept.get()
            R = torch.mul(zd, g, out=scratch_like(state, 0, zd))
            # safe_divide(R, zd): R is 0 where zd is
            S = torch.div(R, torch.add(zd, eps, out=scratch_like(state, 1, zd)),
                          out=scratch_like(state, 2, zd))
            r_sum = R.sum(dims, keepdim=True)
            part = scratch_like(state, 0, zd)  # R is summed: its buffer holds u ⊙ S, then v ⊙ S
            a_sum = torch.mul(ud, S, out=part).sum(dims, keepdim=True)
            b_sum = torch.mul(vd, S, out=part).sum(dims, keepdim=True)
            total = a_sum.abs() + b_sum.abs()
            a_fact = safe_divide(a_sum.abs(), total, eps) * r_sum
            b_fact = safe_divide(b_sum.abs(), total, eps) * r_sum
            # g̃(u) = (u ⊙ S ⊙ a_fact / Σa) / u
            gu = torch.mul(S, safe_divide(a_fact, a_sum, eps), out=output_like(state, S))
            gv = torch.mul(S, safe_divide(b_fact, b_sum, eps), out=output_like(state, S))
            out = {0: gu, 1: gv}
            return tuple(_reduce_to(out[i], shapes[i]) for i in shapes)

        return relay(z, inputs, backward)


def _reduce_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    if g.shape == shape:
        return g
    while g.dim() > len(shape):
        g = g.sum(0)
    for d, (gs, ts) in enumerate(zip(g.shape, shape)):
        if ts == 1 and gs != 1:
            g = g.sum(d, keepdim=True)
    return g


class LayerNormConstantStd(Rule):
    """LayerNorm with the standard deviation held constant (CP-LRP's LN rule, AttnLRP's identity on
    the normalisation): ``y = γ (x − μ)/σ + β`` is then linear in ``x`` and gradient × input
    applies (optionally ε-stabilised, the bias β absorbing its share)."""

    name = "layernorm-const-std"

    def __init__(self, epsilon: float = 0.0) -> None:
        self.epsilon = epsilon

    def __call__(self, op: Op) -> Any:
        if op.module is not None:
            m = op.module
            x, shape, weight, eps = op.args[0], m.normalized_shape, m.weight, m.eps
        else:
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            bound = {**dict(zip(names, op.args)), **op.kwargs}
            x, shape = bound["input"], bound["normalized_shape"]
            weight, eps = bound.get("weight"), bound.get("eps", 1e-5)  # the bias only shifts y
        dims = tuple(range(-len(shape), 0))
        y = op.compute()
        xd = x.detach()
        std = torch.sqrt(xd.var(dims, unbiased=False, keepdim=True) + eps)  # one number per row
        wd = None if weight is None else weight.detach().to(xd.dtype)  # one row: a half weight cast now
        epsilon = self.epsilon
        kept = Kept(y.detach()) if epsilon else None

        def backward(g):
            if epsilon:
                g = epsilon_share(kept.get()[0], epsilon).mul_(g)
            gx = g if wd is None else g * wd
            gx = gx - gx.mean(dims, keepdim=True)
            return (gx / std,)

        return relay(y, [x], backward)


class RMSNormConstantRMS(Rule):
    """RMSNorm with the root mean square held constant (AttnLRP's identity on the normalisation,
    as lxt's ``rms_norm_forward`` stops the gradient of ``rsqrt(mean(x²) + ε)``).

    ``y = x ⊙ w / rms(x)`` is then linear and elementwise in ``x``, so gradient × input gives
    ``R_x = R_y`` element by element, whatever the weight's form (``w``, Gemma's ``1 + w``);
    with ``epsilon`` the incoming relevance is first ε-stabilised as for LayerNorm
    (``R_y ⊙ y / (y + ε sign y)``). On a module the rule first checks that its output is an RMS
    normalisation (``y / (x / rms(x))`` the same per-feature weight in every row), and raises
    otherwise rather than explain a LayerNorm-like module with the wrong rule.
    """

    name = "rmsnorm-const-rms"

    def __init__(self, epsilon: float = 0.0) -> None:
        self.epsilon = epsilon

    def __call__(self, op: Op) -> Any:
        if op.module is not None:
            x, eps = op.args[0], rms_epsilon(op.module)
        else:
            bound = {**dict(zip(("input", "normalized_shape", "weight", "eps"), op.args)), **op.kwargs}
            if len(bound["normalized_shape"]) != 1:
                raise AttnxValueError("the RMSNorm rule supports normalisation over the last dimension only")
            x, eps = bound["input"], bound.get("eps")
        y = op.compute()
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            raise AttnxValueError(f"the RMSNorm rule needs one output shaped as the input, got {type(y).__name__}")
        if op.module is not None:
            spread = rms_norm_spread(x.detach(), y.detach(), eps)
            if spread > max(1e-5, 16 * torch.finfo(y.dtype).eps):
                cls = type(op.module).__name__
                raise AttnxValueError(
                    f"{cls} at {op.name or 'the model'} was taken for an RMS normalisation, but its output is "
                    f"not x / rms(x) times one per-feature weight (relative spread {spread:.2e}); register "
                    f"a rule for it: attnx.lrp.Registry.register({cls}, rule)"
                )
        kept = Kept(x.detach(), y.detach())
        epsilon = self.epsilon
        state = active()

        def backward(g):
            xd, yd = kept.get()
            if epsilon:
                g = epsilon_share(yd, epsilon).mul_(g)
            return (divide_or_zero_(torch.mul(yd, g, out=output_like(state, yd)), xd, state),)

        return relay(y, [x], backward)


class Stabilized(Rule):
    """Plain gradient × input through a linear op, with the incoming relevance first divided by the
    output with ``safe_divide`` (``R_x = x ⊙ Jᵀ (R / (z + ε))``): Chefer et al.'s ``RelPropSimple``
    on structural ops such as ``IndexSelect`` (the class-token pooling)."""

    name = "stabilized"

    def __init__(self, eps: float = 1e-9) -> None:
        self.eps = eps

    def __call__(self, op: Op) -> Any:
        out = op.func(*op.args, **op.kwargs)
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return out
        kept, eps, state = Kept(out.detach()), self.eps, active()
        return relay(out, [out], lambda g: (relative_share(kept.get()[0], g, eps, scratch=state),))


class Decompose(Rule):
    """Run an op as a composition of simpler ops through the engine, so that their own rules apply
    (e.g. ``F.scaled_dot_product_attention`` -> matmul, softmax, matmul)."""

    name = "decompose"

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, op: Op) -> Any:
        return self.fn(op.call, *op.args, **op.kwargs)
