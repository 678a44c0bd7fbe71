"""Attention GradCAM: the GradCAM baseline of Chefer et al. (CVPR 2021) on the last attention map."""
from __future__ import annotations

import torch

from ..core.layer_fold import AttentionLayer, LayerFold, joined_by, kept_layers, layer_index, num_layers, same_readout
from ..core.trace_types import Needs
from .options import LAYER, LIBRAGRAD
from .propagation import check_start_layer, option_layer
from .registry import register_method


def joined_readout_rows(pieces: list) -> tuple | None:
    """:func:`readout_rows` of a layer from its reads of consecutive tiles of query rows: the
    readout rows' parts summed (whole tiles joined along the rows where the readout is measured
    after the pass)."""
    if pieces[0] is None:
        return None
    a, g, used = zip(*pieces)
    if used[0] is None:
        return torch.cat(a, dim=-2), torch.cat(g, dim=-2), None
    return sum(a), sum(g), used[0]


@joined_by(joined_readout_rows)
def readout_rows(at: AttentionLayer, *, layer: int = -1) -> tuple | None:
    """What attn_gradcam keeps of the layer it reads: the readout rows of ``A`` and ``∂y_t/∂A``,
    ``(B, H, N)`` each, and the readout they were read at (the whole ``(B, H, N, N)`` maps and
    ``None`` when the readout is measured after the pass); ``None`` for the other layers."""
    if at.gradient is None or at.index != layer_index(layer, at.num_layers):
        return None
    if at.readout is None:
        return at.attention, at.gradient, None
    return at.readout.row(at.attention, at.rows), at.readout.row(at.gradient, at.rows), at.readout


@register_method("attn_gradcam", reference="Chefer et al., CVPR 2021 (baseline)", needs=Needs(attentions=True, gradients=True), options=(LAYER, LIBRAGRAD),
                 first_layer=option_layer("layer"), fold=readout_rows)
def attn_gradcam(trace, readout, *, layer: int = -1) -> torch.Tensor:
    """Attention GradCAM: ``(mean_h w_h · A_h[readout, :])⁺`` with ``w_h`` the mean of ``∂y_t/∂A_h``
    over the readout row's content columns (last layer by default).

    ``libragrad=True``: ``∂y_t/∂A`` is LibraGrad's (the authors' AttnCAM+Libra).

    In a causal model the columns are those the readout row can attend to (the gradient at a
    masked, future key is not zero, but it weighs no attention).

    Memory: the layer read is folded to its readout rows as the backward reaches it
    (:func:`readout_rows`); no layer is kept whole. Peak, float32 bytes, ``B`` samples, ``H``
    heads, ``N`` tokens::

        F_sdpa + 3·min(T, 4·B·H·N²) (on the model's sdpa kernel: A, ∂y_t/∂A and one of their
                                    products for a tile of T bytes of query rows, recomputed)
        F_eager + 8·B·H·N          (attention written out, a readout the model declares)
        F_eager + 8·B·H·N²         (a readout measured after the pass: that layer's A and ∂y_t/∂A)

    with ``F_sdpa`` the model's own forward + backward (to the layer read) with its fused kernel
    (:mod:`attnx.adapters.fused_kernel`) and ``F_eager`` the same under the attention kernel that
    returns the probabilities (``4·B·H·N²`` per layer kept by it).
    """
    index = check_start_layer(layer, num_layers(trace), "layer")
    a, g, used = kept_layers(trace, LayerFold(readout_rows, {"layer": layer}), readout)[index]
    same_readout(used, readout)
    if used is None:
        a, g = readout.row(a), readout.row(g)  # (B, H, N)
    content = readout.visible().to(g.dtype)[:, None, :]  # (B, 1, N)
    weights = (g * content).sum(-1, keepdim=True) / content.sum(-1, keepdim=True)  # (B, H, 1)
    return (weights * a).mean(dim=1).clamp(min=0)
