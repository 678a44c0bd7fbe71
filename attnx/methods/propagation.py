"""Rollout propagation, shared by the rollout family: head fusion, discarding, row-vector products."""
from __future__ import annotations

from typing import Iterable

import torch

from ..core.layout import Readout
from ..errors import AttnxTypeError, AttnxValueError

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Fuse ``(B, H, N, N)`` over heads with ``mean``, ``max`` or ``min``."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise AttnxValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def discard_lowest(fused: torch.Tensor, discard_ratio: float, readout: Readout) -> torch.Tensor:
    """Zero the smallest ``discard_ratio`` fraction of each sample's ``(B, N, N)`` map.

    Candidates are the pairs of real (non-padding) tokens that may attend (key before query in a
    causal model) outside the readout rows, which are never discarded; for each sample
    ``floor(discard_ratio * #candidates)`` entries are zeroed.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise AttnxValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if discard_ratio == 0.0:
        return fused
    B, N, _ = fused.shape
    candidates = readout.pairs() & ~readout.protected.to(fused.device)[:, :, None]
    k = (candidates.flatten(1).sum(1).to(torch.float64) * discard_ratio).floor().long()  # (B,)
    values = fused.masked_fill(~candidates, float("inf")).flatten(1)
    order = values.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(N * N, device=fused.device).expand(B, -1))
    drop = ranks < k[:, None]
    return fused.masked_fill(drop.view(B, N, N), 0)


def rollout_row(matrices: Iterable[torch.Tensor], readout: Readout) -> torch.Tensor:
    """The readout row of ``M_L ... M_2 M_1`` for per-layer ``(B, N, N)`` matrices given in
    forward order (``M_1`` first), computed as a row vector from the last layer down: O(L N^2)."""
    matrices = list(matrices)
    if not matrices:
        raise AttnxValueError("no layers to roll out (check start_layer)")
    row = readout.row(matrices[-1])
    for m in reversed(matrices[:-1]):
        row = torch.bmm(row.unsqueeze(1), m).squeeze(1)
    return row


def option_layer(option: str):
    """``first_layer`` of a method that reads the layers from its option ``option`` on."""

    def first_layer(options: dict, layout, num_layers: int) -> int:
        return options[option]

    return first_layer


def check_start_layer(start_layer: int, num_layers: int, option: str = "start_layer") -> int:
    """``start_layer`` as an index in ``[0, num_layers)``; ``option`` names it in errors."""
    if not isinstance(start_layer, int) or isinstance(start_layer, bool):
        raise AttnxTypeError(f"{option} must be an int, got {start_layer!r}")
    s = start_layer + num_layers if start_layer < 0 else start_layer
    if not 0 <= s < num_layers:
        raise AttnxValueError(f"{option} {start_layer} is out of range for a model with {num_layers} layers")
    return s
