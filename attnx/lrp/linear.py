"""Rules for linear and convolution layers (ε, α-β, γ, z^B) at their cost floor.

Each rule needs at most two matrix products beyond the forward: with ``u = Wx`` (the forward
without bias) and ``v = |W||x|`` (one extra product), the positive and negative activators are
``x⁺W⁺ + x⁻W⁻ = (u + v)/2`` and ``x⁺W⁻ + x⁻W⁺ = (u − v)/2``; in the backward,
``W±ᵀs = (Wᵀs ± |W|ᵀs)/2``, and ``Wᵀs`` comes from the model's own backward of the layer (the
relay hands the modified gradient to the real graph), so only ``|W|ᵀs`` is computed here.
``|W|`` is computed once per pass for each weight (:class:`attnx.lrp.relay.Propagation`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnxTypeError, AttnxValueError
from .kinds import is_hf_conv1d
from .relay import (
    Kept,
    Op,
    Rule,
    active,
    divide_or_zero,
    epsilon_share,
    indicator,
    output_like,
    relay,
    safe_divide,
    scratch_like,
    stabilize,
)

__all__ = ["AlphaBeta", "Epsilon", "Gamma", "GROUPED_MM", "LinearRule", "ZBox", "grouped_linear", "linear_parts"]


#: the grouped matrix product of mixture-of-experts layers (one weight matrix per group of rows)
GROUPED_MM = tuple(f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, offs: torch.Tensor | None = None) -> torch.Tensor:
    """``grouped_mm(x, w, offs)`` (+ ``b``): rows ``offs[e-1]:offs[e]`` of ``x`` times ``w[e]`` (in, out)."""
    return GROUPED_MM[0](x, w, offs=offs, bias=b)


def linear_parts(op: Op) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Callable, dict]:
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


def input_vjp(
    fn: Callable, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, extra: dict, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``(∂ fn(x, w) / ∂x)ᵀ grad`` for the linear map ``x -> fn(x, w)`` (no bias); written into
    ``out`` (shaped as ``x``) for ``F.linear`` when given."""
    if fn is F.linear:
        return grad.matmul(w) if out is None else torch.matmul(grad, w, out=out)
    if fn is F.conv2d and not isinstance(extra.get("padding"), str):  # "valid" / "same": the generic path
        return torch.nn.grad.conv2d_input(x.shape, w, grad, **extra)
    with torch.enable_grad():  # any other linear map: its own backward
        xx = x.detach().requires_grad_(True)
        (gx,) = torch.autograd.grad(fn(xx, w.detach(), None, **extra), xx, grad)
    return gx


def without_bias(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, fn: Callable, extra: dict) -> torch.Tensor:
    """``u = fn(x, w)`` without the bias, read off the forward's output (no product)."""
    if b is None:
        return y
    if fn is F.linear:
        return y - b
    if fn is F.conv2d:
        return y - b.reshape(-1, *([1] * (y.dim() - 2)))
    return fn(x, w, None, **extra)


