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

from ..errors import AttnxValueError

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
        The row that explains the prediction. An ``int``: the same token for every sample (the
        class token); a ``(B,)`` long tensor: one token per sample (the last real token of a
        causal language model, which moves with the padding); a ``(B, N)`` float tensor: a
        weighting of several rows per sample (each row sums to 1; e.g. the positions that
        predict the tokens of a continuation); ``None``: the model pools its content tokens,
        and the mean of the real content rows is read.
    grid:
        ``(h, w)`` patch grid of the content tokens in row-major order, ``None`` for text.
    input_size:
        ``(H, W)`` of the input images, ``None`` for text.
    valid:
        ``(B, N)`` bool mask of real (non-padding) tokens, or ``None`` when every token is real.
    causal:
        Token ``i`` attends only to tokens ``j <= i`` (decoder language models): the pairs
        ``j > i`` are not attention a method may weigh or discard.
    columns:
        ``(B, P)`` long: the token each score column reads, ``-1`` for a padding column; ``None``
        (the default) when the score columns are the tokens after the prefix, in order. Used when
        the explained sequence is not the user's input as given (a continuation appended to a
        prompt: the scores cover the prompt, laid out as the user's ``input_ids``).
    readout_name:
        What the readout is, in words ("class token", "mean of 196 patch tokens", ...); ``None``:
        described from ``readout`` (:func:`attnx.core.readout.describe`).
    readout_declared:
        Whether the adapter knows the readout from the model (its head's pooling). ``False`` for
        the fallback adapter on a model it knows nothing about: the readout is then measured from
        the gradient of the target with respect to the last layer's attention (:mod:`attnx.core.readout`).
    """

    num_tokens: int
    prefix_tokens: int
    readout: int | torch.Tensor | None
    grid: tuple[int, int] | None = None
    input_size: tuple[int, int] | None = None
    valid: torch.Tensor | None = None
    causal: bool = False
    columns: torch.Tensor | None = None
    readout_name: str | None = None
    readout_declared: bool = True

    @classmethod
    def for_image(
        cls, x: torch.Tensor, grid: tuple[int, int], prefix_tokens: int, readout: int | torch.Tensor | None,
        readout_name: str | None = None, readout_declared: bool = True,
    ) -> "Layout":
        """The layout of an image batch ``x`` cut into a ``grid`` of patches after ``prefix_tokens``."""
        h, w = int(grid[0]), int(grid[1])
        return cls(
            num_tokens=prefix_tokens + h * w,
            prefix_tokens=prefix_tokens,
            readout=readout,
            grid=(h, w),
            input_size=(int(x.shape[-2]), int(x.shape[-1])),
            readout_name=readout_name,
            readout_declared=readout_declared,
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
        """``(B, N)`` bool mask of real content tokens (prefix tokens and padding excluded; with
        ``columns``, the tokens the score columns read)."""
        mask = self.valid_mask(batch_size, device).clone()
        if self.columns is not None:
            cols = self.columns.to(device)
            read = torch.zeros_like(mask)
            read.scatter_(1, cols.clamp(min=0), cols >= 0)
            return mask & read
        mask[:, : self.prefix_tokens] = False
        return mask

    def score_mask(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """``(B, P)`` bool mask of the score columns that are real tokens (padding excluded)."""
        if self.columns is not None:
            return self.columns.to(device) >= 0
        return self.valid_mask(batch_size, device)[:, self.prefix_tokens :]


def infer_image_layout(x: torch.Tensor, num_tokens: int, prefix_tokens: int | None = None) -> Layout:
    """Guess the layout of an image model nobody wrote an adapter for.

    Unless ``prefix_tokens`` is given, the smallest number of prefix tokens ``p`` is chosen such
    that ``N - p`` patches tile the image with square patches (``h * w = N - p`` and
    ``H / h == W / w``). The readout is a first guess (the first prefix token, else the mean of
    the patch rows), marked as not declared: it is measured before use (:mod:`attnx.core.readout`).
    """
    H, W = int(x.shape[-2]), int(x.shape[-1])
    choices = range(0, min(num_tokens, 17)) if prefix_tokens is None else (prefix_tokens,)
    for p in choices:
        n = num_tokens - p
        h = math.isqrt(max(1, round(n * H / W)))
        for hh in (h - 1, h, h + 1):
            if hh <= 0 or n % hh:
                continue
            ww = n // hh
            if abs(H / hh - W / ww) < 1e-6 * max(H, W):
                return Layout.for_image(x, (hh, ww), p, 0 if p > 0 else None, readout_declared=False)
    raise AttnxValueError(
        f"cannot infer the patch grid of a {H}x{W} image from {num_tokens} attention tokens; "
        "write an adapter for this model (see attnx.adapters.register_adapter)"
    )


class Readout:
    """Which row of a token-by-token matrix explains the prediction.

    ``index`` is ``(B,)`` long when one token per sample is read (the class token, the last real
    token of a causal language model), else ``None``; ``weights`` is ``(B, N)``, the readout as
    a weighting of rows (one-hot for a single token; the mean of the real content rows for
    models that pool their patch tokens; the positions predicting a continuation). A ``(1, N)``
    weighting applies to every sample.
    """

    def __init__(self, layout: Layout, batch_size: int, device: torch.device) -> None:
        self.layout = layout
        self.valid = layout.valid_mask(batch_size, device)  # (B, N)
        self.content = layout.content_mask(batch_size, device)  # (B, N)
        B, N = self.valid.shape
        readout = layout.readout
        self.index: torch.Tensor | None = None
        if isinstance(readout, torch.Tensor) and readout.dim() == 2:
            if readout.shape[0] == 1 and B > 1:  # the same weighting for every sample
                readout = readout.expand(B, -1)
            if tuple(readout.shape) != (B, N):
                raise AttnxValueError(f"readout weights of shape {tuple(readout.shape)} do not match the batch ({B}, {N})")
            self.weights = readout.to(device)
            #: rows read by the model (never discarded by rollout's discard_ratio)
            self.protected = self.weights != 0
            return
        if readout is None:
            w = self.content.to(torch.float64)
            self.weights = w / w.sum(-1, keepdim=True)
            self.protected = torch.zeros(B, N, dtype=torch.bool, device=device)
            return
        index = torch.as_tensor(readout, dtype=torch.long, device=device).reshape(-1)
        if index.numel() == 1:
            index = index.expand(B)
        if index.numel() != B:
            raise AttnxValueError(f"got {index.numel()} readout positions for a batch of {B} samples")
        if ((index < 0) | (index >= N)).any():
            raise AttnxValueError(f"readout position out of range for {N} tokens: {index.tolist()}")
        self.index = index.contiguous()
        self.protected = torch.zeros(B, N, dtype=torch.bool, device=device)
        self.protected[torch.arange(B, device=device), self.index] = True
        self.weights = self.protected.to(torch.float64)

    def row(self, matrix: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Read ``matrix`` ``(B, ..., N, N)`` at the readout row: ``(B, ..., N)``. With ``rows``,
        ``matrix`` holds only those query rows: what they add to the readout row (the readout
        rows outside them add zero), so that the reads of a matrix's row tiles sum to its read."""
        weights, index = self.weights, self.index
        if rows is not None:
            start = rows.start or 0
            weights = weights[:, rows]
            if index is not None:
                index = index - start
        if index is not None:
            n = matrix.shape[-2]
            inside = (index >= 0) & (index < n)
            shape = (*matrix.shape[:-2], 1, matrix.shape[-1])
            at = index.clamp(0, n - 1).to(matrix.device).view(-1, *([1] * (matrix.dim() - 1))).expand(shape)
            picked = matrix.gather(-2, at).squeeze(-2)
            return picked if rows is None else picked * inside.to(matrix.device, matrix.dtype).view(-1, *([1] * (picked.dim() - 1)))
        w = weights.to(device=matrix.device, dtype=matrix.dtype)
        w = w.view(w.shape[0], *([1] * (matrix.dim() - 3)), w.shape[1], 1)
        return (matrix * w).sum(-2)

    def one_hot(self, like: torch.Tensor) -> torch.Tensor:
        """The readout row of the identity (the readout weights), ``(B, N)`` in the dtype of ``like``."""
        return self.weights.to(device=like.device, dtype=like.dtype)

    def pairs(self) -> torch.Tensor:
        """``(B, N, N)`` bool mask of (query, key) pairs between real tokens that may attend
        (``key <= query`` for a causal model)."""
        pairs = self.valid[:, :, None] & self.valid[:, None, :]
        if self.layout.causal:
            N = pairs.shape[-1]
            pairs = pairs & torch.ones(N, N, dtype=torch.bool, device=pairs.device).tril()
        return pairs

    def visible(self) -> torch.Tensor:
        """``(B, N)`` bool mask of the content tokens the readout rows attend to."""
        seen = (self.pairs() & (self.weights != 0)[:, :, None]).any(dim=1)
        return seen & self.content


def to_scores(relevance: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``(B, N)`` token relevance -> ``(B, P)`` content scores, padding set to 0."""
    if layout.columns is not None:
        cols = layout.columns.to(relevance.device)
        scores = relevance.gather(1, cols.clamp(min=0))
        return scores * (cols >= 0).to(scores.dtype)
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
