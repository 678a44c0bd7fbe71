"""Raw attention: the attention of one layer, heads fused, read at the readout token's row."""
from __future__ import annotations

import torch

from ..core.layer_fold import AttentionLayer, LayerFold, heads_fused, kept_layers, layer_index, row_separable
from ..core.trace_types import Needs
from .options import HEAD_FUSION, LAYER
from .propagation import check_start_layer, fuse_heads
from .registry import register_method


@heads_fused
@row_separable
def raw_layer(at: AttentionLayer, *, layer: int = -1, head_fusion: str = "mean") -> torch.Tensor | None:
    """What raw attention keeps of a layer: its heads fused, ``(B, N, N)``, for the layer it reads
    (every layer when folded in the forward, before the number of layers is known)."""
    index = layer_index(layer, at.num_layers) if at.num_layers else None
    if index is not None and at.index != index:
        return None
    return fuse_heads(at.attention, head_fusion)


@register_method("raw_attention", reference="—", needs=Needs(attentions=True), options=(LAYER, HEAD_FUSION), fold=raw_layer)
def raw_attention(trace, readout, *, layer: int = -1, head_fusion: str = "mean") -> torch.Tensor:
    """Raw attention of one layer (default the last), heads fused, at the readout row.

    ``R = fuse_h(A^(layer))[readout, :]``; the class-agnostic baseline of every paper in the field.

    Memory: with the model's sdpa kernel kept, each layer's fused ``(B, N, N)`` map is made as the
    forward makes the layer (``F_sdpa + 4·B·N²·L + 2·min(T, 4·B·H·N²)`` bytes, as rollout); with
    the attention written out, every layer's ``(B, H, N, N)`` map is kept.
    """
    fused = kept_layers(trace, LayerFold(raw_layer, {"layer": layer, "head_fusion": head_fusion}), readout)
    index = check_start_layer(layer, len(fused), "layer")
    return readout.row(fused[index])
