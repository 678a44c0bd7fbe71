"""Generic attention explainability (Chefer, Gur & Wolf, ICCV 2021), self-attention rule."""
from __future__ import annotations

import torch

from ..core.trace_types import Needs
from .options import START_LAYER
from .propagation import check_start_layer, option_layer, rollout_row
from .registry import register_method


@register_method(
    "generic", reference="Chefer, Gur & Wolf, ICCV 2021", needs=Needs(attentions=True, gradients=True), options=(START_LAYER,),
    first_layer=option_layer("start_layer"),
)
def generic(trace, readout, *, start_layer: int = 0) -> torch.Tensor:
    """Chefer et al. ICCV'21, Eq. 5-6: ``R ← R + E_h[(∇A ⊙ A)⁺] R`` from ``R = I``, readout row.

    Equivalent to the readout row of ``(I + Ā_L) ... (I + Ā_s)``; no normalisation. The layers
    before ``start_layer`` are skipped, as the authors' CLIP notebook does (its ``start_layer = 11``
    of 12, the last layer only, is ``start_layer=-1``); the default uses every layer.
    """
    A, G = trace.attentions, trace.gradients
    s = check_start_layer(start_layer, len(A))
    eye = torch.eye(A[0].shape[-1], dtype=A[0].dtype, device=A[0].device)
    return rollout_row(((g * a).clamp(min=0).mean(dim=1) + eye for a, g in list(zip(A, G))[s:]), readout)
