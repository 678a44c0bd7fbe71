"""AtMan (Deiseroth et al., NeurIPS 2023): perturbation by attention manipulation.

"AtMan: Understanding Transformer Predictions Through Memory Efficient Attention Manipulation".
Instead of changing the input, AtMan suppresses one token ``j`` in the attention of every layer
and head: with ``H`` the pre-softmax scores of a layer (query ``i``, key ``k``), shifted so that
each row's smallest score is 0 (the authors' multiplicative variant), the scores of the column
``j`` are scaled by ``1 − f``::

    Ĥ_ik = H_ik − min_k' H_ik'
    H̃_ik = (1 − f) · Ĥ_ik  if k = j,   Ĥ_ik otherwise          (Eq. 3, suppression factor f = 0.9)
    A'   = softmax_k(H̃)   over the keys the query may attend to

and the relevance of ``j`` is how much the explained output loses (Eq. 4, the change of the
target's cross-entropy)::

    R_j = log p_t(x) − log p_t(x; j suppressed)        (score="log_probability", default)
    R_j = y_t(x) − y_t(x; j suppressed)                (score="target": the explained scalar itself)

The probabilities are all that the model's attention exposes (written-out attention, the
explicit form of ``F.scaled_dot_product_attention`` or of ``nn.MultiheadAttention``,
:mod:`attnx.adapters.attention_edit`), and
they determine the shifted scores exactly: ``Ĥ_ik = log A_ik − min_k' log A_ik'``, the minimum
taken over the keys the query may attend to (``A > 0``). The authors' GPT-Neo code takes the row
minimum of the raw scores before the causal mask, future keys included; for bidirectional models
without padding the two are the same, for causal ones attnx's minimum is over the visible keys.

Every token of the layout is suppressed in turn (prefix tokens included; padding tokens get 0).

**The cosine neighbourhood** (the paper's "conceptual suppression", Sec. 3.3; ``neighbourhood=κ``):
the tokens ``k`` whose input embedding has cosine similarity ``c_jk >= κ`` with token ``j``'s are
suppressed with it, less the less similar they are (the authors' code)::

    factor_k = 1 − f                       k = j
    factor_k = f · (1 − c_jk) + (1 − f)    k ≠ j, c_jk >= κ       (1 at c_jk = 0, 1 − f at c_jk = 1)

The similarity is taken between the token embeddings (the output of the model's token
embeddings), so the neighbourhood is offered for text models; the paper's images are the image
tokens fed to a language model, which a ViT's pixels are not.
Cost: one forward of the batch per token plus two (the unsuppressed forward under the
manipulation, checked against the model's own), no backward; memory of one forward per chunk.
"""
from __future__ import annotations

import torch

from ..core.forward_check import tolerance
from ..core.trace_types import Needs
from ..errors import AttnxValueError, ForwardMismatchError
from .registry import Option, Relevance, register_method

__all__ = ["atman", "suppressed_probabilities"]


