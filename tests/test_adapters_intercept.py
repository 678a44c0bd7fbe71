"""The intercept adapter sees what the native adapters see.

``Explainer(model).capture(x, gradients=True)`` and ``Explainer(model, adapter="intercept")``
must give the same attentions and ``∂y/∂A`` (max abs difference ≤ 1e-5, float32) and the same
scores for every method, on both kernels a model can run: its SDPA / ``nn.MultiheadAttention``
kernel (intercepted and written out) and its attention written out by the library itself (timm
with ``fused_attn=False`` set by the user, Hugging Face models loaded with the ``eager`` kernel),
which the intercept adapter recognises by its data flow (a softmax over the key axis multiplied
with the values).
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import attnx
from attnx.core.layout import Readout
from conftest import ALL, CASES, max_abs_diff

pytestmark = pytest.mark.matrix  # the model matrix: one model per architecture in the fast tier (conftest.FAST_CASES)

TOL = 1e-5


@contextlib.contextmanager
def kernel_path(case, model, path):
    """The same model (same weights) running ``path``: ``"sdpa"`` its SDPA / MHA kernel,
    ``"as_built"`` the kernel it was created with (attention written out for unfused timm models
    and Hugging Face ``eager`` models)."""
    if path == "as_built":
        yield model
    elif case.fused is False:
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


def written_out(case):
    """Whether the case's model, as built, writes its attention out (no attention kernel call)."""
    return case.fused is False or case.attn_implementation == "eager"


def inputs_of(case, padded: bool, dtype=torch.float32):
    return case.inputs(3, dtype=dtype, lengths=([9, 5, 2] if padded else None) if case.is_text else None)


PARAMS = [
    pytest.param(c, padded, path, id=c.name + ("-padded" if padded else "") + ("-" + path if written_out(c) else ""))
    for c in ALL
    for padded in ((False, True) if c.is_text else (False,))
    for path in (("sdpa", "as_built") if written_out(c) else ("sdpa",))
]


@pytest.mark.parametrize("case,padded,path", PARAMS)
def test_same_attentions_and_gradients(case, padded, path):
    model = case.model()
    x = inputs_of(case, padded)
    native_explainer = attnx.Explainer(model)
    assert native_explainer.adapter.name == case.adapter
    native = native_explainer.capture(x, target=[1, 3, 0], gradients=True)
    with kernel_path(case, model, path) as sdpa_model:
        generic_explainer = attnx.Explainer(sdpa_model, adapter="intercept")
        assert generic_explainer.adapter.name == "intercept"
        generic = generic_explainer.capture(x, target=[1, 3, 0], gradients=True)
    assert len(native.attentions) == len(generic.attentions) == 3
    assert native.layout.prefix_tokens == generic.layout.prefix_tokens
    assert native.layout.grid == generic.layout.grid
    weights = [Readout(t.layout, 3, torch.device("cpu")).weights for t in (native, generic)]
    assert torch.equal(*weights)
    assert max_abs_diff(native.logits, generic.logits) <= TOL
    for l in range(3):
        assert max_abs_diff(native.attentions[l], generic.attentions[l]) <= TOL, f"A, layer {l}"
        assert native.gradients[l].abs().max() > 1e-3
        assert max_abs_diff(native.gradients[l], generic.gradients[l]) <= TOL, f"dy/dA, layer {l}"


@pytest.mark.parametrize("case,padded,path", PARAMS)
def test_same_scores_for_every_method(case, padded, path):
    # float64: LRP-based methods amplify float32 rounding differences beyond 1e-5 (DESIGN.md §4)
    model = case.model(torch.float64)
    x = inputs_of(case, padded, torch.float64)
    native = attnx.Explainer(model)
    with kernel_path(case, model, path) as sdpa_model:
        generic = attnx.Explainer(sdpa_model, adapter="intercept")
        for method in attnx.list_methods():
            a = native.explain(x, method=method)
            b = generic.explain(x, method=method)
            assert a.targets.tolist() == b.targets.tolist()
            scale = max(1.0, a.scores.abs().max().item())
            assert max_abs_diff(a.scores, b.scores) <= TOL * scale, method


@pytest.mark.parametrize("name", ["timm_vit_unfused", "hf_vit_eager", "hf_bert_eager"])
def test_written_out_attention_is_seen_without_kernel_calls(name):
    """The unfused / eager paths call no attention kernel: what the intercept adapter records
    there comes from the softmax -> matmul data flow alone."""
    case = CASES[name]
    model = case.model()
    seen = []

    class Kernels(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.multi_head_attention_forward):
                seen.append(func)
            return func(*args, **(kwargs or {}))

    x = case.inputs(2)
    with Kernels(), torch.no_grad():  # the model as built, on its own
        model(**x) if case.is_text else model(x)
    assert seen == []
    trace = attnx.Explainer(model, adapter="intercept").capture(x)
    assert len(trace.attentions) == 3


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
    with pytest.raises(ValueError, match=r"patch_size=16 disagrees with the model's patch grid \(4, 4\)"):
        attnx.explain(CASES["timm_vit"].model(), CASES["timm_vit"].inputs(2), method="lrp", patch_size=16)
