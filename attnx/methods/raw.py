"""Raw attention: the attention of one layer, heads fused, read at the readout token's row."""
from __future__ import annotations

import torch

from ..core.trace_types import Needs
from .options import HEAD_FUSION, LAYER
from .propagation import check_start_layer, fuse_heads
from .registry import register_method


@register_method("raw_attention", reference="—", needs=Needs(attentions=True), options=(LAYER, HEAD_FUSION))
def raw_attention(trace, readout, *, layer: int = -1, head_fusion: str = "mean") -> torch.Tensor:
    """Raw attention of one layer (default the last), heads fused, at the readout row.

    ``R = fuse_h(A^(layer))[readout, :]``; the class-agnostic baseline of every paper in the field.
    """
    attentions = trace.attentions
    index = check_start_layer(layer, len(attentions), "layer")
    return readout.row(fuse_heads(attentions[index], head_fusion))
