"""Explaining embedding models (backbones without a classifier): similarity targets and patch matching.

A backbone's output is an embedding, not class logits, so "the predicted class" means nothing.
Its explanations take a callable target instead:

* :func:`cosine_to` -- "what in photo A makes it similar to photo B": the cosine similarity of
  each sample's embedding to a reference embedding (the embedding of B);
* :data:`embedding_norm` -- the length of the embedding, a neutral target for methods that read only
  the attention (``raw_attention``, ``rollout``: the target does not change them) and a
  whole-embedding target for the others.

Both are linear in the embedding once its norm is held constant, and say so through a
``relevance_seed`` method, so LRP methods (``lrp``, ``transformer_attribution``, ...) take them too:
the normaliser ``‖e‖`` is held constant as LayerNorm's σ is in AttnLRP and CP-LRP, and the relevance
seeded at the embedding sums to the target (seed ``"logit"``). Gradient methods use the exact
gradient of the cosine.

:func:`patch_similarity` answers "which patches match this patch": the cosine similarity of every
patch token of the last layer to a query token, of the same photo or another one::

    from attnx import zoo

    from attnx.core import similarity

    dino = zoo.dinov2_model()
    x = dino.preprocess([photo_a, photo_b])
    b = similarity.embed(dino.model, x[1:])                       # (1, 384)
    e = attnx.explain(dino.model, x[:1], method="generic", target=similarity.cosine_to(b))
    tokens = zoo.dinov2.patch_tokens(dino.model, x)               # (2, 256, 384)
    maps = similarity.patch_similarity(tokens, tokens[0, 5 * 16 + 7])   # (2, 256), in [-1, 1]
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import AttnxTypeError, AttnxValueError

__all__ = ["CosineSimilarity", "EmbeddingNorm", "cosine_to", "embed", "embedding_norm", "occlusion_grid", "patch_similarity"]


def output_embedding(output: Any) -> torch.Tensor:
    """The ``(B, D)`` embedding a model returned: the output itself or its ``pooler_output``."""
    e = getattr(output, "pooler_output", output)
    if not isinstance(e, torch.Tensor) or e.dim() != 2:
        got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(output).__name__
        raise AttnxValueError(f"expected a model whose output is an embedding (B, D), got {got}")
    return e


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model``'s embedding of ``images``, ``(B, D)``, without gradients and in eval mode (each
    module's ``training`` flag is restored afterwards)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return output_embedding(model(images)).detach()
    finally:
        for m, flag in flags:
            m.training = flag


class CosineSimilarity:
    """Target: ``cos(e, r) = ⟨e, r⟩ / (‖e‖ ‖r‖)`` of each sample's embedding ``e`` to its reference ``r``.

    Parameters
    ----------
    reference:
        ``(D,)`` or ``(1, D)``: one reference for every sample; ``(B, D)``: one per sample.
    """

    def __init__(self, reference: torch.Tensor) -> None:
        if not isinstance(reference, torch.Tensor) or reference.dim() not in (1, 2) or not reference.is_floating_point():
            got = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
            raise AttnxTypeError(f"the reference must be a float tensor (D,) or (B, D), got {got}")
        r = reference.detach().reshape(-1, reference.shape[-1])
        norm = r.norm(dim=-1, keepdim=True)
        if not torch.isfinite(r).all() or (norm == 0).any():
            raise AttnxValueError("the reference embedding must be finite and non-zero")
        self.unit = r / norm

    def direction(self, e: torch.Tensor) -> torch.Tensor:
        """The unit reference of each of the ``B`` samples, ``(B, D)``."""
        if self.unit.shape[-1] != e.shape[-1] or self.unit.shape[0] not in (1, e.shape[0]):
            raise AttnxValueError(
                f"the reference {tuple(self.unit.shape)} does not fit embeddings {tuple(e.shape)}: "
                "expected (D,), (1, D) or (B, D) with the same D"
            )
        return self.unit.to(device=e.device, dtype=e.dtype).expand_as(e)

    def __call__(self, output: Any) -> torch.Tensor:
        e = output_embedding(output)
        return (e * self.direction(e)).sum(-1) / e.norm(dim=-1)

    def relevance_seed(self, logits: torch.Tensor) -> torch.Tensor:
        """``w = r̂ / ‖e‖``: with ``‖e‖`` held constant the cosine is ``Σ_d w_d e_d``."""
        return self.direction(logits) / logits.norm(dim=-1, keepdim=True)

    def __repr__(self) -> str:
        return f"CosineSimilarity(references={self.unit.shape[0]}, dim={self.unit.shape[1]})"


def cosine_to(reference: torch.Tensor) -> CosineSimilarity:
    """The target "cosine similarity to ``reference``" (see :class:`CosineSimilarity`)."""
    return CosineSimilarity(reference)


class EmbeddingNorm:
    """Target: the Euclidean length ``‖e‖`` of each sample's embedding."""

    def __call__(self, output: Any) -> torch.Tensor:
        return output_embedding(output).norm(dim=-1)

    def relevance_seed(self, logits: torch.Tensor) -> torch.Tensor:
        """``w = e / ‖e‖``: with the normaliser held constant, ``‖e‖ = Σ_d w_d e_d``."""
        return logits / logits.norm(dim=-1, keepdim=True)

    def __repr__(self) -> str:
        return "embedding_norm"


#: the length of the embedding, as a target (see :class:`EmbeddingNorm`)
embedding_norm = EmbeddingNorm()


def patch_similarity(tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token to a query token: which patches match this patch.

    Parameters
    ----------
    tokens:
        ``(B, P, D)`` patch tokens (e.g. :func:`attnx.zoo.dinov2.patch_tokens`).
    query:
        ``(D,)``: one query for every sample, or ``(B, D)``: one per sample.

    Returns
    -------
    torch.Tensor
        ``(B, P)`` cosine similarities in ``[-1, 1]`` (reshape to the patch grid to draw them).
    """
    if tokens.dim() != 3:
        raise AttnxValueError(f"expected patch tokens (B, P, D), got {tuple(tokens.shape)}")
    q = query.reshape(-1, query.shape[-1]) if query.dim() in (1, 2) else None
    if q is None or q.shape[-1] != tokens.shape[-1] or q.shape[0] not in (1, tokens.shape[0]):
        raise AttnxValueError(f"expected a query (D,) or (B, D) with D = {tokens.shape[-1]}, got {tuple(query.shape)}")
    return torch.nn.functional.cosine_similarity(tokens, q[:, None, :].to(tokens.dtype), dim=-1)


def occlusion_grid(
    score: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, square: int, chunk: int = 32
) -> torch.Tensor:
    """``score(image) - score(image with one square set to 0)`` for every square of a grid:
    ``(H / square, W / square)``, without gradients. ``score`` maps a ``(K, C, H, W)`` batch to
    ``(K,)`` scores; the occluded copies go through it ``chunk`` at a time. Zero is the mean colour
    of normalised images; a positive drop: the square raises the score."""
    H, W = image.shape[-2:]
    if H % square or W % square:
        raise AttnxValueError(f"square {square} does not tile a {H}x{W} image")
    rows, cols = H // square, W // square
    batch = image[None].repeat(rows * cols, 1, 1, 1)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        batch[k, :, r * square:(r + 1) * square, c * square:(c + 1) * square] = 0
    with torch.no_grad():
        base = score(image[None])
        occluded = torch.cat([score(part) for part in batch.split(chunk)])
    return (base - occluded).reshape(rows, cols)
