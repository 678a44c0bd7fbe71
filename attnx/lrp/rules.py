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

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from ..errors import AttnxTypeError, AttnxValueError

from .decompositions import mha_decomposition, sdpa_decomposition
from .kinds import is_hf_conv1d, rms_epsilon, rms_norm_spread

__all__ = [
    "Op",
    "Rule",
    "relay",
    "safe_divide",
    "stabilize",
    "Passthrough",
    "Identity",
    "Constant",
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


def safe_divide(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """``a / (b + eps)``, and 0 where ``b == 0``: the stabiliser of Chefer et al.'s reference code
    (it adds ``eps`` whatever the sign of ``b``)."""
    return a / (b + eps) * (b != 0).to(b.dtype)


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)`` (sign(0) taken as +1): the ε-rule denominator."""
    return torch.where(z >= 0, z + eps, z - eps)


def epsilon_share(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z / (z + eps * sign(z))`` = ``|z| / (|z| + eps)``: the fraction of an output's relevance
    the ε-rule passes on (0 where ``z = 0``), in three elementwise passes."""
    a = z.abs()
    return a.div_(a + eps) if eps else (a != 0).to(z.dtype)


def divide_or_zero(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b != 0``, else 0 (turns a relevance back into a modified gradient)."""
    nz = b != 0
    return (a / torch.where(nz, b, 1.0)).mul_(nz)


class _Relay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backward_fn, output, *inputs):  # type: ignore[override]
        ctx.backward_fn = backward_fn
        ctx.num_inputs = len(inputs)
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grads = ctx.backward_fn(grad_output)
        if len(grads) != ctx.num_inputs:
            raise RuntimeError(f"rule returned {len(grads)} gradients for {ctx.num_inputs} inputs")
        return (None, None, *grads)


def relay(output: torch.Tensor, inputs: Sequence[torch.Tensor], backward: Callable[[torch.Tensor], Sequence]) -> torch.Tensor:
    """A tensor equal to ``output`` whose backward to ``inputs`` is ``backward(g̃_out) -> g̃_inputs``."""
    return _Relay.apply(backward, output.detach(), *inputs)


@dataclass
class Op:
    """One intercepted call.

    Attributes
    ----------
    func:
        The torch function called, or the module whose forward ran (``module`` is set then).
    args, kwargs:
        The call's arguments (for a module: its forward's arguments).
    carrying:
        Positions in ``args`` of the tensors that carry relevance.
    module:
        The module, for module rules; ``None`` for function rules.
    stack:
        The enclosing modules as ``(qualified name, module)`` pairs, outermost first.
    output:
        For module rules, the output the module computed.
    call:
        ``call(func, *args, **kwargs)``: run another op through the engine (for decompositions).
    is_input:
        ``is_input(t)``: whether ``t`` is the explained input (pixels or token embeddings).
    name:
        The qualified name of the module (module rules) or of the innermost enclosing module.
    """

    func: Any
    args: tuple
    kwargs: dict
    carrying: list[int]
    module: nn.Module | None = None
    stack: list = field(default_factory=list)
    output: Any = None
    call: Callable[..., Any] | None = None
    is_input: Callable[[torch.Tensor], bool] | None = None
    name: str = ""

    def compute(self) -> Any:
        """The op's plain output (without a graph)."""
        if self.output is not None:
            return self.output
        with torch.no_grad():
            return self.func(*self.args, **self.kwargs)

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [self.args[i] for i in self.carrying]


class Rule:
    """Base class: a rule turns one :class:`Op` into an output whose backward is the rule."""

    #: short name shown in the coverage table
    name = "rule"

    def applies(self, op: Op) -> bool:
        """Whether the rule takes this call of a function it is registered for; when it does not,
        the engine treats the call as if no rule matched (linear ops are then plain gradient)."""
        return True

    def __call__(self, op: Op) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


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
        xd, yd = x.detach(), y.detach()
        n = len(op.inputs)

        def backward(g):
            return (divide_or_zero(yd * g, xd),) + (None,) * (n - 1)

        return relay(y, op.inputs, backward)


class Constant(Rule):
    """Treat the op's output as a constant: no relevance flows back through it (CP-LRP's rule for
    attention probabilities)."""

    name = "constant"

    def __call__(self, op: Op) -> Any:
        return detach_all(op.compute())


def detach_all(out: Any) -> Any:
    """``out`` with every tensor in it detached (modules such as MoE routers return tuples)."""
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        return type(out)(*(detach_all(o) for o in out))
    if isinstance(out, (list, tuple)):
        return type(out)(detach_all(o) for o in out)
    if isinstance(out, dict):
        return type(out)({k: detach_all(v) for k, v in out.items()})
    return out


def _linear_parts(op: Op) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Callable, dict]:
    """``x, weight, bias, functional, extra kwargs`` of a linear / convolution op."""
    if op.module is not None:
        m = op.module
        x = op.args[0]
        if isinstance(m, nn.Linear):
            return x, m.weight, m.bias, F.linear, {}
        if is_hf_conv1d(m):  # GPT-2's Conv1D: x @ W + b with W of shape (in, out)
            return x, m.weight.t(), m.bias, F.linear, {}
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise AttnxValueError("LRP rules support zero-padded convolutions only")
            return x, m.weight, m.bias, F.conv2d, dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        raise AttnxTypeError(f"{type(m).__name__} is not a linear or convolution module")
    if op.func is F.linear:
        names = ("input", "weight", "bias")
        bound = dict(zip(names, op.args))
        bound.update(op.kwargs)
        return bound["input"], bound["weight"], bound.get("bias"), F.linear, {}
    if op.func is F.conv2d:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, op.args))
        bound.update(op.kwargs)
        extra = {k: bound[k] for k in names[3:] if k in bound}
        return bound["input"], bound["weight"], bound.get("bias"), F.conv2d, extra
    if op.func in GROUPED_MM:
        bound = {**dict(zip(("mat_a", "mat_b"), op.args)), **op.kwargs}
        if bound.get("out_dtype") is not None:
            raise AttnxValueError("LRP rules support grouped_mm without out_dtype only")
        return bound["mat_a"], bound["mat_b"], bound.get("bias"), grouped_linear, {"offs": bound.get("offs")}
    raise AttnxTypeError(f"{op.func} is not F.linear, F.conv2d or grouped_mm")


