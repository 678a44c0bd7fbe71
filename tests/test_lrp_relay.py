"""The relay owns the tensor marks the engine and the rules share (``attnx.lrp.relay``)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from attnx.lrp import LRPEngine, get_preset
from attnx.lrp.relay import RELEVANCE_MARK, SCALE_MARK, carries_relevance, is_exact_alias, scale_of

LRP = Path(__file__).resolve().parents[1] / "attnx" / "lrp"


def test_only_the_relay_spells_the_marks():
    for path in sorted(LRP.glob("*.py")):
        if path.name != "relay.py":
            text = path.read_text()
            assert "_attnx_" not in text, f"{path.name} spells a tensor mark; use the names of attnx.lrp.relay"
    assert RELEVANCE_MARK.startswith("_attnx_") and SCALE_MARK.startswith("_attnx_")


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x * 0.25
        k = q / 2.0
        self.seen += [q, k]
        return (k * x).sum(-1, keepdim=True)


def test_the_engine_marks_what_the_rules_read():
    model = Scaled()
    x = torch.randn(2, 3)
    with torch.enable_grad(), LRPEngine(model, get_preset("attnlrp"), strict=False) as engine:
        root = engine.track(x)
        model(root)
    engine.release()
    q, k = model.seen
    assert carries_relevance(root) and carries_relevance(q) and carries_relevance(k)
    assert not carries_relevance(x)  # the user's tensor is not marked
    assert scale_of(q) == 0.25 and scale_of(k) == 0.125 and scale_of(x) == 1.0


def test_exact_alias():
    t = torch.randn(2, 3)
    assert is_exact_alias(t, t) and is_exact_alias(t.view(2, 3), t)
    assert not is_exact_alias(t.clone(), t)
    assert not is_exact_alias(t.t(), t)  # same storage, other strides
    assert not is_exact_alias(t[:1], t) and not is_exact_alias(None, t)
