"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020)."""
from __future__ import annotations

from typing import Any

import torch

from ..core.layer_fold import AttentionLayer, LayerFold, heads_fused, kept_layers, row_separable
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


@heads_fused
@row_separable
def fused_layer(at: AttentionLayer, *, head_fusion: str = "mean", **_: Any) -> torch.Tensor:
    """What rollout and raw attention keep of a layer: its heads fused, ``(B, N, N)``."""
    return fuse_heads(at.attention, head_fusion)


@register_method(
    "rollout", reference="Abnar & Zuidema, ACL 2020", needs=Needs(attentions=True),
    options=(HEAD_FUSION, DISCARD_RATIO, START_LAYER), fold=fused_layer,
)
def rollout(
    trace, readout, *, head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0
) -> torch.Tensor:
    """Attention rollout: ``C = Â_L ... Â_s`` with ``Â = rownorm((fuse_h(A) + I) / 2)``, readout row.

    Options: ``head_fusion`` (mean | max | min), ``discard_ratio`` (zero that fraction of the
    smallest fused attentions per layer, never in the readout row), ``start_layer``.

    Memory: each layer is folded to its fused ``(B, N, N)`` map as the forward makes it
    (:func:`fused_layer`). Peak, float32 bytes, ``B`` samples, ``H`` heads, ``N`` tokens, ``L``
    layers::

        F_sdpa + 4·B·N²·L + 2·min(T, 4·B·H·N²)     (the model's sdpa kernel kept)
        F_eager + 4·B·H·N²·L                        (attention written out: every map kept)

    with ``F`` the model's forward without gradients and ``T`` the tile of
    :data:`attnx.adapters.fused_kernel.TILE_BYTES` bytes in which the forward computes ``A``.
    """
    fused = kept_layers(trace, LayerFold(fused_layer, {"head_fusion": head_fusion}), readout)
    s = check_start_layer(start_layer, len(fused))
    return rollout_row((rollout_matrix(m, discard_ratio, readout) for m in fused[s:]), readout)