#: the grouped matrix product of mixture-of-experts layers (one weight matrix per group of rows)
GROUPED_MM = tuple(f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, offs: torch.Tensor | None = None) -> torch.Tensor:
    """``grouped_mm(x, w, offs)`` (+ ``b``): rows ``offs[e-1]:offs[e]`` of ``x`` times ``w[e]`` (in, out)."""
    return GROUPED_MM[0](x, w, offs=offs, bias=b)


def _vjp(fn: Callable, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, extra: dict) -> torch.Tensor:
    """``(∂ fn(x, w) / ∂x)ᵀ grad`` for the linear map ``x -> fn(x, w)`` (no bias)."""
    if fn is F.linear:
        return grad.matmul(w)
    if fn is F.conv2d and not isinstance(extra.get("padding"), str):  # "valid" / "same": the generic path
        return torch.nn.grad.conv2d_input(x.shape, w, grad, **extra)
    with torch.enable_grad():  # any other linear map: its own backward
        xx = x.detach().requires_grad_(True)
        (gx,) = torch.autograd.grad(fn(xx, w.detach(), None, **extra), xx, grad)
    return gx


def _live_rows(g: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows (all dimensions but the last) of ``g`` that are not all zero, when at
    most half are: a language model's relevance starts at one position per sample, so the
    output layer and the last block's position-wise layers see mostly zero rows."""
    if g.dim() < 3:
        return None
    flat = g.flatten(0, -2)
    if flat[0].any():  # (a dense gradient usually shows in its first row: skip the full scan)
        return None
    live = flat.any(dim=-1)
    rows = live.nonzero().squeeze(1)
    return rows if 2 * rows.numel() <= live.numel() else None


class _LinearRule(Rule):
    """Shared plumbing of the rules for linear and convolution layers.

    Rules act on each row (position) of a linear layer independently, so a backward whose
    incoming modified gradient is zero on most rows computes only the live ones.
    """

    def __call__(self, op: Op) -> Any:
        x, w, b, fn, extra = _linear_parts(op)
        y = op.compute()
        if op.module is None and op.carrying != [0]:
            raise AttnxValueError(f"{self.name} rule: only the input of a linear op may carry relevance")
        xd, yd = x.detach(), y.detach()
        wd = w.detach()
        bd = None if b is None else b.detach()
        is_input = bool(op.is_input and op.is_input(x))

        def backward(g):
            rows = _live_rows(g) if fn is F.linear and xd.shape[:-1] == g.shape[:-1] else None
            if rows is None:
                return (self.propagate(xd, wd, bd, yd, g, fn, extra, is_input),)
            pick = lambda t: t.flatten(0, -2).index_select(0, rows)  # noqa: E731
            part = self.propagate(pick(xd), wd, bd, pick(yd), pick(g), fn, extra, is_input)
            out = torch.zeros(xd.shape, dtype=part.dtype, device=part.device)
            out.view(-1, out.shape[-1]).index_copy_(0, rows, part)
            return (out,)

        return relay(y, [x], backward)

    def propagate(self, x, w, b, y, g, fn, extra, is_input):  # pragma: no cover - abstract
        raise NotImplementedError


class Epsilon(_LinearRule):
    """LRP-ε: ``R_x = x ⊙ Wᵀ (R_y / (y + ε sign y))`` (bias included in ``y``)."""

    name = "epsilon"

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def propagate(self, x, w, b, y, g, fn, extra, is_input):
        return _vjp(fn, x, w, epsilon_share(y, self.epsilon).mul_(g), extra)


class AlphaBeta(_LinearRule):
    """LRP-αβ as in Chefer et al.'s reference code (``layers_ours.Linear.relprop``).

    ``R_x = α (x⁺ ⊙ W⁺ᵀ S + x⁻ ⊙ W⁻ᵀ S) − β (x⁺ ⊙ W⁻ᵀ S' + x⁻ ⊙ W⁺ᵀ S')`` with
    ``S = R / (x⁺W⁺ᵀ + x⁻W⁻ᵀ)`` and ``S' = R / (x⁺W⁻ᵀ + x⁻W⁺ᵀ)`` (``safe_divide``); the bias is
    ignored. With α = 1, β = 0 only the positive contributions are kept.
    """

    name = "alpha-beta"

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, eps: float = 1e-9) -> None:
        self.alpha, self.beta, self.eps = alpha, beta, eps

    def _part(self, x, w, R, fn, extra, wa, wb):
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z = fn(xp, wa, None, **extra) + fn(xn, wb, None, **extra)
        s = safe_divide(R, z, self.eps)
        # g̃(x) such that x ⊙ g̃ = x⁺ ⊙ Waᵀ s + x⁻ ⊙ Wbᵀ s
        return torch.where(x > 0, _vjp(fn, x, wa, s, extra), _vjp(fn, x, wb, s, extra))

    def propagate(self, x, w, b, y, g, fn, extra, is_input):
        R = y * g
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        out = self._part(x, w, R, fn, extra, wp, wn) * self.alpha
        if self.beta:
            out = out - self.beta * self._part(x, w, R, fn, extra, wn, wp)
        return out


