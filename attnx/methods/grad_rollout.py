"""Gradient attention rollout (Gildenblat, vit-explain): rollout of gradient-weighted attention."""
from __future__ import annotations

import torch

from ..core.layer_fold import AttentionLayer, LayerFold, kept_layers, layer_index, num_layers, row_separable
from ..core.trace_types import Needs
from .options import DISCARD_RATIO, START_LAYER
from .propagation import check_start_layer, option_layer, rollout_row
from .registry import register_method
from .rollout import rollout_matrix


@row_separable
def gradient_weighted(at: AttentionLayer, *, start_layer: int = 0, **options) -> torch.Tensor | None:
    """What grad_rollout keeps of a layer: ``Ā = (mean_h(A ⊙ ∂y_t/∂A))⁺`` ``(B, N, N)`` (``None``
    below ``start_layer``)."""
    s = layer_index(start_layer, at.num_layers)
    if at.gradient is None or s is None or at.index < s:
        return None
    return (at.attention * at.gradient).mean(dim=1).clamp(min=0)


@register_method("grad_rollout", reference="Gildenblat, vit-explain", needs=Needs(attentions=True, gradients=True), options=(DISCARD_RATIO, START_LAYER),
                 first_layer=option_layer("start_layer"), fold=gradient_weighted)
def grad_rollout(trace, readout, *, discard_ratio: float = 0.0, start_layer: int = 0) -> torch.Tensor:
    """Gradient rollout: rollout of ``Ā = (mean_h(A ⊙ ∂y_t/∂A))⁺``, class-specific.

    Each layer's attention is paired with its own gradient (vit-explain pairs them in reverse
    layer order and hooks the pre-softmax scores; this implements the stated method).

    Memory: each layer is folded to its ``(B, N, N)`` map ``Ā`` as the backward reaches it
    (:func:`gradient_weighted`), then released; ``discard_ratio`` and the rollout run on those
    maps. Peak, float32 bytes, ``B`` samples, ``H`` heads, ``N`` tokens, ``L`` layers read::

        F_sdpa + 4·B·N²·L + 3·min(T, 4·B·H·N²)     (a Hugging Face model on its sdpa kernel)
        F_eager + 4·B·N²·L                          (attention written out)

    with ``F_sdpa`` the model's own forward + backward with its fused kernel (``A`` recomputed in
    the backward in tiles of ``T`` = :data:`attnx.adapters.fused_kernel.TILE_BYTES` bytes) and
    ``F_eager`` the same under the kernel that returns the probabilities (``4·B·H·N²`` per layer).
    """
    s = check_start_layer(start_layer, num_layers(trace))
    fused = kept_layers(trace, LayerFold(gradient_weighted, {"start_layer": start_layer}), readout)[s:]
    return rollout_row((rollout_matrix(f, discard_ratio, readout) for f in fused), readout)