def suppressed_probabilities(probs: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``softmax_k(factor_k · (log A_ik − min_k' log A_ik'))`` over the keys with ``A > 0``.

    Parameters
    ----------
    probs:
        ``(..., N, N)`` attention probabilities, the leading axes batch-major for ``m`` samples.
    factors:
        ``(m, N)`` the factor of every key column per sample (``1 − f`` at the suppressed token).
    """
    shape = probs.shape
    p = probs.reshape(factors.shape[0], -1, shape[-2], shape[-1])
    allowed = p > 0
    log_p = torch.where(allowed, p, torch.ones_like(p)).log()
    low = torch.where(allowed, log_p, torch.full_like(log_p, float("inf"))).amin(dim=-1, keepdim=True)
    shifted = ((log_p - low) * factors[:, None, None, :].to(p.dtype)).masked_fill(~allowed, float("-inf"))
    edited = torch.softmax(shifted, dim=-1)
    edited = torch.where(allowed.any(dim=-1, keepdim=True), edited, torch.zeros_like(edited))
    return edited.reshape(shape)


@register_method(
    "atman",
    reference="Deiseroth et al., NeurIPS 2023 (exact: written-out formula)",
    # the attentions: AtMan is an attention method (global self-attention over the explained tokens;
    # windowed models are refused as for the other attention methods)
    needs=Needs(attentions=True, forward=True),
    options=(
        Option("suppression", 0.9, "suppression factor f: the suppressed token's shifted scores are multiplied by 1 - f",
               kind=float, bounds=(0, 1)),
        Option("neighbourhood", None, "cosine similarity threshold of the tokens suppressed with each token "
               "(text; None: the token alone)", kind=float, bounds=(0, 1), allow_none=True),
        Option("score", None, "log_probability (the paper's cross-entropy; classes and tokens) or target (y_t); "
               "default: log_probability where the target has one", kind=str, choices=("log_probability", "target"),
               allow_none=True),
    ),
)
def atman(trace, readout, *, suppression: float = 0.9, neighbourhood: float | None = None,
          score: str | None = None) -> Relevance:
    """AtMan: the drop of the target when the attention to one token is suppressed in every layer and head.

    Deiseroth et al. 2023, Eq. 3-4: each token's shifted pre-softmax scores scaled by ``1 - f``
    in every layer and head (with its cosine neighbourhood of token embeddings, ``neighbourhood=κ``),
    relevance = log p_t(x) - log p_t(x; token suppressed) (or the drop of ``y_t`` with
    ``score="target"``). One forward per token, no backward.
    """
    forward = trace.forward
    if score is None:
        score = "target" if forward.callable_target else "log_probability"
    forward.inputs()  # checks the model's own forward
    B, N = forward.batch_size, trace.layout.num_tokens
    factors = torch.ones(N + 1, B, N, dtype=torch.float64)
    columns = torch.arange(N)
    if neighbourhood is not None:
        factors[1:] = neighbourhood_factors(forward, suppression, neighbourhood).permute(1, 0, 2)
    factors[columns + 1, :, columns] = 1.0 - suppression  # copy 0: nothing suppressed
    with forward.held(), torch.no_grad():
        plain = forward(copies=1, score=score)
        scores = forward(key_factors=factors.reshape(-1, N), edit=suppressed_probabilities, score=score).reshape(N + 1, B)
    limit = tolerance(plain)
    if not float((scores[0] - plain).abs().amax()) <= limit:
        raise ForwardMismatchError(
            f"the manipulated forward with nothing suppressed differs from the model's own by "
            f"{float((scores[0] - plain).abs().amax()):.2g} (tolerance {limit:.2g}); AtMan needs attention it can rewrite exactly"
        )
    relevance = (scores[0][None] - scores[1:]).T  # (B, N)
    valid = trace.layout.valid_mask(B, relevance.device)
    tokens = relevance * valid.to(relevance.dtype)
    options = {"suppression": suppression, "neighbourhood": neighbourhood, "score": score}
    return Relevance(tokens=tokens.to(trace.logits.dtype), options=options)


def neighbourhood_factors(forward, suppression: float, threshold: float) -> torch.Tensor:
    """``(B, N, N)`` the factor of key ``k`` when token ``j`` is suppressed (row ``j``), for the
    tokens whose embeddings' cosine similarity with ``j``'s reaches ``threshold``."""
    if forward.kind != "embeddings":
        raise AttnxValueError(
            "the cosine neighbourhood compares token embeddings (text models); an image model's tokens are "
            "not its input: use neighbourhood=None"
        )
    e = forward.inputs().to(torch.float64)
    unit = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cosine = (unit @ unit.transpose(1, 2)).clamp(-1, 1)  # (B, N, N)
    similar = cosine >= threshold
    return torch.where(similar, suppression * (1 - cosine) + (1 - suppression), torch.ones_like(cosine)).cpu()