def sign1(x: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``x > 0``, else ``-1`` (an input at 0 takes the negative branch, as the
    ``where(x > 0, ...)`` of the reference formulas)."""
    return indicator(x, torch.gt).mul_(2).sub_(1)


class LinearRule(Rule):
    """Shared plumbing of the rules for linear and convolution layers.

    ``propagate(ctx, g)`` returns ``(g_real, g_extra)``: the modified gradient sent through the
    layer's own backward (giving ``Wᵀ g_real`` at the input), and an extra modified gradient of the
    input added to it (or ``None``).
    """

    def __call__(self, op: Op) -> Any:
        x, w, b, fn, extra = linear_parts(op)
        if op.module is None and op.carrying != [0]:
            raise AttnxValueError(f"{self.name} rule: only the input of a linear op may carry relevance")
        y = op.compute(graph=True)
        if not y.requires_grad:  # a frozen layer on a constant: nothing to relay
            return y
        state = active()
        # a half-precision weight computed in float32 (attnx.core.runtime.float32_execution) stays half
        # here and is cast where the backward reads it; the bias (one row) is cast now
        ctx = LinearCall(None, w.detach(), None if b is None else b.detach().to(x.dtype), None, fn, extra,
                         bool(op.is_input and op.is_input(x)), state)
        ctx.kept = Kept(x.detach(), y.detach())
        if state is not None:
            state.will_use(ctx.w)
        return relay(y, [x], lambda g: self.backward(ctx, g), through_output=True)

    #: whether :meth:`propagate` derives tensors of the weight (``|W|``, ``W ± |W|``) or computes
    #: products beyond the model's own backward: then a layer whose relevance reaches a few of its
    #: outputs (a language model's head, seeded at the target tokens) computes on those rows only
    reads_weight = True

    def backward(self, c: "LinearCall", g: torch.Tensor) -> tuple:
        """:meth:`propagate`, then the weight's derived tensors are let go after its last use."""
        c.x, c.y = c.kept.get()
        rows = c.reached_rows(g) if self.reads_weight else None
        if rows is None:
            out = self.propagate(c, g)
        else:
            real, extra = self.propagate(c.restricted(rows), g.index_select(-1, rows))
            if real is not None:  # zero where no relevance arrived: the rule's share is a product with g
                real = g.new_zeros(g.shape).index_copy_(-1, rows, real)
            out = real, extra
        c.cast = c.x = c.y = None  # the layer's input and output go, as autograd's saved tensors do
        if c.state is not None:
            c.state.used(c.w)
        return out

    def propagate(self, c: "LinearCall", g: torch.Tensor) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError


class LinearCall:
    """What a linear rule's backward reads: input, weight, bias, output, the functional. ``w`` is
    the layer's weight as stored (the key of its derived tensors); :attr:`cw` the weight in the
    input's dtype, cast where it is read when they differ (a half-precision model computed in
    float32 keeps no float32 copy of its weights until the backward)."""

    __slots__ = ("x", "w", "b", "y", "fn", "extra", "is_input", "state", "cast", "kept")

    def __init__(self, x, w, b, y, fn, extra, is_input, state) -> None:
        self.x, self.w, self.b, self.y, self.fn, self.extra, self.is_input, self.state = x, w, b, y, fn, extra, is_input, state
        self.cast: torch.Tensor | None = None
        #: ``x`` and ``y`` between the forward and the backward (:class:`~attnx.lrp.relay.Kept`)
        self.kept: Kept | None = None

    @property
    def cw(self) -> torch.Tensor:
        if self.w.dtype == self.x.dtype:
            return self.w
        if self.cast is None:  # once per backward call (dropped by LinearRule.backward), on recycled pages
            out = None if self.state is None else self.state.output(self.w.shape, self.x.dtype, self.w.device)
            self.cast = self.w.to(self.x.dtype) if out is None or not self.w.is_contiguous() else out.copy_(self.w)
        return self.cast

    def reached_rows(self, g: torch.Tensor) -> torch.Tensor | None:
        """The output features (rows of ``W``) the incoming ``g`` is non-zero at, when they are at
        most an eighth of a linear layer's outputs; else ``None``. A language model's head
        (``V × d``, ``V`` up to 256k) receives relevance at the explained tokens only: its rule
        then costs products with those rows, not ``|W|`` and ``W ± |W|`` of the whole vocabulary."""
        if self.fn is not F.linear or self.w.dim() != 2 or g.dim() < 2 or g.shape[-1] < 64:
            return None
        flat = g.reshape(-1, g.shape[-1])
        if flat[0].count_nonzero() * 8 > g.shape[-1]:  # one row reaches many already: no pass over all of g
            return None
        rows = flat.any(dim=0).nonzero().squeeze(1)
        return rows if rows.numel() * 8 <= g.shape[-1] else None

    def restricted(self, rows: torch.Tensor) -> "LinearCall":
        """This call on the output features ``rows`` only (its own tensors: nothing cached)."""
        b = None if self.b is None else self.b.index_select(0, rows)
        return LinearCall(self.x, self.w.index_select(0, rows).to(self.x.dtype), b, self.y.index_select(-1, rows), self.fn,
                          self.extra, self.is_input, None)

    def u(self) -> torch.Tensor:
        """``Wx`` without the bias."""
        return without_bias(self.y, self.x, self.cw, self.b, self.fn, self.extra)

    def abs_w(self) -> torch.Tensor:
        """``|W|`` (of the weight in the input's dtype), once per pass for each weight."""
        return self.cw.abs() if self.state is None else self.state.derived(self.w, "abs", lambda w: self.cw.abs())

    def v(self, abs_w: torch.Tensor) -> torch.Tensor:
        """``|W||x|``: the one extra product of the activators."""
        return self.fn(self.x.abs(), abs_w, None, **self.extra)

    def abs_vjp(self, abs_w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``|W|ᵀ s``."""
        return input_vjp(self.fn, self.x, abs_w, s, self.extra)

    def scratch(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        """A temporary shaped as ``like``, reused across the pass (:meth:`Propagation.scratch`)."""
        return scratch_like(self.state, slot, like)

    def doubled_positive_activator(self, abs_w: torch.Tensor) -> torch.Tensor:
        """``2(x⁺W⁺ + x⁻W⁻) = Wx + |W||x|``: for a linear layer in a pass, a temporary of the pass
        (:meth:`scratch`), else a new tensor; the bias enters the product (as ``−b``) rather than
        costing a pass of its own."""
        if self.fn is F.linear and self.state is not None and self.y.is_contiguous():
            x_abs = torch.abs(self.x, out=self.scratch(0, self.x))
            out = self.scratch(1, self.y)
            flat_x, flat_out = x_abs.view(-1, x_abs.shape[-1]), out.view(-1, out.shape[-1])
            if self.b is None:
                torch.mm(flat_x, abs_w.t(), out=flat_out)
            else:
                torch.addmm(self.b.neg(), flat_x, abs_w.t(), out=flat_out)
            return out.add_(self.y)
        if self.b is not None and self.fn in (F.linear, F.conv2d):
            return self.fn(self.x.abs(), abs_w, self.b.neg(), **self.extra).add_(self.y)
        return self.v(abs_w).add_(self.u())

    def signed_part(self, sign: int) -> torch.Tensor:
        """``W + |W|`` (``sign = 1``: twice the positive part) or ``W − |W|`` (twice the negative
        part), once per pass for each weight."""
        make = (lambda w: self.cw + self.abs_w()) if sign > 0 else (lambda w: self.cw - self.abs_w())
        return self.cw + self.abs_w() * sign if self.state is None else self.state.derived(self.w, f"2w{sign:+d}", make)


class Epsilon(LinearRule):
    """LRP-ε: ``R_x = x ⊙ Wᵀ (R_y / (y + ε sign y))`` (bias included in ``y``). One product: the
    layer's own backward of the rescaled gradient."""

    name = "epsilon"
    reads_weight = False  # one elementwise share, the product is the model's own backward

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def propagate(self, c, g):
        return epsilon_share(c.y, self.epsilon).mul_(g), None


class AlphaBeta(LinearRule):
    """LRP-αβ as in Chefer et al.'s reference code (``layers_ours.Linear.relprop``).

    ``R_x = α (x⁺ ⊙ W⁺ᵀ S + x⁻ ⊙ W⁻ᵀ S) − β (x⁺ ⊙ W⁻ᵀ S' + x⁻ ⊙ W⁺ᵀ S')`` with
    ``S = R / (x⁺W⁺ᵀ + x⁻W⁻ᵀ)`` and ``S' = R / (x⁺W⁻ᵀ + x⁻W⁺ᵀ)`` (``safe_divide``); the bias is
    ignored. With α = 1, β = 0 only the positive contributions are kept.

    Computed as ``g̃(x) = Wᵀ(αS − βS')/2 + σ(x) ⊙ |W|ᵀ(αS + βS')/2`` with ``σ = ±1`` the sign of
    ``x`` (−1 at 0): the activators cost one product ``|W||x|``, the backward one more. With
    β = 0 (:meth:`positive`) the backward is two products with ``W ± |W|`` instead.
    """

    name = "alpha-beta"

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, eps: float = 1e-9) -> None:
        self.alpha, self.beta, self.eps = alpha, beta, eps

    def propagate(self, c, g):
        if not self.beta:
            return None, self.positive(c, g)
        R = c.y * g
        abs_w = c.abs_w()
        u, v = c.u(), c.v(abs_w)
        s = safe_divide(R, (u + v) / 2, self.eps) * self.alpha
        real, extra = s, s
        if self.beta:
            s_neg = safe_divide(R, (u - v) / 2, self.eps) * self.beta
            real, extra = s - s_neg, s + s_neg
        return real / 2, sign1(c.x) * c.abs_vjp(abs_w, extra / 2)

    def positive(self, c: LinearCall, g: torch.Tensor) -> torch.Tensor:
        """β = 0: ``g̃(x) = α W⁺ᵀS`` where ``x > 0``, ``α W⁻ᵀS`` elsewhere, ``S = R / z⁺``.

        ``W±ᵀS`` are products with ``W ± |W|`` themselves, not ``(WᵀS ± |W|ᵀS)/2``: where a
        denominator is (near) zero, ``S`` is large and only exact zeros in ``W±`` cancel it."""
        z = c.doubled_positive_activator(c.abs_w())  # 2 z⁺
        nonzero = indicator(z, torch.ne, out=c.scratch(2, z))
        # S / 2 = R / (2 z⁺ + 2 eps), zero where z⁺ = 0 (safe_divide)
        # (slot 0 held |x|, spent on the activator)
        s = torch.mul(c.y, g, out=c.scratch(0, z)).div_(z.add_(2 * self.eps)).mul_(nonzero)
        if self.alpha != 1:
            s.mul_(self.alpha)
        pos = input_vjp(c.fn, c.x, c.signed_part(1), s, c.extra, out=output_like(c.state, c.x))
        neg = input_vjp(c.fn, c.x, c.signed_part(-1), s, c.extra, out=c.scratch(1, pos))
        # where(x > 0, pos, neg) by multiplication (exact: one term is 0), one mask temporary
        positive = indicator(c.x, torch.gt, out=c.scratch(2, pos))
        pos.mul_(positive)
        return pos.add_(neg.mul_(torch.le(c.x, 0.0, out=positive)))


class Gamma(LinearRule):
    """Generalised LRP-γ: positive contributions amplified, ``W + γ W⁺`` (Montavon et al. 2019;
    zennit's ``Gamma``), as used by AttnLRP for convolutions and feed-forward layers of ViTs.

    Outputs with ``y > 0`` divide by ``x⁺W_γ⁺ + x⁻W_γ⁻ + b + γb⁺ = y + γ((u + v)/2 + b⁺)``, the
    others by ``x⁺W_γ⁻ + x⁻W_γ⁺ + b + γb⁻ = y + γ((u − v)/2 + b⁻)`` (``u = Wx``, ``v = |W||x|``):
    the γ-modified bias is in the denominator, which therefore has the sign of ``y`` and at least
    its magnitude, and the bias absorbs its share of relevance. (Leaving the bias out, the
    denominator can vanish or change sign where a large bias decides the sign of ``y``: relevance
    then grows layer by layer, to 1e14 on DINOv2.) Then
    ``g̃(x) = (1 + γ/2) Wᵀ(s₊ + s₋) + σ(x) γ/2 |W|ᵀ(s₊ − s₋)``.
    """

    name = "gamma"

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-6) -> None:
        self.gamma, self.epsilon = gamma, epsilon

    def propagate(self, c, g):
        R = c.y * g
        abs_w = c.abs_w()
        u, v = c.u(), c.v(abs_w)
        h = self.gamma / 2
        pos = c.y > 0
        b = c.y - u  # the bias, broadcast (0 without one)
        z = c.y + self.gamma * torch.where(pos, (u + v) / 2 + b.clamp(min=0), (u - v) / 2 + b.clamp(max=0))
        s = R / stabilize(z, self.epsilon)
        s_diff = torch.where(pos, s, -s)  # s₊ − s₋
        return (1 + h) * s, sign1(c.x) * c.abs_vjp(abs_w, h * s_diff)


