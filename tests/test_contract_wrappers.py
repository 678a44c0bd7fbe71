"""A user's module around a known backbone: the intercept adapter names the backbone's blocks.

The methods that read the blocks (attcat, bt_t, tokentm) and the per-layer readouts (legrad below
the last layer) must give, on a wrapper whose head is the wrapper's own code, what the family
adapter gives on the same backbone with the same head built in: the wrapper's per-layer readouts
run the wrapper again from each layer (:func:`attnx.core.layer_readout.rerun_readout`), the
family adapter's are written out for its head, two independent computations.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnx
from attnx.errors import UnsupportedModelError

from conftest import CASES, hf_vit

#: the methods that need the blocks, with options (legrad over every layer reads each layer's head)
BLOCK_ROWS = [("attcat", {}), ("bt_t", {}), ("tokentm", {}), ("legrad", {}), ("legrad", {"start_layer": 0})]
TOL = 1e-10


class TimmWithOwnHead(nn.Module):
    """A headless timm ViT (``num_classes=0``: pooled features) and the user's linear head."""

    def __init__(self, vit: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.vit, self.classifier = vit, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.vit(x))


class HFWithOwnHead(nn.Module):
    """A bare Hugging Face ``ViTModel`` (no head, so no family adapter) and the user's head on the
    normalised class token: what ``ViTForImageClassification`` computes."""

    def __init__(self, vit: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.vit, self.classifier = vit, head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.vit(pixel_values=pixel_values).last_hidden_state[:, 0])


def timm_pair() -> tuple[nn.Module, nn.Module]:
    """A timm ViT classifier and the same weights as a headless ViT inside :class:`TimmWithOwnHead`."""
    native = CASES["timm_vit"].model().double().eval()
    headless = CASES["timm_vit"].model().double().eval()
    headless.reset_classifier(0)
    return native, TimmWithOwnHead(headless, native.head).eval()


def hf_pair() -> tuple[nn.Module, nn.Module]:
    """An HF ViT classifier and its ``ViTModel`` (shared modules) inside :class:`HFWithOwnHead`."""
    native = hf_vit("eager")().double().eval()
    return native, HFWithOwnHead(native.vit, native.classifier).eval()


@pytest.mark.parametrize("pair", [timm_pair, hf_pair], ids=["timm", "hf_bare"])
@pytest.mark.parametrize("method,options", BLOCK_ROWS, ids=[f"{m}{o}" for m, o in BLOCK_ROWS])
def test_wrapper_equals_the_family_adapter(pair, method, options):
    native, wrapped = pair()
    explainer = attnx.Explainer(wrapped)
    assert explainer.adapter.name == "intercept"
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = [2, 5]
    ours = explainer.explain(x, method=method, target=target, **options).scores
    reference = attnx.explain(native, x, method=method, target=target, **options).scores
    assert reference.abs().max() > 0 and ours.std() > 0
    assert (ours - reference).abs().max() <= TOL * reference.abs().max()


def test_wrapper_is_left_as_found():
    """The per-layer readouts run the wrapper again with a hook on its last block: none is left."""
    _, wrapped = hf_pair()
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in wrapped.modules()]
    attnx.explain(wrapped, torch.randn(1, 3, 32, 32, dtype=torch.float64), method="legrad", target=1, start_layer=0)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in wrapped.modules()] == hooks


def test_two_backbones_in_one_wrapper_are_refused_in_one_line():
    """An ensemble of two known backbones: whose blocks the attentions are is not known."""

    class Ensemble(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = CASES["timm_vit"].model(), CASES["timm_vit"].model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    with pytest.raises(UnsupportedModelError, match="does not name the blocks") as err:
        attnx.explain(Ensemble().eval(), torch.randn(1, 3, 32, 32), method="attcat", target=1)
    assert "\n" not in str(err.value)

