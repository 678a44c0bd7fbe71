"""Gradient attention rollout (Gildenblat, vit-explain): rollout of gradient-weighted attention."""
from __future__ import annotations

import torch

from ..core.trace_types import Needs
from .options import DISCARD_RATIO, START_LAYER
from .propagation import check_start_layer, option_layer, rollout_row
from .registry import register_method
from .rollout import rollout_matrix


@register_method("grad_rollout", reference="Gildenblat, vit-explain", needs=Needs(attentions=True, gradients=True), options=(DISCARD_RATIO, START_LAYER),
                 first_layer=option_layer("start_layer"))
def grad_rollout(trace, readout, *, discard_ratio: float = 0.0, start_layer: int = 0) -> torch.Tensor:
    """Gradient rollout: rollout of ``Ā = (mean_h(A ⊙ ∂y_t/∂A))⁺``, class-specific.

    Each layer's attention is paired with its own gradient (vit-explain pairs them in reverse
    layer order and hooks the pre-softmax scores; this implements the stated method).
    """
    A, G = trace.attentions, trace.gradients
    s = check_start_layer(start_layer, len(A))
    fused = ((a * g).mean(dim=1).clamp(min=0) for a, g in zip(A[s:], G[s:]))
    return rollout_row((rollout_matrix(f, discard_ratio, readout) for f in fused), readout)
