"""LRP through the model's own attention kernel: no attention map is materialised.

``F.scaled_dot_product_attention(q, k, v)`` is ``softmax(q kᵀ · scale + mask) v``. Written out
(:func:`~attnx.lrp.decompositions.sdpa_decomposition`), its parts meet the registry's rules, and
the softmax keeps a ``(B, H, N, N)`` map per layer for the backward. When those rules only scale
gradients, the kernel's own backward already computes what they compute (DESIGN §5, relevance =
input ⊙ modified gradient):

* a product of two relevance-carrying tensors under the uniform rule (``Bilinear(share)``, AttnLRP
  Eq. 7) gives each operand its plain gradient times ``share``; under plain gradient × input
  (``Passthrough``), its plain gradient;
* the softmax under its own gradient × input (``Passthrough``, AttnLRP's softmax rule, Eq. 13:
  ``R_x = x ⊙ (g − Σ s ⊙ g)``) is the softmax's plain backward; held constant (``Constant``,
  CP-LRP) it passes nothing to ``q`` and ``k``;
* the scaling by ``scale``, the masks, the key/value repetition of grouped-query attention are
  linear and constant: plain gradient.

So the modified gradients at ``q``, ``k``, ``v`` are the kernel's plain gradients times constant
factors (AttnLRP: ``¼, ¼, ½``; CP-LRP: ``0, 0, 1``), applied where the kernel's inputs enter it, and
the fused kernel (flash / memory-efficient / math, whatever SDPA picks) runs forward and backward
as in the model's own pass. Where the rules of the parts are anything else (Chefer et al.'s
stabilised products and identity softmax), a mask carries relevance or dropout is on, the call is
written out as before (:attr:`FusedAttention.fallback`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .relay import Op, Rule, plain_edges, relay
from .rules import Bilinear, Constant, Decompose, Passthrough, Pruned, sdpa_decomposition

__all__ = ["FusedAttention", "scaled_gradient", "sdpa_factors"]

#: the arguments of ``F.scaled_dot_product_attention``, in order
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
#: ops of the written-out kernel that are linear in their relevance-carrying argument
_LINEAR_PARTS = (torch.add, torch.Tensor.masked_fill, torch.repeat_interleave, torch.Tensor.transpose)


def scaled_gradient(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` whose modified gradient is ``factor`` times the incoming one (the plain backward of a
    forward that keeps plain edges passes unchanged); ``factor = 0``: no relevance reaches ``t``."""
    if factor == 1.0:
        return t
    if factor == 0.0:
        return relay(t, [], lambda g: ()) if plain_edges() else t.detach()
    return relay(t, [t], lambda g: (g * factor,))


def _product_share(rule: Rule | None) -> float | None:
    """The factor a product rule gives each of two relevance-carrying operands, if it is one."""
    if type(rule) is Passthrough:
        return 1.0
    if type(rule) is Bilinear and not rule.chefer:
        return float(rule.share)
    return None


def sdpa_factors(op: Op) -> tuple[float, float, float] | None:
    """The factors of the modified gradients at ``(query, key, value)`` of an SDPA call under the
    rules the registry gives its parts at this place, or ``None`` when those rules are not
    gradient scalings (the call is then written out)."""
    bound = dict(zip(SDPA_ARGS, op.args), **op.kwargs)
    carrying = {SDPA_ARGS[i] if isinstance(i, int) else i for i in op.carrying}
    if op.rule_of is None or carrying - {"query", "key", "value"} or float(bound.get("dropout_p", 0.0) or 0.0) > 0.0:
        return None
    softmax, share = op.rule_of(torch.softmax), _product_share(op.rule_of(torch.matmul))
    scalar = op.rule_of(torch.mul)  # q · scale: a product with a number
    if share is None or type(softmax) not in (Passthrough, Constant, Pruned) or type(scalar) not in (type(None), Passthrough, Bilinear):
        return None
    if any(type(op.rule_of(f)) not in (type(None), Passthrough) for f in _LINEAR_PARTS):
        return None
    q, k, v = ("query" in carrying), ("key" in carrying), ("value" in carrying)
    if type(softmax) in (Constant, Pruned):  # the probabilities are constants: A V is linear in V
        return 0.0, 0.0, 1.0
    scores = share if (q and k) else 1.0  # q kᵀ, a product of two carrying tensors or linear
    values = share if ((q or k) and v) else 1.0  # A V
    return scores * values, scores * values, values


class FusedAttention(Rule):
    """``F.scaled_dot_product_attention`` run by its own kernel, forward and backward, with the
    gradients at ``q``, ``k``, ``v`` scaled as the registry's rules for the softmax and the two
    products prescribe (see the module docstring); equal to the written-out attention under the
    same rules, without its ``(B, H, N, N)`` maps. Falls back to ``fallback`` (the written-out
    kernel) where the rules are not gradient scalings.

    Memory: what the model's own forward and backward with SDPA keep (the kernel's inputs, output
    and per-row log-sum-exp), plus one gradient-sized temporary per scaled input in the backward.
    """

    name = "fused-attention"

    def __init__(self, fallback: Rule | None = None) -> None:
        self.fallback = fallback if fallback is not None else Decompose(sdpa_decomposition)

    def applies(self, op: Op) -> bool:
        return sdpa_factors(op) is not None

    def __call__(self, op: Op) -> Any:
        factors = sdpa_factors(op)
        if factors is None:  # called directly, not through the engine's applies()
            return self.fallback(op)
        args = list(op.args)
        for i, factor in zip(range(3), factors):
            if i in op.carrying:
                args[i] = scaled_gradient(args[i], factor)
        return F.scaled_dot_product_attention(*args, **op.kwargs)
