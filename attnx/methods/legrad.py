"""LeGrad (Bousselham et al. 2024): the positive gradients of the target at every attention map.

The paper (arXiv:2404.03214, Eq. 4-6): for layer ``l`` with attention ``A^l`` ``(H, N, N)``,

    E^l = (1 / (H N)) Σ_h Σ_i ReLU(∂s / ∂A^l_{h,i,:})        (heads and query rows averaged)
    E   = (1 / |L|) Σ_{l ∈ L} E^l                           (layers averaged)

the relevance of key token ``j`` being ``E_j``. The authors' code (WalBouss/LeGrad,
``legrad/wrapper.py``, ``compute_legrad_clip``) computes ``E^l`` in the same way (ReLU of the
gradient, mean over heads, mean over every query row, class-token column dropped), sums the
layers from ``layer_index`` (``-2`` by default: the last two) and min-max normalises the result.

Where attnx differs from the authors' code (named, not hidden):

* **The scalar ``s``.** The paper reads each layer ``l`` through the model's final norm and head
  and takes the gradient of that per-layer score at ``A^l`` only; the authors' OpenCLIP code reads
  layer ``l`` as ``ln_post(mean of all its tokens, class token included) @ proj``, which is not
  the model's own image embedding (it reads the class token) even at the last layer. attnx's
  trace holds ``∂y_t/∂A^l`` of the model's own target ``y_t``, so every layer's gradient here
  flows through the layers above it. For a head that reads the last layer's class token, the
  paper's last-layer score is ``y_t`` itself: ``start_layer=-1`` is the paper's last-layer map
  (tested); below the last layer the two differ.
* **Masks.** Query rows of padding tokens are left out of the mean and, in a causal model, the
  pairs ``key > query`` (attention the query cannot give) carry no gradient; the authors' vision
  models have neither.
* **Normalisation.** Layers are averaged (the paper) rather than summed (the code), and the
  result is not min-max normalised (attnx's heat maps normalise for display): both only rescale.
"""
from __future__ import annotations

import torch

from ..core.trace import Needs
from .options import START_LAYER
from .propagation import check_start_layer, option_layer
from .registry import register_method

__all__ = ["legrad", "legrad_layer"]


def legrad_layer(gradient: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``E^l`` ``(B, N)``: ``ReLU(∂s/∂A^l)`` averaged over the heads and the real query rows.

    Parameters
    ----------
    gradient:
        ``∂s/∂A^l`` ``(B, H, N, N)``.
    pairs:
        ``(B, N, N)`` bool mask of the (query, key) pairs that may attend (real tokens; ``key <=
        query`` in a causal model); the others are left out.
    """
    positive = gradient.clamp(min=0).mean(dim=1) * pairs.to(gradient.dtype)  # (B, N, N)
    queries = pairs.any(dim=-1).sum(dim=-1, keepdim=True).clamp(min=1).to(gradient.dtype)  # (B, 1)
    return positive.sum(dim=1) / queries


@register_method(
    "legrad",
    reference="Bousselham et al., arXiv:2404.03214, 2024 (exact: written-out formula)",
    needs=Needs(attentions=True, gradients=True),
    options=(START_LAYER.with_default(0),),
    first_layer=option_layer("start_layer"),
)
def legrad(trace, readout, *, start_layer: int = 0) -> torch.Tensor:
    """LeGrad: ``mean_l mean_{h,i} ReLU(∂y_t/∂A^l_{h,i,:})`` over the layers from ``start_layer``.

    The positive gradient of the target at each attention map, averaged over the heads and the
    query rows, then over the layers (Bousselham et al. 2024, Eq. 4-6). The gradient is the
    model target's at every layer (the authors read each layer through the head instead; the two
    agree at the last layer, ``start_layer=-1``); see :mod:`attnx.methods.legrad`.
    """
    s = check_start_layer(start_layer, len(trace.attentions))
    pairs = readout.pairs().to(trace.gradients[s].device)
    maps = [legrad_layer(g, pairs) for g in trace.gradients[s:]]
    return torch.stack(maps).mean(dim=0)
