"""Generic attention explainability (Chefer, Gur & Wolf, ICCV 2021), self-attention rule."""
from __future__ import annotations

import torch

from ..core.layer_fold import AttentionLayer, LayerFold, kept_layers, layer_index, num_layers, row_separable
from ..core.trace_types import Needs
from .options import LIBRAGRAD, START_LAYER
from .propagation import check_start_layer, option_layer, rollout_row
from .registry import register_method


@row_separable
def generic_layer(at: AttentionLayer, *, start_layer: int = 0) -> torch.Tensor | None:
    """What generic keeps of a layer: ``Ā = E_h[(∇A ⊙ A)⁺]`` ``(B, N, N)`` (``None`` below ``start_layer``)."""
    s = layer_index(start_layer, at.num_layers)
    if at.gradient is None or s is None or at.index < s:
        return None
    return (at.gradient * at.attention).clamp_(min=0).mean(dim=1)


@register_method(
    "generic", reference="Chefer, Gur & Wolf, ICCV 2021", needs=Needs(attentions=True, gradients=True), options=(START_LAYER, LIBRAGRAD),
    first_layer=option_layer("start_layer"), fold=generic_layer,
)
def generic(trace, readout, *, start_layer: int = 0) -> torch.Tensor:
    """Chefer et al. ICCV'21, Eq. 5-6: ``R ← R + E_h[(∇A ⊙ A)⁺] R`` from ``R = I``, readout row.

    Equivalent to the readout row of ``(I + Ā_L) ... (I + Ā_s)``; no normalisation. The layers
    before ``start_layer`` are skipped, as the authors' CLIP notebook does (its ``start_layer = 11``
    of 12, the last layer only, is ``start_layer=-1``); the default uses every layer.
    ``libragrad=True``: ``∇A`` is LibraGrad's (GenAtt+Libra).

    Memory: each layer is folded to its ``(B, N, N)`` map ``Ā`` as the backward reaches it
    (:func:`generic_layer`), then released. Peak, float32 bytes, ``B`` samples, ``H`` heads,
    ``N`` tokens, ``L`` layers read (from ``start_layer``)::

        F_sdpa + 4·B·N²·L + 3·min(T, 4·B·H·N²)     (a Hugging Face model on its sdpa kernel)
        F_eager + 4·B·N²·L                          (attention written out)

    with ``F_sdpa`` the model's own forward + backward with its fused kernel (whose backward
    recomputes ``A`` in tiles of query rows of ``T`` = :data:`attnx.adapters.fused_kernel.TILE_BYTES`
    bytes: :mod:`attnx.adapters.fused_kernel`) and ``F_eager`` the same under the attention
    kernel that returns the probabilities (it keeps them: ``4·B·H·N²`` per layer).
    """
    s = check_start_layer(start_layer, num_layers(trace))
    fused = kept_layers(trace, LayerFold(generic_layer, {"start_layer": start_layer}), readout)[s:]
    eye = torch.eye(fused[0].shape[-1], dtype=fused[0].dtype, device=fused[0].device)
    return rollout_row((m + eye for m in fused), readout)
