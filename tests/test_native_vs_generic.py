"""The generic adapter (SDPA / MHA interception) sees what the native adapters see.

``Explainer(model).capture(x, gradients=True)`` and ``Explainer(model, adapter="intercept")``
must give the same attentions and ``∂y/∂A`` (max abs difference ≤ 1e-5, float32) and the same
scores for every method. The generic adapter can only see models that call
``F.scaled_dot_product_attention`` / ``F.multi_head_attention_forward``: a timm model with
``fused_attn=False`` or a Hugging Face model loaded with the eager kernel is compared against
the same weights with the SDPA path on (and the generic adapter refuses the former clearly).
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import attnx
from attnx.errors import UnsupportedModelError
from conftest import ALL, CASES, GENERIC_OK, ids, max_abs_diff

TOL = 1e-5


@contextlib.contextmanager
def sdpa_path(case, model):
    """The same model (same weights) running its SDPA kernel."""
    if case.fused is False:
        attns = [m for m in model.modules() if hasattr(m, "fused_attn")]
        for a in attns:
            a.fused_attn = True
        try:
            yield model
        finally:
            for a in attns:
                a.fused_attn = False
    elif case.attn_implementation == "eager":
        twin = copy.deepcopy(model)
        twin.set_attn_implementation("sdpa")
        yield twin
    else:
        yield model


def inputs_of(case, padded: bool, dtype=torch.float32):
    return case.inputs(3, dtype=dtype, lengths=([9, 5, 2] if padded else None) if case.is_text else None)


PARAMS = [(c, False) for c in ALL] + [(c, True) for c in ALL if c.is_text]
PARAM_IDS = [c.name + ("-padded" if p else "") for c, p in PARAMS]


@pytest.mark.parametrize("case,padded", PARAMS, ids=PARAM_IDS)
def test_same_attentions_and_gradients(case, padded):
    model = case.model()
    x = inputs_of(case, padded)
    native_explainer = attnx.Explainer(model)
    assert native_explainer.adapter.name == case.adapter
    native = native_explainer.capture(x, target=[1, 3, 0], gradients=True)
    with sdpa_path(case, model) as sdpa_model:
        generic_explainer = attnx.Explainer(sdpa_model, adapter="intercept")
        assert generic_explainer.adapter.name == "intercept"
        generic = generic_explainer.capture(x, target=[1, 3, 0], gradients=True)
    assert len(native.attentions) == len(generic.attentions) == 3
    assert native.layout.prefix_tokens == generic.layout.prefix_tokens
    assert native.layout.grid == generic.layout.grid
    assert native.layout.readout == generic.layout.readout
    assert max_abs_diff(native.logits, generic.logits) <= TOL
    for l in range(3):
        assert max_abs_diff(native.attentions[l], generic.attentions[l]) <= TOL, f"A, layer {l}"
        assert native.gradients[l].abs().max() > 1e-3
        assert max_abs_diff(native.gradients[l], generic.gradients[l]) <= TOL, f"dy/dA, layer {l}"


@pytest.mark.parametrize("case,padded", PARAMS, ids=PARAM_IDS)
def test_same_scores_for_every_method(case, padded):
    # float64: LRP-based methods amplify float32 rounding differences beyond 1e-5 (DESIGN.md §4)
    model = case.model(torch.float64)
    x = inputs_of(case, padded, torch.float64)
    native = attnx.Explainer(model)
    with sdpa_path(case, model) as sdpa_model:
        generic = attnx.Explainer(sdpa_model, adapter="intercept")
        for method in attnx.list_methods():
            a = native.explain(x, method=method)
            b = generic.explain(x, method=method)
            assert a.targets.tolist() == b.targets.tolist()
            scale = max(1.0, a.scores.abs().max().item())
            assert max_abs_diff(a.scores, b.scores) <= TOL * scale, method


@pytest.mark.parametrize("case", [c for c in ALL if c not in GENERIC_OK], ids=ids([c for c in ALL if c not in GENERIC_OK]))
def test_generic_refuses_models_without_sdpa_clearly(case):
    """A model that never calls SDPA / MHA gets an error naming the adapters, not a wrong answer."""
    model = case.model()
    with pytest.raises(UnsupportedModelError, match=r"no attention was observed.*'timm_vit'.*'intercept'"):
        attnx.Explainer(model, adapter="intercept").explain(case.inputs(2), method="rollout")


def test_intercept_adapter_without_a_family_infers_the_layout():
    """A wrapped timm model (no adapter matches the wrapper) is explained by the intercept adapter,
    which infers prefix tokens and grid from the token count and the image size."""
    from conftest import CASES

    case = CASES["timm_dynamic_40x56"]
    inner = case.model()

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return {"logits": self.m(x)}["logits"]

    wrapped = Wrapper(inner)
    explainer = attnx.Explainer(wrapped)
    assert explainer.adapter.name == "intercept"
    x = case.inputs(2)
    e = explainer.explain(x, method="grad_rollout", target=[2, 5])
    assert e.grid == (5, 7) and e.layout.prefix_tokens == 1 and e.layout.readout == 0
    native = attnx.Explainer(inner).explain(x, method="grad_rollout", target=[2, 5])
    assert max_abs_diff(e.scores, native.scores) <= TOL * max(1.0, native.scores.abs().max().item())


def test_generic_is_the_former_name_of_intercept():
    case = CASES["timm_vit"]
    with pytest.warns(DeprecationWarning, match="now called 'intercept'"):
        explainer = attnx.Explainer(case.model(), adapter="generic")
    assert explainer.adapter.name == "intercept"


class HandWrittenViT(torch.nn.Module):
    """Research-code style: 8-pixel patches, no class token, mean-pooled head, attention through SDPA."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv2d(3, 16, 8, stride=8)
        self.qkv = torch.nn.Linear(16, 48)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, 16) on 32x32 images
        q, k, v = self.qkv(t).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        t = t + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.head(t.mean(1))


@pytest.mark.parametrize("method", ["lrp", "gradient_x_input", "rollout"])
def test_grid_of_a_hand_written_vit_with_8_pixel_patches(method):
    """The grid comes from the model (token count, patch embedding), never from a constant."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    e = attnx.explain(HandWrittenViT(), x, method=method)
    assert e.grid == (4, 4) and e.scores.shape == (2, 16)


def test_patch_size_that_disagrees_with_the_model_is_an_error():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"patch_size=16 disagrees with the model's patch grid \(4, 4\)"):
        attnx.explain(CASES["timm_vit"].model(), CASES["timm_vit"].inputs(2), method="lrp", patch_size=16)