class Gamma(_LinearRule):
    """LRP-γ: positive contributions amplified, ``W + γ W⁺`` (Montavon et al. 2019), as used by
    AttnLRP for convolutions and feed-forward layers of ViTs. Relevance is conserved up to the bias.
    """

    name = "gamma"

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-6) -> None:
        self.gamma, self.epsilon = gamma, epsilon

    def propagate(self, x, w, b, y, g, fn, extra, is_input):
        R = y * g
        wp, wn = w + self.gamma * w.clamp(min=0), w + self.gamma * w.clamp(max=0)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        # positive-output part uses x⁺W⁺γ + x⁻W⁻γ, negative-output part the opposite pairing
        zp = fn(xp, wp, None, **extra) + fn(xn, wn, None, **extra)
        zn = fn(xp, wn, None, **extra) + fn(xn, wp, None, **extra)
        pos = y > 0
        s_p = torch.where(pos, R / stabilize(zp, self.epsilon), torch.zeros_like(R))
        s_n = torch.where(pos, torch.zeros_like(R), R / stabilize(zn, self.epsilon))
        gp = torch.where(x > 0, _vjp(fn, x, wp, s_p, extra), _vjp(fn, x, wn, s_p, extra))
        gn = torch.where(x > 0, _vjp(fn, x, wn, s_n, extra), _vjp(fn, x, wp, s_n, extra))
        return gp + gn


class ZBox(_LinearRule):
    """z^B rule for the first layer (Montavon et al. 2017) with per-sample bounds, as in Chefer et
    al.'s reference code: ``l, h`` are the minimum and maximum of each sample's input, and
    ``R_x = x ⊙ Wᵀs − l ⊙ W⁺ᵀs − h ⊙ W⁻ᵀs`` with ``s = R / (Wx − W⁺l − W⁻h + 1e-9)``.
    Layers that do not see the explained input fall back to ``otherwise``.
    """

    name = "z-box"

    def __init__(self, otherwise: _LinearRule | None = None, eps: float = 1e-9) -> None:
        self.otherwise = otherwise if otherwise is not None else AlphaBeta()
        self.eps = eps

    def propagate(self, x, w, b, y, g, fn, extra, is_input):
        if not is_input:
            return self.otherwise.propagate(x, w, b, y, g, fn, extra, is_input)
        dims = tuple(range(1, x.dim()))
        lo = x.amin(dim=dims, keepdim=True).expand_as(x)
        hi = x.amax(dim=dims, keepdim=True).expand_as(x)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        z = fn(x, w, None, **extra) - fn(lo, wp, None, **extra) - fn(hi, wn, None, **extra) + self.eps
        s = (y * g) / z
        R = x * _vjp(fn, x, w, s, extra) - lo * _vjp(fn, x, wp, s, extra) - hi * _vjp(fn, x, wn, s, extra)
        return divide_or_zero(R, x)


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
        z = op.compute()
        inputs = [t for t, keep in zip((a, b), track) if keep]
        ad, bd = a.detach(), b.detach()
        zd = z.detach() if self.chefer else None  # only Chefer's division needs the output kept
        share, chefer = self.share, self.chefer
        # the stabiliser is stated for the product of the unscaled operands: timm scales q before
        # Q Kᵀ, Chefer et al.'s reference after it
        eps = self.eps * getattr(a, "_attnx_scale", 1.0) * getattr(b, "_attnx_scale", 1.0)
        explicit = product_gradients(op.func, ad, bd)

        def backward(g):
            s = safe_divide(zd * g, zd, eps) if chefer else g
            if explicit is not None:
                ga, gb = explicit(s)
                return (ga.mul_(share), gb.mul_(share))
            with torch.enable_grad():
                aa = ad.detach().requires_grad_(track[0])
                bb = bd.detach().requires_grad_(track[1])
                zz = f(aa, bb)
                wrt = [t for t, keep in zip((aa, bb), track) if keep]
                grads = torch.autograd.grad(zz, wrt, s)
            return tuple(gr * share for gr in grads)

        return relay(z, inputs, backward)


