"""From token relevance to what users see: content-token scores and image heat maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters.base import Layout

__all__ = ["Layout", "Readout", "to_scores", "scores_to_map", "normalize_per_sample"]


class Readout:
    """Which row of a token-by-token matrix explains the prediction.

    The class token's row when the model reads one (``layout.readout``); otherwise the mean of
    the rows of the real content tokens (models that pool their patch tokens).
    """

    def __init__(self, layout: Layout, batch_size: int, device: torch.device) -> None:
        self.layout = layout
        self.index = layout.readout
        self.valid = layout.valid_mask(batch_size, device)  # (B, N)
        self.content = layout.content_mask(batch_size, device)  # (B, N)

    def row(self, matrix: torch.Tensor) -> torch.Tensor:
        """Read ``matrix`` ``(B, ..., N, N)`` at the readout row: ``(B, ..., N)``."""
        if self.index is not None:
            return matrix[..., self.index, :]
        w = self.content.to(matrix.dtype)
        w = w / w.sum(-1, keepdim=True)
        w = w.view(w.shape[0], *([1] * (matrix.dim() - 3)), w.shape[1], 1)
        return (matrix * w).sum(-2)

    def one_hot(self, like: torch.Tensor) -> torch.Tensor:
        """The readout row of the identity, ``(B, N)`` in the dtype of ``like``."""
        B, N = self.valid.shape
        if self.index is not None:
            v = torch.zeros(B, N, dtype=like.dtype, device=like.device)
            v[:, self.index] = 1
            return v
        w = self.content.to(like.dtype)
        return w / w.sum(-1, keepdim=True)

    def pairs(self) -> torch.Tensor:
        """``(B, N, N)`` bool mask of (query, key) pairs between real tokens."""
        return self.valid[:, :, None] & self.valid[:, None, :]


def to_scores(relevance: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``(B, N)`` token relevance -> ``(B, P)`` content scores, padding set to 0."""
    scores = relevance[:, layout.prefix_tokens :]
    if layout.valid is not None:
        scores = scores * layout.valid[:, layout.prefix_tokens :].to(device=scores.device, dtype=scores.dtype)
    return scores


def normalize_per_sample(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each sample of ``maps`` (B, ...) to [0, 1]; constant maps become 0."""
    flat = maps.flatten(1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat))
    return out.view_as(maps)


def scores_to_map(scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int] | None) -> torch.Tensor:
    """``(B, h*w)`` patch scores -> ``(B, H, W)`` map, bilinear upsampling to ``size``."""
    h, w = grid
    maps = scores.reshape(scores.shape[0], 1, h, w).float() if not scores.is_floating_point() else scores.reshape(scores.shape[0], 1, h, w)
    if size is not None and tuple(size) != (h, w):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps[:, 0]
