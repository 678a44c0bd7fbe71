"""AttCAT (Qiang et al., "AttCAT: Explaining Transformers via Attentive Class Activation Tokens",
NeurIPS 2022): each layer's tokens times their gradient, weighed by the attention they receive.

For block ``l`` reading the tokens ``h^l`` ``(N, D)`` with attention ``A^l`` ``(H, N, N)``, and the
explained scalar ``y_t``,

    CAT^l_j    = Σ_d h^l_{j,d} · ∂y_t/∂h^l_{j,d}          (the class activation token, Grad×Input of token j)
    α^l_j      = (1 / (H N)) Σ_h Σ_i A^l_{h,i,j}          (the attention token j receives, heads and queries averaged)
    AttCAT_j   = Σ_l α^l_j · CAT^l_j                      (summed over the layers)

``h^l`` is the input of block ``l`` (the embeddings for the first, the previous block's output
otherwise), as in the authors' code (qiangyao1988/AttCAT, ``BERT_explainability/modules/BERT/
ExplanationGenerator.py``, ``generate_TransCAM``): it pairs ``hidden_states[l]`` of a Hugging Face
BERT (``output_hidden_states``) with block ``l``'s attention, takes the gradient of the target logit
at each ``hidden_states[l]``, averages the attention over the heads then over the query rows, and
sums the layers. The relevance is signed (no ReLU, no normalisation).

What attnx adds, and where it differs:

* **Masks.** The query mean runs over the real rows (padding rows left out), so a sample gives the
  same map alone and in a padded batch; the authors explain one unpadded sentence at a time.
* **Every model kind.** The authors' code reads a BERT; attnx reads the blocks every adapter names
  (:meth:`attnx.adapters.base.Adapter.block_inputs`): ViTs, BERT-family encoders, decoders and the
  CLIP towers. Swin (windowed stages) and models explained through ``intercept`` are refused.

Exactness: the test re-runs the authors' procedure on a stock Hugging Face BERT (its own
``output_hidden_states`` and ``output_attentions``, gradients by ``retain_grad``) and a hand-run timm
ViT in float64 (a written-out formula; the authors' code needs their modified BERT and cannot run
here): attnx matches to ≤ 1e-8.
"""
from __future__ import annotations

import torch

from ..core.trace_types import Needs
from .options import LIBRAGRAD
from .registry import register_method

__all__ = ["attcat", "attcat_layer"]


def attcat_layer(tokens: torch.Tensor, gradient: torch.Tensor, attention: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``α^l ⊙ CAT^l`` ``(B, N)`` of one block.

    Parameters
    ----------
    tokens, gradient:
        ``h^l`` and ``∂y_t/∂h^l`` ``(B, N, D)``.
    attention:
        ``A^l`` ``(B, H, N, N)``.
    rows:
        ``(B, N)`` bool, the real query rows the attention is averaged over.
    """
    cat = (tokens * gradient).sum(dim=-1)
    weight = rows.to(attention.dtype)
    received = (attention.mean(dim=1) * weight[:, :, None]).sum(dim=1) / weight.sum(dim=1, keepdim=True).clamp(min=1)
    return received * cat


@register_method(
    "attcat",
    reference="Qiang et al., NeurIPS 2022 (exact: written-out formula)",
    needs=Needs(attentions=True, hidden_states=True),
    options=(LIBRAGRAD,),
)
def attcat(trace, readout) -> torch.Tensor:
    """AttCAT (Qiang et al. NeurIPS'22): each block's input tokens times their gradient (Grad×Input
    per token), weighed by the attention each token receives (heads and queries averaged), summed
    over the blocks.

    ``libragrad=True``: ``∂y_t/∂h^l`` is LibraGrad's (the authors' AttCAT+Libra)."""
    rows = readout.pairs().any(dim=-1).to(trace.attentions[0].device)
    layers = zip(trace.hidden_states, trace.hidden_gradients, trace.attentions)
    return sum(attcat_layer(h, g, a, rows) for h, g, a in layers)
