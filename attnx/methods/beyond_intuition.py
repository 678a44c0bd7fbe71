"""Beyond Intuition (Chen et al., "Beyond Intuition: Rethinking Token Attributions inside
Transformers", CVPR 2023): attention weighted per head, propagated with the residual, times the
last layer's integrated attention gradient.

BT-H (head-wise), for the layers ``l ≥ s`` with attention ``A^l_h`` and gradient ``G^l_h = ∂y_t/∂A^l_h``:

    I^l_h = Σ_{i,j} |(A^lᵀ_h G^l_h)_{ij}|,   Ĩ^l_h = I^l_h / Σ_h' I^l_h'     (each head's weight)
    Ā^l   = Σ_h Ĩ^l_h A^l_h
    R^s   = I + Ā^s,   R^l = R^{l-1} + Ā^l R^{l-1}                         (the residual kept)
    W     = (1/H) Σ_h ReLU( (1/S) Σ_{α ∈ linspace(0, 1, S)} ∂y_t/∂A^L_h (α x) )   (S = 20)
    BT-H  = (W ⊙ R^L)[readout row]

The authors' code (jiaminchen-1031/transformerinterp, ``ViT/baselines/ViT/ViT_explanation_generator.py``
``generate_ours`` and ``BERT/.../ExplanationGenerator.py`` ``generate_ours``) computes exactly these
steps: the head weights from ``mean |camᵀ grad|`` normalised over the heads (the mean's ``1/N²``
cancels in the normalisation), ``R = R + cam R`` from block ``start_layer - 1 = 3`` of a ViT and on
the last block only of a BERT, the input scaled by ``α`` over 20 steps for ``W`` (gradients averaged,
then clamped, then averaged over heads), and the class-token row; for BERT the class token's own
entry set to 0.

BT-T (token-wise) replaces the head weights by each token's value norm relative to its input,
for the block input ``z^l_j`` and the values through the output projection ``W_O v^l_j``:

    m^l_j = ‖W_O v^l_j‖ / ‖z^l_j‖,   R^l = R^{l-1} + (mean_h A^l_h) diag(m^l) R^{l-1}
    BT-T  = (W ⊙ R^L)[readout row]

as the authors' ``generate_ours_c`` (their ViT: from block ``start_layer - 1 = 5``; their BERT: the
last four blocks; ``W`` as for BT-H; ``vproj = v @ proj.weightᵀ``, no bias).

What attnx does, and where it differs:

* **Defaults.** ``start_layer=None`` is the authors': BT-H from block 3 for images (their ViT-B's
  default; the last block of a shallower model) and the last block for text; BT-T from block 5 for
  images and the last four blocks for text.
* **Model kinds.** BT-H reads attentions and gradients: every model kind. BT-T needs each block's
  value and output projections, which the adapters name for timm ViTs with a fused ``qkv`` and the
  Hugging Face encoders, decoders and CLIP towers with separate value projections (``value`` /
  ``v_proj`` / ``v_lin``), ``nn.MultiheadAttention`` (torchvision, OpenCLIP) and OpenCLIP's own
  ``Attention``; GPT-2's fused ``c_attn``, OpenCLIP attention with head scaling or an inner norm,
  and Swin are refused.
* **Scaling a text model's input.** The authors' BERT takes an ``alpha`` argument whose code is not
  public in their repository; attnx scales the output of the token embedding (the position
  embeddings are not scaled). Images: the pixels, as the authors.
* **Batches and masks.** The authors normalise the head weights over the batch and the heads
  together (they explain one sample at a time); attnx normalises per sample, and leaves out the
  (query, key) pairs that cannot attend (padding; ``key > query`` in a causal model), so a sample
  gives the same map alone and in a padded batch. The readout row is the head's (class token,
  patch mean, last token).

Exactness: a written-out formula in the test on a hand-run timm ViT and a Hugging Face BERT in
float64 (≤ 1e-8): the authors' code hard-codes ``.cuda()`` and their modified models, and cannot
run here.
"""
from __future__ import annotations

import torch

from ..core.layout import Readout
from ..core.trace_types import Needs
from .propagation import check_start_layer
from .registry import Option, Relevance, register_method

__all__ = ["bt_h", "bt_t", "head_weights", "integrated_weight", "token_weights"]

#: the steps of the integrated gradient of the last attention map (the authors' ``steps=20``)
PATH_STEPS = 20


