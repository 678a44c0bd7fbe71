"""Attention GradCAM: the GradCAM baseline of Chefer et al. (CVPR 2021) on the last attention map."""
from __future__ import annotations

import torch

from ..core.trace_types import Needs
from .options import LAYER
from .propagation import check_start_layer, option_layer
from .registry import register_method


@register_method("attn_gradcam", reference="Chefer et al., CVPR 2021 (baseline)", needs=Needs(attentions=True, gradients=True), options=(LAYER,),
                 first_layer=option_layer("layer"))
def attn_gradcam(trace, readout, *, layer: int = -1) -> torch.Tensor:
    """Attention GradCAM: ``(mean_h w_h · A_h[readout, :])⁺`` with ``w_h`` the mean of ``∂y_t/∂A_h``
    over the readout row's content columns (last layer by default).

    In a causal model the columns are those the readout row can attend to (the gradient at a
    masked, future key is not zero, but it weighs no attention).
    """
    index = check_start_layer(layer, len(trace.attentions), "layer")
    a = readout.row(trace.attentions[index])  # (B, H, N)
    g = readout.row(trace.gradients[index])  # (B, H, N)
    content = readout.visible().to(g.dtype)[:, None, :]  # (B, 1, N)
    weights = (g * content).sum(-1, keepdim=True) / content.sum(-1, keepdim=True)  # (B, H, 1)
    return (weights * a).mean(dim=1).clamp(min=0)
