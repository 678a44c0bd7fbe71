"""The token layout of a batch, the readout row, and from token relevance to what users see.

``Layout`` says where the tokens of a batch come from (prefix tokens, patch grid, padding);
``Readout`` reads the row of a token-by-token matrix that explains the prediction; ``to_scores`` and
``scores_to_map`` turn token relevance into content scores and image heat maps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from .errors import AttnxValueError

__all__ = ["Layout", "Readout", "infer_image_layout", "to_scores", "scores_to_map", "normalize_per_sample"]


@dataclass
class Layout:
    """Where the tokens of a batch come from.

    Attributes
    ----------
    num_tokens:
        N, the sequence length seen by the attention layers.
    prefix_tokens:
        Number of leading tokens that are not content (class, distillation and register tokens).
        For text this is 0: every word piece, special ones included, is content.
    readout:
        Index of the token whose row is read (the class token), or ``None`` when the model pools
        the content tokens; then the mean of the content rows is read.
    grid:
        ``(h, w)`` patch grid of the content tokens in row-major order, ``None`` for text.
    input_size:
        ``(H, W)`` of the input images, ``None`` for text.
    valid:
        ``(B, N)`` bool mask of real (non-padding) tokens, or ``None`` when every token is real.
    """

    num_tokens: int
    prefix_tokens: int
    readout: int | None
    grid: tuple[int, int] | None = None
    input_size: tuple[int, int] | None = None
    valid: torch.Tensor | None = None

    @classmethod
    def for_image(cls, x: torch.Tensor, grid: tuple[int, int], prefix_tokens: int, readout: int | None) -> "Layout":
        """The layout of an image batch ``x`` cut into a ``grid`` of patches after ``prefix_tokens``."""
        h, w = int(grid[0]), int(grid[1])
        return cls(
            num_tokens=prefix_tokens + h * w,
            prefix_tokens=prefix_tokens,
            readout=readout,
            grid=(h, w),
            input_size=(int(x.shape[-2]), int(x.shape[-1])),
        )

    @property
    def num_content(self) -> int:
        return self.num_tokens - self.prefix_tokens

    def valid_mask(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """``(B, N)`` bool mask of real tokens."""
        if self.valid is not None:
            return self.valid.to(device=device, dtype=torch.bool)
        return torch.ones(batch_size, self.num_tokens, dtype=torch.bool, device=device)

    def content_mask(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """``(B, N)`` bool mask of real content tokens (prefix tokens and padding excluded)."""
        mask = self.valid_mask(batch_size, device).clone()
        mask[:, : self.prefix_tokens] = False
        return mask


def infer_image_layout(x: torch.Tensor, num_tokens: int) -> Layout:
    """Guess the layout of an image model nobody wrote an adapter for.

    The smallest number of prefix tokens ``p`` is chosen such that ``N - p`` patches tile the
    image with square patches (``h * w = N - p`` and ``H / h == W / w``). The first prefix token
    is taken as the readout token; with no prefix token the mean of the patch rows is read.
    """
    H, W = int(x.shape[-2]), int(x.shape[-1])
    for p in range(0, min(num_tokens, 17)):
        n = num_tokens - p
        h = math.isqrt(max(1, round(n * H / W)))
        for hh in (h - 1, h, h + 1):
            if hh <= 0 or n % hh:
                continue
            ww = n // hh
            if abs(H / hh - W / ww) < 1e-6 * max(H, W):
                return Layout.for_image(x, (hh, ww), p, 0 if p > 0 else None)
    raise AttnxValueError(
        f"cannot infer the patch grid of a {H}x{W} image from {num_tokens} attention tokens; "
        "write an adapter for this model (see attnx.adapters.register_adapter)"
    )


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
