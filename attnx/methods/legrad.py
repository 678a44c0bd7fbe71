"""LeGrad (Bousselham et al. 2024): the positive gradient of each layer's score at its attention, averaged over layers.

The paper (arXiv:2404.03214, Eq. 4-6): for layer ``l`` with attention ``A^l`` ``(H, N, N)`` and
``s^l`` the score read from layer ``l``'s output tokens through the model's final norm and head,

    E^l = (1 / (H N)) Σ_h Σ_i ReLU(∂s^l / ∂A^l_{h,i,:})      (heads and query rows averaged)
    E   = (1 / |L|) Σ_{l ∈ L} E^l                           (layers averaged)

the relevance of key token ``j`` being ``E_j``. The authors' code (WalBouss/LeGrad,
``legrad/wrapper.py``, ``compute_legrad_clip``) computes ``E^l`` in the same way (ReLU of the
gradient, mean over heads, mean over every query row, class-token column dropped), sums the
layers from ``layer_index`` (``-2`` by default: the last two) and min-max normalises the result.

What attnx computes:

* **Per-layer readouts.** ``s^l`` is the explained target read from layer ``l``'s output tokens by
  the model's own final norm, pooling and head (the adapter's
  :meth:`~attnx.adapters.base.Adapter.layer_readout`: a ViT's norm and class-token, pooled or
  distilled head; BERT's pooler and classifier; a decoder's final norm and output layer at the
  explained position; a dual encoder tower's final norm, pooled token and projection, the target
  being the similarity to the other tower's embedding), and ``∂s^l/∂A^l`` is taken at ``A^l``
  only, by a short backward from that readout through layer ``l``'s block
  (:mod:`attnx.core.layer_readout`). A class target is the model's explained class at every layer
  (not each layer's own argmax). At the last layer ``s^L = y_t``; the pass checks that the
  adapter's readout of the last layer is the model's output.
* **Layers.** ``start_layer`` (negative counts from the end) is the first layer averaged: by
  default the authors' ``-2``, the last two layers (the only layer of a one-layer model); ``0``
  every layer; ``-1`` the last layer only, which needs no per-layer readout (any adapter, the
  ``intercept`` one without a family adapter included).
  Families whose head attnx cannot apply to an intermediate layer refuse ``start_layer`` below
  ``-1`` with :class:`~attnx.errors.UnsupportedModelError`.
* **The authors' CLIP readout.** Their OpenCLIP code reads a layer as ``ln_post(mean of all its
  tokens, class token included) @ proj``, which is not the model's embedding (it pools the class
  token, or the patch mean). ``pooling="model"`` (default) reads the model's own output;
  ``pooling="mean"`` reproduces theirs (OpenCLIP, Hugging Face CLIP and timm ViT image towers;
  for timm, the readout of the batched variant of their code, Shaun-Z/LeGrad: ``norm(mean of all
  tokens)``, a headless model's embedding).
* **Masks.** Query rows of padding tokens are left out of the mean and, in a causal model, the
  pairs ``key > query`` (attention the query cannot give) carry no gradient; the authors' vision
  models have neither.
* **Normalisation.** The layers are averaged, not summed, and not min-max normalised (attnx's heat
  maps normalise for display): both only rescale the map.
"""
from __future__ import annotations

import torch

from ..core.layer_fold import AttentionLayer, LayerFold, kept_layers, layer_index, num_layers, row_separable
from ..core.layer_readout import POOLINGS
from ..core.trace import Needs
from .propagation import check_start_layer
from .registry import Option, register_method

__all__ = ["legrad", "legrad_layer", "legrad_of_positive", "positive_gradient"]