_ELEMENTWISE_PRODUCTS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_MATRIX_PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}


def product_gradients(func: Any, a: torch.Tensor, b: torch.Tensor):
    """``g -> (∂⟨g, f(a, b)⟩/∂a, ∂⟨g, f(a, b)⟩/∂b)`` written out for elementwise and matrix
    products of two tensors (fresh tensors, broadcasting summed back), so that the backward needs
    neither the product's output nor a second forward; ``None`` for other products (einsum,
    vectors), which go through autograd."""
    if a.dtype != b.dtype or not (a.is_floating_point() and b.is_floating_point()):
        return None
    if func in _ELEMENTWISE_PRODUCTS:
        return lambda g: (_reduce_to(g * b, a), _reduce_to(g * a, b))
    if func in _MATRIX_PRODUCTS and a.dim() >= 2 and b.dim() >= 2:
        return lambda g: (_reduce_to(g @ b.mT, a), _reduce_to(a.mT @ g, b))
    return None


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
        ud, vd, zd = u.detach(), v.detach(), z.detach()
        dims = tuple(range(1, z.dim()))
        inputs = [op.args[i] for i in op.carrying]
        eps = self.eps

        def backward(g):
            R = zd * g
            S = safe_divide(R, zd, eps)
            a, b = ud * S, vd * S
            a_sum, b_sum, r_sum = a.sum(dims, keepdim=True), b.sum(dims, keepdim=True), R.sum(dims, keepdim=True)
            total = a_sum.abs() + b_sum.abs()
            a_fact = safe_divide(a_sum.abs(), total, eps) * r_sum
            b_fact = safe_divide(b_sum.abs(), total, eps) * r_sum
            # g̃(u) = (u ⊙ S ⊙ a_fact / Σa) / u
            gu = S * safe_divide(a_fact, a_sum, eps)
            gv = S * safe_divide(b_fact, b_sum, eps)
            out = {0: gu, 1: gv}
            return tuple(_reduce_to(out[i], op.args[i]) for i in op.carrying)

        return relay(z, inputs, backward)


def _reduce_to(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of ``t``."""
    if g.shape == t.shape:
        return g
    while g.dim() > t.dim():
        g = g.sum(0)
    for d, (gs, ts) in enumerate(zip(g.shape, t.shape)):
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
            x, shape, weight, bias, eps = op.args[0], m.normalized_shape, m.weight, m.bias, m.eps
        else:
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            bound = {**dict(zip(names, op.args)), **op.kwargs}
            x, shape = bound["input"], bound["normalized_shape"]
            weight, bias, eps = bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
        dims = tuple(range(-len(shape), 0))
        y = op.compute()
        xd, yd = x.detach(), y.detach()
        std = torch.sqrt(xd.var(dims, unbiased=False, keepdim=True) + eps)
        wd = None if weight is None else weight.detach()
        epsilon = self.epsilon

        def backward(g):
            if epsilon:
                g = epsilon_share(yd, epsilon).mul_(g)
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
        xd, yd = x.detach(), y.detach()
        epsilon = self.epsilon

        def backward(g):
            if epsilon:
                g = epsilon_share(yd, epsilon).mul_(g)
            return (divide_or_zero(yd * g, xd),)

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
        zd, eps = out.detach(), self.eps
        return relay(out, [out], lambda g: (safe_divide(zd * g, zd, eps),))


class Decompose(Rule):
    """Run an op as a composition of simpler ops through the engine, so that their own rules apply
    (e.g. ``F.scaled_dot_product_attention`` -> matmul, softmax, matmul)."""

    name = "decompose"

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, op: Op) -> Any:
        return self.fn(op.call, *op.args, **op.kwargs)
