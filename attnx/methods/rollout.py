"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020)."""
from __future__ import annotations

import torch

from ..core.layout import Readout
from ..core.trace_types import Needs
from .options import DISCARD_RATIO, HEAD_FUSION, START_LAYER
from .propagation import check_start_layer, discard_lowest, fuse_heads, rollout_row
from .registry import register_method


def rollout_matrix(fused: torch.Tensor, discard_ratio: float, readout: Readout) -> torch.Tensor:
    """One layer of rollout: ``Â = rownorm((discard(Ā) + I) / 2)`` for a fused ``(B, N, N)`` map.

    The identity accounts for the residual connection (Abnar & Zuidema, Sec. 3); rows are
    renormalised to sum to one.
    """
    fused = discard_lowest(fused, discard_ratio, readout)
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    a = (fused + eye) / 2
    return a / a.sum(dim=-1, keepdim=True)


@register_method("rollout", reference="Abnar & Zuidema, ACL 2020", needs=Needs(attentions=True), options=(HEAD_FUSION, DISCARD_RATIO, START_LAYER))
def rollout(
    trace, readout, *, head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0
) -> torch.Tensor:
    """Attention rollout: ``C = Â_L ... Â_s`` with ``Â = rownorm((fuse_h(A) + I) / 2)``, readout row.

    Options: ``head_fusion`` (mean | max | min), ``discard_ratio`` (zero that fraction of the
    smallest fused attentions per layer, never in the readout row), ``start_layer``.
    """
    attentions = trace.attentions
    s = check_start_layer(start_layer, len(attentions))
    return rollout_row((rollout_matrix(fuse_heads(a, head_fusion), discard_ratio, readout) for a in attentions[s:]), readout)
