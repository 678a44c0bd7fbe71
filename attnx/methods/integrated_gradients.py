"""Integrated gradients (Sundararajan, Taly & Yan, ICML 2017), computed by captum.

For the explained input ``x`` (the pixels of an image model, the output of the token embeddings
of a text model), a baseline ``x'`` and the explained scalar ``F = y_t`` (Eq. 1 of the paper)::

    IG_i(x) = (x_i − x'_i) · ∫_0^1 ∂F(x' + α (x − x')) / ∂x_i  dα

``captum.attr.IntegratedGradients`` approximates the integral with ``n_steps`` points of
Gauss-Legendre quadrature (captum's default rule) on the forward of
:class:`attnx.core.target_forward.TargetForward` (the model's own forward, all of the batch's
other inputs unchanged). Completeness (the paper's Proposition 1): ``Σ_i IG_i = F(x) − F(x')``
up to the quadrature error, which captum reports as the convergence delta
(``Explanation.options["convergence_delta"]``, one per sample).

Baselines (``baseline``):

* ``"zeros"``: zero pixels in the model's input space (after its normalisation: for a model fed
  mean/std-normalised images this is the dataset's mean colour, not a black image), or zero token
  embeddings;
* ``"pad"`` (text): the embedding of the model's padding token (``config.pad_token_id``) at every
  position.

The scores are aggregated as for ``gradient_x_input``: summed over the channels and each patch
of the model's grid (images; the heat map is drawn from the pixels), over the hidden dimension
(text, one value per token). Cost: ``n_steps`` forward and backward passes of the batch, run in
chunks of whole copies of the batch.
"""
from __future__ import annotations

import warnings

import torch

from ..core.trace_types import Needs
from ..errors import ConvergenceWarning
from .lrp import input_relevance_scores
from .options import LIBRAGRAD
from .registry import Option, Relevance, register_method

__all__ = ["CONVERGENCE_TOLERANCE", "integrated_gradients", "baseline_inputs", "check_convergence"]

#: the largest completeness error ``|Σ IG − (y(x) − y(x'))| / |y(x) − y(x')|`` accepted without a warning
CONVERGENCE_TOLERANCE = 0.1

BASELINE = Option("baseline", "zeros", "zeros (pixels or token embeddings) or pad (the padding token's embedding, text)",
                  kind=str, choices=("zeros", "pad"))


def baseline_inputs(forward, x: torch.Tensor, baseline: str) -> torch.Tensor:
    """The baseline shaped like ``x``: zeros, or the padding token's embedding at every position."""
    if baseline == "zeros":
        return torch.zeros_like(x)
    return forward.token_embeddings(forward.pad_token_id()).to(x)


def completeness_total(trace, result: Relevance, options: dict) -> torch.Tensor:
    """What integrated gradients claims to sum to (completeness, Proposition 1 of the paper):
    ``y_t(x) − y_t(x')``, read from captum's convergence delta ``Σ IG − (y_t(x) − y_t(x'))``."""
    total = trace.input_relevance.detach().to(torch.float64).flatten(1).sum(1)
    return total - torch.tensor(result.options["convergence_delta"], dtype=torch.float64, device=total.device)


@register_method(
    "integrated_gradients",
    conserves=completeness_total,
    reference="Sundararajan et al., ICML 2017 (captum IntegratedGradients; exact: captum on the same forward)",
    needs=Needs(forward=True),
    options=(
        Option("n_steps", 50, "points of the Gauss-Legendre quadrature of the path integral", kind=int, bounds=(1, 100000)),
        BASELINE,
        LIBRAGRAD,
    ),
)
def integrated_gradients(trace, readout, *, n_steps: int = 50, baseline: str = "zeros") -> Relevance:
    """Integrated gradients ``(x − x') ⊙ ∫ ∂y_t/∂x dα`` from a baseline ``x'`` (captum), at the pixels or the token embeddings.

    Sundararajan et al. 2017, Eq. 1, by captum's ``IntegratedGradients`` with ``n_steps``
    Gauss-Legendre points; ``Σ IG = y_t(x) − y_t(x')`` up to the convergence delta. Scores summed
    per patch / per token as for ``gradient_x_input``. With ``libragrad=True`` the gradients
    along the path are LibraGrad's (:func:`attnx.lrp.registry.libragrad`).
    """
    from captum.attr import IntegratedGradients

    forward = trace.forward
    x = forward.inputs()
    reference = baseline_inputs(forward, x, baseline)
    rows = forward.copies_per_chunk() * forward.batch_size
    with forward.held(), torch.enable_grad():
        attributions, delta = IntegratedGradients(forward).attribute(
            x, baselines=reference, n_steps=n_steps, internal_batch_size=rows, return_convergence_delta=True,
        )
    trace.input_relevance = attributions.detach()
    result = input_relevance_scores(trace, readout)
    check_convergence(attributions, delta, n_steps, baseline)
    options = {"n_steps": n_steps, "baseline": baseline, "convergence_delta": delta.detach().tolist()}
    return Relevance(tokens=result.tokens, scores=result.scores, pixels=result.pixels, options=options)


def check_convergence(attributions: torch.Tensor, delta: torch.Tensor, n_steps: int, baseline: str) -> None:
    """Warn (:class:`attnx.errors.ConvergenceWarning`) when ``Σ IG`` misses ``y(x) − y(x')`` by more than
    :data:`CONVERGENCE_TOLERANCE` of it for some sample: the quadrature did not converge (e.g. a zero
    baseline of a model with RMSNorm, whose output swings within a few hundredths of the path's start)."""
    total = attributions.detach().to(torch.float64).flatten(1).sum(1)
    delta = delta.detach().to(torch.float64).reshape(-1).to(total.device)
    claimed = (total - delta).abs()
    bad = delta.abs() > CONVERGENCE_TOLERANCE * claimed + 1e-6
    if bad.any():
        samples = torch.nonzero(bad).flatten().tolist()
        worst = float((delta.abs() / claimed.clamp_min(1e-12))[bad].max())
        warnings.warn(
            f"integrated_gradients did not converge for sample(s) {samples}: the attributions miss y(x) − y(baseline) "
            f"by up to {worst:.3g}× of it with n_steps={n_steps}; raise n_steps, or take another baseline "
            f"(now {baseline!r}; text: baseline='pad')", ConvergenceWarning, stacklevel=2,
        )
