"""User LRP presets: ``attnx.lrp.register_preset(name, builder)``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnx
from attnx.errors import AttnxTypeError, AttnxValueError
from attnx.lrp import Registry, get_preset, register_preset, rules, unregister_preset


class Model(nn.Module):
    """A linear head on the mean of two linear layers' outputs: relevance reaches the input in
    closed form."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.first = nn.Linear(6, 5)
        self.second = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


@pytest.fixture
def preset_name():
    name = "test-plain-gradient"
    yield name
    unregister_preset(name)


def plain_gradient_registry() -> Registry:
    """Every module and function by plain autograd: the input relevance is gradient x input."""
    reg = Registry("test-plain-gradient", seed="logit", conserving=False)
    reg.register(nn.Linear, rules.Passthrough())
    reg.register(nn.ReLU, rules.Passthrough())
    reg.register(torch.relu, rules.Passthrough())
    return reg


def test_a_registered_preset_is_found_by_name_and_used_by_the_lrp_engine(preset_name):
    register_preset(preset_name, plain_gradient_registry)
    assert preset_name in attnx.lrp.presets
    registry = get_preset(preset_name)
    assert isinstance(registry, Registry) and registry.name == "test-plain-gradient"
    assert get_preset(preset_name) is not registry  # each pass gets its own registry

    model = Model().double().eval()
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.enable_grad(), attnx.lrp.LRPEngine(model, preset_name) as engine:
        root = engine.track(x)
        logits = model(root)
    seed = torch.zeros_like(logits)
    seed[:, 1] = 1
    (g,) = torch.autograd.grad(logits, root, seed)
    engine.release()
    xx = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(xx)[:, 1].sum(), xx)
    assert torch.allclose(root * g, x * expected, atol=1e-12)


def test_the_lrp_method_takes_a_user_preset_by_name(preset_name):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                              num_classes=3).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    built = []

    def builder() -> Registry:
        built.append(1)
        return get_preset("attnlrp").copy("mine")

    register_preset(preset_name, builder)
    mine = attnx.explain(model, x, method="lrp", preset=preset_name, target=[0, 1])
    reference = attnx.explain(model, x, method="lrp", preset="attnlrp", target=[0, 1])
    assert built == [1]  # the registry is resolved once per explanation
    assert mine.options["preset"] == "mine" and mine.coverage.preset == "mine"
    assert torch.allclose(mine.input_relevance, reference.input_relevance, atol=1e-12)


def test_unknown_and_bad_presets_are_refused(preset_name):
    with pytest.raises(AttnxValueError, match="unknown LRP preset 'nope'"):
        get_preset("nope")
    with pytest.raises(AttnxTypeError, match="expected a function returning an attnx.lrp.Registry"):
        register_preset(preset_name, get_preset("attnlrp"))
    with pytest.raises(AttnxTypeError, match="non-empty string"):
        register_preset("", plain_gradient_registry)
    register_preset(preset_name, lambda: "not a registry")
    with pytest.raises(AttnxTypeError, match="returned str, not an attnx.lrp.Registry"):
        get_preset(preset_name)
