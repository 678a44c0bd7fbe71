"""What every metric is given: the relevance type, and the checks and the ordering they share."""
from __future__ import annotations

import math
from typing import Any, Union

import torch

from ..core.explanation import Explanation
from ..errors import AttnxTypeError, AttnxValueError

__all__ = ["RelevanceLike", "bool_mask", "check_finite", "infer_grid", "ranks_descending"]

#: the relevance a metric scores: an explanation of any method, or a plain tensor
RelevanceLike = Union[Explanation, torch.Tensor]


def ranks_descending(key: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` position of each element when sorted by ``key`` descending; ties keep index order."""
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    return rank


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise if ``t`` holds NaN or infinite values (``name`` says which input)."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise AttnxValueError(f"{name} contains NaN or infinite values")


def infer_grid(P: int, H: int, W: int) -> tuple[int, int]:
    """The ``(h, w)`` grid of square patches that ``P`` patch scores tile an ``H x W`` image with."""
    h = round(math.sqrt(P * H / W)) if P > 0 else 0
    if h > 0 and P % h == 0:
        w = P // h
        if H % h == 0 and W % w == 0 and H // h == W // w:
            return h, w
    raise AttnxValueError(
        f"cannot infer the patch grid of {P} patch scores for a {H}x{W} image; pass grid=(h, w)"
    )


def bool_mask(mask: Any, shape: tuple, name: str) -> torch.Tensor:
    """``mask`` as a bool tensor of ``shape``; 0/1 tensors are accepted, anything else is an error."""
    if not isinstance(mask, torch.Tensor):
        raise AttnxTypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise AttnxValueError(f"expected {name} of shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise AttnxValueError(f"{name} must be boolean (or hold only 0 and 1)")
    return mask.bool()