def legrad_layer(gradient: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``E^l`` ``(B, N)``: ``ReLU(∂s^l/∂A^l)`` averaged over the heads and the real query rows.

    Parameters
    ----------
    gradient:
        ``∂s^l/∂A^l`` ``(B, H, N, N)``.
    pairs:
        ``(B, N, N)`` bool mask of the (query, key) pairs that may attend (real tokens; ``key <=
        query`` in a causal model); the others are left out.
    """
    return legrad_of_positive(gradient.clamp(min=0).mean(dim=1), pairs)


def legrad_of_positive(positive: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """:func:`legrad_layer` from ``mean_h ReLU(∂s^l/∂A^l)`` ``(B, N, N)`` (what :func:`positive_gradient` keeps)."""
    positive = positive * pairs.to(positive.dtype)  # (B, N, N)
    queries = pairs.any(dim=-1).sum(dim=-1, keepdim=True).clamp(min=1).to(positive.dtype)  # (B, 1)
    return positive.sum(dim=1) / queries


def first_averaged(start_layer: int | None, num_layers: int) -> int | None:
    """The first layer averaged: ``start_layer`` as an index (``None`` when out of range), the
    authors' default for ``None``: the last two layers (the only one of a one-layer model)."""
    if start_layer is None:
        return max(num_layers - 2, 0)
    return layer_index(start_layer, num_layers)


def first_layer(options: dict, layout, num_layers: int) -> int:
    """The lowest layer LeGrad reads: the backward passes stop there."""
    first = first_averaged(options["start_layer"], num_layers)
    return 0 if first is None else first


@row_separable
def positive_gradient(at: AttentionLayer, start_layer: int | None = None, pooling: str = "model") -> torch.Tensor | None:
    """What LeGrad keeps of a layer it averages: ``mean_h ReLU(∂s^l/∂A^l)`` ``(B, N, N)``; ``None`` below ``start_layer``."""
    first = first_averaged(start_layer, at.num_layers)
    if at.gradient is None or first is None or at.index < first:
        return None
    return at.gradient.clamp(min=0).mean(dim=1)


START_LAYER = Option(
    "start_layer", None,
    "first layer averaged (negative counts from the end; default: the authors' -2, the last two layers), "
    "0 every layer, -1 the last layer only", kind=int, allow_none=True,
)
POOLING = Option(
    "pooling", "model",
    "how each layer's readout pools its tokens: the model's own, or 'mean' of every token (the authors' CLIP readout)",
    kind=str, choices=POOLINGS,
)


@register_method(
    "legrad",
    reference="Bousselham et al., arXiv:2404.03214, 2024 (exact: written-out formula, the authors' code on OpenCLIP)",
    needs=Needs(attentions=True, gradients=True, layer_readouts=True),
    options=(START_LAYER, POOLING),
    first_layer=first_layer,
    fold=positive_gradient,
    layer_pooling=lambda options: options["pooling"],
)
def legrad(trace, readout, *, start_layer: int | None = None, pooling: str = "model") -> torch.Tensor:
    """LeGrad: ``mean_{l ≥ start_layer} mean_{h,i} ReLU(∂s^l/∂A^l_{h,i,:})``, ``s^l`` layer ``l``'s own readout.

    Bousselham et al. 2024, Eq. 4-6: each layer's score ``s^l`` is the target read from that
    layer's tokens through the model's final norm, pooling and head, differentiated at that
    layer's attention only; heads and real query rows are averaged, then the layers from
    ``start_layer`` on (see :mod:`attnx.methods.legrad`).

    Memory: the forward keeps its graph; then, from the top layer down, a short backward from
    layer ``l``'s readout through its block to ``A^l`` gives ``∂s^l/∂A^l``, folded at once to
    ``mean_h ReLU(∂s^l/∂A^l)`` ``(B, N, N)`` and released with the layer's tokens
    (:func:`attnx.core.layer_readout.layer_gradients`). Peak, float32 bytes, ``B`` samples, ``H``
    heads, ``N`` tokens, ``L'`` layers averaged::

        F_sdpa + 4·B·N²·L' + 3·min(T, 4·B·H·N²)     (the model's sdpa kernel kept)
        F_eager + 4·B·N²·L' + 4·B·H·N²              (attention written out)

    with ``F_sdpa`` the model's own forward with its fused kernel, whose call's backward recomputes
    ``A^l`` in query-row tiles of ``T`` bytes (:mod:`attnx.adapters.fused_kernel`), and ``F_eager``
    the same under the attention kernel that returns the probabilities (``4·B·H·N²`` per layer
    kept by it); each plus one layer's backward (its head and block) at a time. A model whose
    per-layer readout runs its whole forward again (:func:`attnx.core.layer_readout.rerun_readout`)
    is explained written out. ``start_layer=-1`` is one backward of ``y_t`` to the last layer
    (``L' = 1``).
    """
    n = num_layers(trace)
    first = first_averaged(None, n) if start_layer is None else check_start_layer(start_layer, n)
    kept = kept_layers(trace, LayerFold(positive_gradient, {"start_layer": start_layer, "pooling": pooling}), readout)
    pairs = readout.pairs()
    total = None
    for positive in kept[first:]:
        layer = legrad_of_positive(positive, pairs.to(positive.device))
        total = layer if total is None else total + layer
    return total / (n - first)