def head_weights(attention: torch.Tensor, gradient: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``Ĩ_h`` ``(B, H)``: ``Σ_ij |(A_hᵀ G_h)_ij|`` over the pairs that may attend, normalised over the heads."""
    mask = pairs[:, None].to(attention.dtype)
    importance = ((attention * mask).transpose(-1, -2) @ (gradient * mask)).abs().sum(dim=(-1, -2))
    return importance / importance.sum(dim=1, keepdim=True).clamp_min(torch.finfo(importance.dtype).tiny)


def token_weights(value_outputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``m_j = ‖W_O v_j‖ / ‖z_j‖`` ``(B, N)``."""
    norm = tokens.norm(dim=-1)
    return value_outputs.norm(dim=-1) / norm.clamp_min(torch.finfo(norm.dtype).tiny)


def integrated_weight(path_gradient: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``W`` ``(B, N, N)``: the integrated last-layer gradient, clamped at 0 and averaged over the heads."""
    return path_gradient.clamp(min=0).mean(dim=1) * pairs.to(path_gradient.dtype)


def propagate(matrices, like: torch.Tensor) -> torch.Tensor:
    """``R = R + M R`` over ``matrices`` from ``R = I``: ``(B, N, N)``."""
    B, N = like.shape[0], like.shape[-1]
    R = torch.eye(N, dtype=like.dtype, device=like.device).expand(B, N, N)
    for m in matrices:
        R = R + m @ R
    return R


def default_start(layout, num_layers: int, images: int) -> int:
    """The authors' first block: ``images`` for an image model (clipped to the last), the last for text."""
    return min(images, num_layers - 1) if layout.grid is not None else num_layers - 1


def bt_h_start(options: dict, layout, num_layers: int) -> int:
    start = options["start_layer"]
    return default_start(layout, num_layers, 3) if start is None else start


def finish(R: torch.Tensor, trace, readout: Readout, pairs: torch.Tensor) -> torch.Tensor:
    """``(W ⊙ R)`` at the readout row; for text the readout token's own entry is 0 (the authors' BERT)."""
    row = readout.row(integrated_weight(trace.path_gradient, pairs) * R)
    if readout.layout.grid is None:
        row = row.masked_fill(readout.protected.to(row.device), 0)
    return row


START_LAYER = Option("start_layer", None, "first block of the propagation (default: the authors', per model kind)",
                     kind=int, allow_none=True)


@register_method(
    "bt_h",
    reference="Chen et al., CVPR 2023 (Beyond Intuition, head-wise; exact: written-out formula)",
    needs=Needs(attentions=True, gradients=True, path_steps=PATH_STEPS),
    options=(START_LAYER,),
    first_layer=bt_h_start,
)
def bt_h(trace, readout, *, start_layer: int | None = None) -> Relevance:
    """Beyond Intuition, head-wise (BT-H): each head weighed by ``|Aᵀ ∂y/∂A|``, propagated with the
    residual (``R ← R + Ā R``), times the last layer's attention gradient integrated over 20 scaled inputs."""
    num_layers = len(trace.attentions)
    start = check_start_layer(bt_h_start({"start_layer": start_layer}, readout.layout, num_layers), num_layers)
    pairs = readout.pairs().to(trace.attentions[0].device)
    fused = (
        (head_weights(a, g, pairs)[:, :, None, None] * a).sum(dim=1)
        for a, g in zip(trace.attentions[start:], trace.gradients[start:])
    )
    R = propagate(fused, trace.attentions[-1])
    return Relevance(tokens=finish(R, trace, readout, pairs), options={"start_layer": start})


def bt_t_start(options: dict, layout, num_layers: int) -> int:
    start = options["start_layer"]
    if start is not None:
        return start
    return min(5, num_layers - 1) if layout.grid is not None else max(num_layers - 4, 0)


@register_method(
    "bt_t",
    reference="Chen et al., CVPR 2023 (Beyond Intuition, token-wise; exact: written-out formula)",
    needs=Needs(attentions=True, hidden_states=True, value_outputs=True, path_steps=PATH_STEPS),
    options=(START_LAYER,),
    first_layer=bt_t_start,
)
def bt_t(trace, readout, *, start_layer: int | None = None) -> Relevance:
    """Beyond Intuition, token-wise (BT-T): head-averaged attention with each key token weighed by
    ``‖W_O v_j‖ / ‖z_j‖``, propagated with the residual, times the last layer's integrated attention gradient."""
    num_layers = len(trace.attentions)
    start = check_start_layer(bt_t_start({"start_layer": start_layer}, readout.layout, num_layers), num_layers)
    pairs = readout.pairs().to(trace.attentions[0].device)
    layers = zip(trace.attentions[start:], trace.value_outputs[start:], trace.hidden_states[start:])
    weighted = (a.mean(dim=1) * token_weights(v, z)[:, None, :] for a, v, z in layers)
    R = propagate(weighted, trace.attentions[-1])
    return Relevance(tokens=finish(R, trace, readout, pairs), options={"start_layer": start})
