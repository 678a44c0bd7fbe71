"""LRP to the input: relevance of every pixel or token embedding, with any rule registry."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters import Layout
from ..explanation import Explanation
from ..lrp.passes import relevance_pass
from ..lrp.registry import get_preset
from . import register_method


def pool_to_grid(pixel_relevance: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Sum ``(B, H, W)`` pixel relevance over the patches of ``grid``: ``(B, h*w)``."""
    B, H, W = pixel_relevance.shape
    h, w = grid
    if H % h == 0 and W % w == 0:
        pooled = F.avg_pool2d(pixel_relevance[:, None], (H // h, W // w)) * ((H // h) * (W // w))
    else:
        pooled = F.adaptive_avg_pool2d(pixel_relevance[:, None], grid) * (H * W / (h * w))
    return pooled.flatten(1)


@register_method("lrp", kind="lrp")
def lrp(explainer, batch, target=None, *, preset="attnlrp", patch_size: int = 16, strict: bool = False) -> Explanation:
    """Layer-wise relevance propagation to the input with a rule registry (``preset``: a name from
    ``attnx.lrp.presets`` or an ``attnx.lrp.Registry``).

    ``Explanation.scores`` sums the input relevance per patch (images; ``patch_size`` pixels
    when the model has no patch grid) or per token over the embedding (text);
    ``Explanation.extras["input_relevance"]`` holds the raw relevance ``(B, C, H, W)`` or
    ``(B, T, D)``; for images the heat map is drawn from the pixel relevance.
    """
    registry = get_preset(preset)
    res = relevance_pass(explainer.adapter, batch, target, registry, strict=strict)
    layout = res.layout
    rel = res.input_relevance
    if rel.dim() == 4:  # pixels
        pixel = rel.sum(dim=1)
        if layout is None:
            H, W = pixel.shape[-2:]
            layout = Layout(
                num_tokens=(H // patch_size) * (W // patch_size), prefix_tokens=0, readout=None,
                grid=(H // patch_size, W // patch_size), input_size=(H, W),
            )
        scores = pool_to_grid(pixel, layout.grid)
        token_rel = None
    else:  # token embeddings
        token_rel = rel.sum(dim=-1)
        scores = token_rel if layout.valid is None else token_rel * layout.valid.to(token_rel.dtype)
        pixel = None
    e = Explanation(
        scores=scores,
        grid=layout.grid,
        targets=res.targets,
        logits=res.logits,
        method="lrp",
        options={"preset": registry.name},
        token_relevance=token_rel,
        layout=layout,
        input_ids=batch.kwargs.get("input_ids") if layout.grid is None else None,
    )
    e.extras["input_relevance"] = rel
    e.extras["coverage"] = res.coverage
    if pixel is not None:
        e.extras["pixel_relevance"] = pixel
    return e
