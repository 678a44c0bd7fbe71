"""Toy models and hand-checkable maps shared by the metrics tests (tests/test_metrics_*.py)."""
from __future__ import annotations

import torch
from torch import nn

import attnx
from conftest import CASES


class RegionSum(nn.Module):
    """Logits ``[Σ_{region} x - offset, 0]`` summed over the channels; a region-detector."""

    def __init__(self, region: torch.Tensor, offset: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("region", region.bool())
        self.offset = offset
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = (x.sum(dim=1) * self.region).flatten(1).sum(dim=1) - self.offset
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def top_left(H=4, W=4, h=2, w=2) -> torch.Tensor:
    r = torch.zeros(H, W, dtype=torch.bool)
    r[:h, :w] = True
    return r


def ones(B=1, C=1, H=4, W=4, dtype=torch.float64) -> torch.Tensor:
    return torch.ones(B, C, H, W, dtype=dtype)


PERFECT = top_left().double()[None]  # relevance 1 on the region, 0 elsewhere
INVERTED = 1 - PERFECT


def close(a, b, tol=1e-9) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


def explained_vit():
    """A tiny timm ViT, 3 images and its generic explanation of them: ``(model, x, e)``."""
    case = CASES["timm_vit"]
    model = case.model()
    x = case.inputs(batch=3, seed=4)
    return model, x, attnx.explain(model, x, method="generic")