class ZBox(LinearRule):
    """z^B rule for the first layer (Montavon et al. 2017) with per-sample bounds, as in Chefer et
    al.'s reference code: ``l, h`` are the minimum and maximum of each sample's input, and
    ``R_x = x ⊙ Wᵀs − l ⊙ W⁺ᵀs − h ⊙ W⁻ᵀs`` with ``s = R / (Wx − W⁺l − W⁻h + 1e-9)``.
    Layers that do not see the explained input fall back to ``otherwise``.

    ``W⁺l`` and ``W⁻h`` of the per-sample constant images are the bounds times the layer applied
    to one image of ones; ``W±ᵀs = (Wᵀs ± |W|ᵀs)/2``.
    """

    name = "z-box"

    def __init__(self, otherwise: LinearRule | None = None, eps: float = 1e-9) -> None:
        self.otherwise = otherwise if otherwise is not None else AlphaBeta()
        self.eps = eps

    def propagate(self, c, g):
        if not c.is_input:
            return self.otherwise.propagate(c, g)
        x, w, fn, extra = c.x, c.cw, c.fn, c.extra
        dims = tuple(range(1, x.dim()))
        lo = x.amin(dim=dims, keepdim=True)
        hi = x.amax(dim=dims, keepdim=True)
        abs_w = c.abs_w()
        ones = torch.ones_like(x[:1])
        lo_out = lo.reshape(-1, *([1] * (c.y.dim() - 1)))
        hi_out = hi.reshape(-1, *([1] * (c.y.dim() - 1)))
        one_w, one_abs = fn(ones, w, None, **extra), fn(ones, abs_w, None, **extra)
        # W⁺l + W⁻h = (W(l + h) + |W|(l − h)) / 2 on constant images
        bounds = ((lo_out + hi_out) * one_w + (lo_out - hi_out) * one_abs) / 2
        s = (c.y * g) / (c.u() - bounds + self.eps)
        a, b = input_vjp(fn, x, w, s, extra), input_vjp(fn, x, abs_w, s, extra)
        R = x * a - lo * (a + b) / 2 - hi * (a - b) / 2
        return None, divide_or_zero(R, x)
