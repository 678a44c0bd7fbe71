"""LRP to the input: relevance of every pixel or token embedding, with any rule registry."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.trace_types import Needs
from .options import PATCH_SIZE, PRESET, STRICT
from .registry import Relevance, register_method


def pool_to_grid(pixel_relevance: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Sum ``(B, H, W)`` pixel relevance over the patches of ``grid``: ``(B, h*w)``."""
    B, H, W = pixel_relevance.shape
    h, w = grid
    if H % h == 0 and W % w == 0:
        pooled = F.avg_pool2d(pixel_relevance[:, None], (H // h, W // w)) * ((H // h) * (W // w))
    else:
        pooled = F.adaptive_avg_pool2d(pixel_relevance[:, None], grid) * (H * W / (h * w))
    return pooled.flatten(1)


def input_relevance_scores(trace, readout) -> Relevance:
    """Scores from the relevance at the input: summed over the channels and each patch of the
    layout's grid (images, the heat map drawn from the pixels), or over the hidden dimension
    (text, one value per token)."""
    rel = trace.input_relevance
    if rel.dim() == 4:  # pixels
        pixels = rel.sum(dim=1)
        return Relevance(scores=pool_to_grid(pixels, trace.layout.grid), pixels=pixels)
    return Relevance(tokens=rel.sum(dim=-1))


def seeded_total(trace, result: Relevance, options: dict) -> torch.Tensor | None:
    """What LRP claims its input relevance sums to: the relevance put on the logits
    (``trace.seeded_relevance``, ``y_t`` under a ``"logit"`` seed), when the preset's rules
    conserve (``Registry.conserving``); ``None`` otherwise."""
    return trace.seeded_relevance if getattr(trace, "conserving", False) else None


@register_method("lrp", reference="Bach et al. 2015; Achtibat et al., ICML 2024; Ali et al., ICML 2022", needs=Needs(input_relevance=True),
                 options=(PRESET, STRICT, PATCH_SIZE), conserves=seeded_total)
def lrp(trace, readout) -> Relevance:
    """Layer-wise relevance propagation to the input with a rule registry (``preset``: a name from
    ``attnx.lrp.presets`` or an ``attnx.lrp.Registry``).

    ``Explanation.scores`` sums the input relevance per patch of the model's grid (images) or per
    token over the embedding (text); ``Explanation.input_relevance`` holds the raw relevance
    ``(B, C, H, W)`` or ``(B, T, D)``; for images the heat map is drawn from the pixel relevance.
    """
    return input_relevance_scores(trace, readout)
