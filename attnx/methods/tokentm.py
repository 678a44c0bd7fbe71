"""TokenTM (Wu, Duan, Kang, Tang & Yan, "Token Transformation Matters: Towards Faithful Post-hoc
Explanation for Vision Transformer", CVPR 2024, arXiv:2403.14552): the attention maps weighed by
how much every token is transformed (its length and its direction), aggregated over every layer
from the lengths of the input tokens.

A transformation ``T`` maps each token ``E_j`` ``(D,)`` to ``Ẽ_j = T(E_j)``. Its effect on token ``j``
is measured by the change of length and the direction kept, the latter normalised over the
sequence's ``N`` tokens (the Normalised Embedding Cosine Correlation, NECC):

    L(x)        = ‖x‖₂
    NECC_j      = exp(cos(E_j, Ẽ_j)) / Σ_k exp(cos(E_k, Ẽ_k))
    w_j         = L(Ẽ_j) / L(E_j) · NECC_j,          W = diag(w_1 .. w_N)        (transformation weights)

Each block ``l`` transforms the tokens twice. The attention sublayer maps the block input
``E = h^l`` to the values through the output projection ``Ẽ_j = W_O v_j`` and mixes them with
``A^l``; the feed-forward sublayer maps the residual stream it reads ``E'`` to what it adds ``Ẽ'``.
With the gradient-weighted attention ``Ā^l = E_h[(∇A^l_h ⊙ A^l_h)⁺]`` (``∇A = ∂y_t/∂A``, the
heads' mean of the positive part), and the residual connections as the identity:

    U^l_attn = I + Ā^l W^l_attn                    (= I + E_h[(∇A^l_h ⊙ A^l_h W^l_attn)⁺], W ≥ 0)
    U^l_mlp  = I + W^l_mlp
    C^0      = diag(L(E^0_1) .. L(E^0_N))          (initialisation: the input tokens' lengths)
    C^l      = U^l_mlp U^l_attn C^{l-1},   l = 1 .. L
    TokenTM  = C^L[readout row]

The relevance is non-negative; the readout row is the head's (class token, the patch mean of a
pooled head, both readout tokens of a distilled DeiT, the last real token of a decoder).

What attnx does, and where it stands:

* **Exactness.** No code of the authors could be found; the test
  (``tests/test_methods_tokentm.py``) writes the equations above out per sample and per layer on
  plain tensors (a hand-run timm ViT, a Hugging Face BERT's and decoders' own outputs) in float64:
  attnx matches to ≤ 1e-8.
* **Options.** ``init="length"`` is the paper's initialisation ``C^0 = diag(L(E^0))``;
  ``init="identity"`` starts from ``C^0 = I`` (the rollout family's start, for comparison).
* **Masks.** NECC's normalisation runs over the real tokens (padding left out), so a sample gives
  the same map alone and in a padded batch; pairs that cannot attend carry ``A = 0``.
* **Model kinds.** The paper explains ViTs; attnx reads every model whose adapter names the blocks,
  their value and output projections and their feed-forward sublayers (timm, torchvision and
  Hugging Face ViTs, BERT-family encoders, Llama-family decoders, CLIP towers). GPT-2's fused
  ``c_attn`` (no value projection to read), Swin and models of no known family are refused in one
  line. In a post-norm block (BERT) ``E'`` is the attention sublayer's normalised output and the
  norms are left out of ``W`` as in a pre-norm one.
"""
from __future__ import annotations

import torch

from ..core.trace_types import Needs
from .registry import Option, register_method

__all__ = ["necc", "tokentm", "transformation_weights"]


def necc(before: torch.Tensor, after: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``NECC_j = softmax_j cos(E_j, Ẽ_j)`` ``(B, N)`` over the real tokens ``real`` ``(B, N)`` (0 elsewhere)."""
    tiny = torch.finfo(before.dtype).tiny
    cos = (before * after).sum(-1) / (before.norm(dim=-1) * after.norm(dim=-1)).clamp_min(tiny)
    return cos.masked_fill(~real, float("-inf")).softmax(dim=-1).nan_to_num(0.0)


def transformation_weights(before: torch.Tensor, after: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``w_j = L(Ẽ_j) / L(E_j) · NECC_j`` ``(B, N)`` of a transformation ``E -> Ẽ`` (both ``(B, N, D)``)."""
    length = after.norm(dim=-1) / before.norm(dim=-1).clamp_min(torch.finfo(before.dtype).tiny)
    return length * necc(before, after, real)


@register_method(
    "tokentm",
    reference="Wu et al., CVPR 2024 (Token Transformation Matters; exact: written-out formula)",
    needs=Needs(attentions=True, gradients=True, hidden_states=True, value_outputs=True, mlp_branches=True),
    options=(
        Option("init", "length", "C^0: the input tokens' lengths (the paper's) or the identity",
               kind=str, choices=("length", "identity")),
    ),
)
def tokentm(trace, readout, *, init: str = "length") -> torch.Tensor:
    """TokenTM (Wu et al. CVPR'24): the gradient-weighted attention of every layer times each token's
    transformation weight (length ratio × softmax-normalised cosine) through the attention and the
    MLP, the residual as the identity, aggregated from the input tokens' lengths."""
    device = trace.attentions[0].device
    real = readout.pairs().any(dim=-1).to(device)
    layers = list(zip(trace.attentions, trace.gradients, trace.hidden_states, trace.value_outputs,
                      trace.mlp_inputs, trace.mlp_outputs))
    # the readout row of C^L = U^L_mlp U^L_attn ... U^1_mlp U^1_attn C^0, as a row vector from the top
    row = readout.one_hot(trace.attentions[-1])
    for a, g, h, v, m_in, m_out in reversed(layers):
        row = row * (1 + transformation_weights(m_in, m_out, real))        # r U_mlp = r (I + W_mlp)
        fused = (g * a).clamp(min=0).mean(dim=1)                           # Ā = E_h[(∇A ⊙ A)⁺]
        w_attn = transformation_weights(h, v, real)
        row = row + torch.bmm(row.unsqueeze(1), fused).squeeze(1) * w_attn  # r U_attn = r + (r Ā) W_attn
    if init == "length":
        row = row * trace.hidden_states[0].norm(dim=-1)                   # C^0 = diag(L(E^0))
    return row
