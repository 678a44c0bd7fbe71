"""Where a relevance pass starts: the modified gradient put on the logits for the target's scalars.

Under the gradient x input convention of :mod:`attnx.lrp.rules`, the relevance ``R_z`` put on the
logits ``z`` is given to the backward as ``R_z / z`` (``seed="one_hot"``: relevance 1 on a class
target's logit, Chefer et al.) or as ``∂s/∂z`` (``seed="logit"``: conservation then reads
Σ input relevance = y_t). A target that states its own seed (``relevance_seed``, e.g. a cosine
holding the norm constant, :mod:`attnx.core.similarity`) is checked against its value.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import AttnxValueError, DegenerateMapWarning
from ..lrp.registry import Registry
from ..lrp.rules import divide_or_zero

__all__ = ["linear_target_seed", "lrp_seed", "relevance_scale", "seed_for"]


def seed_for(target: Any, scores: torch.Tensor, logits: torch.Tensor, registry: Registry) -> torch.Tensor:
    """The seed of a relevance pass under ``registry`` for ``target``'s scalars ``scores`` ``(B,)``."""
    # plain autograd (gradient x input), or rules of a modified gradient: the exact gradient
    plain = registry.plain_gradient or registry.exact_seed
    if callable(getattr(target, "relevance_seed", None)) and not plain:
        return linear_target_seed(target, scores.detach(), logits.detach(), registry.seed)
    # with plain autograd the seed's sum is no promise of conservation: no warning
    return lrp_seed(scores, logits, registry.seed, warn=not plain)


def linear_target_seed(target: Any, scores: torch.Tensor, logits: torch.Tensor, seed: str) -> torch.Tensor:
    """The modified gradient at the logits for a callable target with ``relevance_seed``,
    checked against the target's value (a rule that does not reproduce it would be a silent
    wrong answer)."""
    weights = target.relevance_seed(logits)
    if not isinstance(weights, torch.Tensor) or weights.shape != logits.shape:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise AttnxValueError(f"relevance_seed must return a tensor shaped like the logits {tuple(logits.shape)}, got {got}")
    weights = weights.detach().to(logits.dtype)
    linear = (weights * logits).sum(dim=1)
    tolerance = 1e-4 * (1 + scores.abs()) if logits.dtype != torch.float64 else 1e-9 * (1 + scores.abs())
    if ((linear - scores).abs() > tolerance).any():
        raise AttnxValueError(
            f"relevance_seed of {type(target).__name__} is not the target: Σ w·logits = {linear.tolist()}, "
            f"the target = {scores.tolist()}"
        )
    return divide_or_zero(weights, scores[:, None]) if seed == "one_hot" else weights

def relevance_scale(seed: torch.Tensor, logits: torch.Tensor, kind: str) -> torch.Tensor:
    """``(B,)`` the size of the relevance a seed can put on the logits (see ``Trace.relevance_scale``)."""
    seed, logits = seed.flatten(1), logits.flatten(1)
    if kind == "logit":
        return seed.abs().sum(1) * logits.abs().amax(1)
    return (seed * logits).abs().sum(1)


def lrp_seed(scores: torch.Tensor, logits: torch.Tensor, seed: str, warn: bool = True) -> torch.Tensor:
    """The modified gradient a relevance pass starts from at the logits, for the target's
    scalars ``s`` ``(B,)``.

    The relevance put on the logits ``z`` is ``R_z = ∂s/∂z`` with ``seed="one_hot"`` and
    ``R_z = z ⊙ ∂s/∂z`` with ``seed="logit"``; under the gradient x input convention the returned
    seed is ``R_z / z`` (0 where ``z = 0``), resp. ``∂s/∂z``. For a class target ``s = z_c`` this
    is the one-hot of ``c`` (relevance 1, resp. ``z_c``, on the target logit); for a callable such
    as ``z_a - z_b`` it is ``+1`` / ``-1`` (times the logits); for a continuation, the gradient of
    its summed log-probability. ``∂s/∂z`` follows only the logits: other outputs a callable reads
    (hidden states) are held constant. ``warn``: warn when a ``"logit"`` seed sums to 0 (a
    relevance pass meant to conserve would then show nothing).
    """
    if not scores.requires_grad:
        raise AttnxValueError("the target's scalar does not depend on the model output (it carries no gradient)")
    (grad,) = torch.autograd.grad(scores.sum(), logits, retain_graph=True, allow_unused=True)
    if grad is None:
        raise AttnxValueError(
            "the target does not depend on the logits: LRP methods start the relevance at the logits, "
            "so a callable target must be a function of them"
        )
    if seed == "one_hot":
        return divide_or_zero(grad, logits.detach())
    if seed != "logit":
        raise AttnxValueError(f"unknown LRP seed {seed!r}; expected 'one_hot' or 'logit'")
    total, s = (grad * logits.detach()).reshape(grad.shape[0], -1).sum(1), scores.detach()
    flat = ((total.abs() <= 1e-6 * s.abs()) & (s != 0)).nonzero().flatten().tolist()
    if flat and warn:  # Σ z ∂s/∂z = 0: s does not change with the scale of z (a cosine of a normalised embedding)
        warnings.warn(
            f"the target of sample(s) {flat} does not change with the scale of the logits (e.g. a cosine "
            "similarity of the output), so the relevance seeded with z * ds/dz sums to 0; give the target a "
            "relevance_seed holding the norm constant (attnx.similarity.cosine_to, attnx.image_text.similarity_to)",
            DegenerateMapWarning, stacklevel=5,
        )
    return grad