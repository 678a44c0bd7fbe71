"""Generic attention explainability (Chefer, Gur & Wolf, ICCV 2021), self-attention rule."""
from __future__ import annotations

import torch

from ..trace import Needs
from .propagation import rollout_row
from .registry import register_method


@register_method("generic", reference="Chefer, Gur & Wolf, ICCV 2021", needs=Needs(attentions=True, gradients=True), options=())
def generic(trace, readout) -> torch.Tensor:
    """Chefer et al. ICCV'21, Eq. 5-6: ``R ← R + E_h[(∇A ⊙ A)⁺] R`` from ``R = I``, readout row.

    Equivalent to the readout row of ``(I + Ā_L) ... (I + Ā_1)``; no normalisation.
    """
    A, G = trace.attentions, trace.gradients
    eye = torch.eye(A[0].shape[-1], dtype=A[0].dtype, device=A[0].device)
    return rollout_row(((g * a).clamp(min=0).mean(dim=1) + eye for a, g in zip(A, G)), readout)
