"""LeGrad (Bousselham et al. 2024): the positive gradient of the target at the attention map.

The paper (arXiv:2404.03214, Eq. 4-6): for layer ``l`` with attention ``A^l`` ``(H, N, N)`` and
``s^l`` the score read from layer ``l``'s tokens through the model's final norm and head,

    E^l = (1 / (H N)) Σ_h Σ_i ReLU(∂s^l / ∂A^l_{h,i,:})      (heads and query rows averaged)
    E   = (1 / |L|) Σ_{l ∈ L} E^l                           (layers averaged)

the relevance of key token ``j`` being ``E_j``. The authors' code (WalBouss/LeGrad,
``legrad/wrapper.py``, ``compute_legrad_clip``) computes ``E^l`` in the same way (ReLU of the
gradient, mean over heads, mean over every query row, class-token column dropped), sums the
layers from ``layer_index`` (``-2`` by default: the last two) and min-max normalises the result.

What attnx computes, and why only the last layer:

* **The last layer only.** ``s^l`` reads layer ``l`` through the head, and its gradient is taken
  at ``A^l`` alone. The trace records ``∂y_t/∂A^l`` of the model's own target, which for ``l``
  below the last layer flows through every layer above ``l``: a different map (on the embedded
  vision model the two differ by 170 % of the map's maximum, and the model-target version falls
  to chance localisation), so it is not offered under LeGrad's name. At the last layer the head
  reads the layer's own tokens, ``s^L = y_t`` and ``E^L`` is the paper's map exactly, for every
  head (class token, pooled patches, distilled pairs, a decoder's last token, a dual encoder's
  embedding). The layer average needs per-layer readouts that the trace does not record yet.
* **The authors' CLIP readout.** Their OpenCLIP code reads a layer as ``ln_post(mean of all its
  tokens, class token included) @ proj``, which is not the model's embedding (it reads the class
  token); attnx reads the model's own output.
* **Masks.** Query rows of padding tokens are left out of the mean and, in a causal model, the
  pairs ``key > query`` (attention the query cannot give) carry no gradient; the authors' vision
  models have neither.
* **Normalisation.** No min-max (attnx's heat maps normalise for display): it only rescales.
"""
from __future__ import annotations

import torch

from ..core.layer_fold import AttentionLayer, LayerFold, kept_layers
from ..core.trace import Needs
from .registry import register_method

__all__ = ["legrad", "legrad_layer", "legrad_of_positive", "positive_gradient"]


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
    return legrad_of_positive(gradient.clamp(min=0).mean(dim=1), pairs)


def legrad_of_positive(positive: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """:func:`legrad_layer` from ``mean_h ReLU(∂s/∂A^l)`` ``(B, N, N)`` (what :func:`positive_gradient` keeps)."""
    positive = positive * pairs.to(positive.dtype)  # (B, N, N)
    queries = pairs.any(dim=-1).sum(dim=-1, keepdim=True).clamp(min=1).to(positive.dtype)  # (B, 1)
    return positive.sum(dim=1) / queries


def positive_gradient(at: AttentionLayer, **options) -> torch.Tensor | None:
    """What LeGrad keeps of the last layer: ``mean_h ReLU(∂y_t/∂A^L)`` ``(B, N, N)``; ``None`` elsewhere."""
    if at.gradient is None or at.index != at.num_layers - 1:
        return None
    return at.gradient.clamp(min=0).mean(dim=1)


def last_layer(options: dict, layout, num_layers: int) -> int:
    """The only layer LeGrad reads: the backward passes stop there."""
    return num_layers - 1


@register_method(
    "legrad",
    reference="Bousselham et al., arXiv:2404.03214, 2024 (last layer; exact: written-out formula)",
    needs=Needs(attentions=True, gradients=True),
    options=(),
    first_layer=last_layer,
    fold=positive_gradient,
)
def legrad(trace, readout) -> torch.Tensor:
    """LeGrad at the last layer: ``mean_{h,i} ReLU(∂y_t/∂A^L_{h,i,:})``, heads and real query rows averaged.

    Bousselham et al. 2024, Eq. 4-5 at the last layer, where the paper's per-layer score is the
    model's target ``y_t``; the average over lower layers (Eq. 6) needs per-layer readouts the
    trace does not record (see :mod:`attnx.methods.legrad`).

    Memory: the last layer is folded to ``mean_h ReLU(∂y_t/∂A^L)`` ``(B, N, N)`` as the backward
    reaches it (:func:`positive_gradient`). Peak, float32 bytes, ``B`` samples, ``N`` tokens::

        F_eager + 4·B·N²

    with ``F_eager`` the model's own forward + backward to the last layer's attention under the
    attention kernel that returns the probabilities (``4·B·H·N²`` per layer kept by it).
    """
    positive = kept_layers(trace, LayerFold(positive_gradient), readout)[-1]
    return legrad_of_positive(positive, readout.pairs().to(positive.device))
