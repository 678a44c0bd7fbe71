"""The family matrix: every timm and Hugging Face ViT-like image classifier family, tiny and random,
at its default head and pooling.

For each family: the readout equals the head's pooling (the rows where the target logit's
gradient with respect to the last block's token states is non-zero, computed here with a hook of
the test's own, and, where those row gradients are parallel -- a linear pooling -- their ratios
as the weights); the explained logits equal the model's own; every method tried gives a finite,
non-constant map or is refused by type (an ``AttnxError``). Families whose attention is not one
stack of global self-attention over the patches are refused by type. docs/readout.md lists what
each family gets.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import transformers as T
from torch import nn

import attnx
from attnx.errors import AttnxError
from conftest import randomize_

SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
TARGET = [1, 3]
QUICK_METHODS = ("rollout", "generic")

#: timm registry name -> (constructor overrides, expected readout description)
TIMM = {
    "vit_tiny_patch16_224": ({}, "class token"),
    "vit_medium_patch16_gap_256": ({}, "mean of 16 patch tokens"),
    "vit_base_patch16_reg4_gap_256": ({}, "mean of 16 patch tokens"),
    "vit_small_patch14_reg4_dinov2": ({}, "class token"),
    "vit_base_patch16_siglip_224": ({}, "probe attention (MAP head)"),
    "vit_base_patch16_clip_224": ({}, "class token"),
    "deit_tiny_patch16_224": ({}, "class token"),
    "deit3_small_patch16_224": ({}, "class token"),
    "deit_tiny_distilled_patch16_224": ({}, "mean of class and distillation tokens"),
    "flexivit_small": ({}, "class token"),
    "vit_relpos_small_patch16_224": ({}, "mean of 16 patch tokens"),
    "vit_srelpos_small_patch16_224": ({}, "mean of 16 patch tokens"),
    "beit_base_patch16_224": ({}, "mean of 16 patch tokens"),
    "beitv2_base_patch16_224": ({}, "mean of 16 patch tokens"),
    "eva02_tiny_patch14_224": ({}, "mean of 16 patch tokens"),
    "eva_giant_patch14_224": ({}, "mean of 16 patch tokens"),
    "vit_base_patch16_rope_reg1_gap_256": ({}, "mean of 16 patch tokens"),
    "vit_pe_core_tiny_patch16_384": ({}, "probe attention (MAP head)"),
    "aimv2_large_patch14_224": ({}, "mean of 16 patch tokens"),
    "naflexvit_base_patch16_gap": ({}, "mean of 16 patch tokens (measured rows, equal weights)"),
}
#: timm families whose attention is not one stack of global self-attention over patch tokens
TIMM_REFUSED = ["cait_xxs24_224", "xcit_nano_12_p16_224", "levit_128s", "pit_ti_224"]


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights may give a DegenerateMapWarning; maps are checked below
        yield


def images(B: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(0))


def timm_model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=5, **{**SMALL, **kw})
    except TypeError:  # families without these constructor arguments: their default config at 32 px
        model = timm.create_model(name, pretrained=False, num_classes=5, img_size=32)
    return randomize_(model).eval()  # O(1) gradients: timm's init makes maps flat at float32 precision


def last_state_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, N, D)``: the gradient of each sample's target logit with respect to the token states
    the last block outputs (an ``nn.ModuleList`` of blocks found by the test, hooked by it)."""
    lists = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0]
    blocks = [m for m in lists if all(type(b).__name__.endswith(("Block", "Layer")) for b in m)]
    last = blocks[-1][-1]
    kept = {}
    handle = last.register_forward_hook(lambda m, a, out: kept.__setitem__("states", out[0] if isinstance(out, tuple) else out))
    try:
        out = model(x)
    finally:
        handle.remove()
    logits = getattr(out, "logits", out)
    (g,) = torch.autograd.grad(logits[torch.arange(len(TARGET)), torch.tensor(TARGET)].sum(), kept["states"])
    return g.detach().to(torch.float64)


def check_readout_is_the_heads(e, g: torch.Tensor) -> None:
    """The rows with weight are the rows the head's gradient reaches; for a linear pooling (row
    gradients parallel) the weights are the gradient's ratios."""
    norms = g.abs().sum(-1)
    read = norms > 1e-6 * norms.amax(-1, keepdim=True)
    assert torch.equal(e.readout.weights != 0, read)
    for b, gb in enumerate(g):
        S = torch.linalg.svdvals(gb)
        if len(S) > 1 and S[1] <= 1e-6 * S[0]:
            c = gb @ torch.linalg.svd(gb, full_matrices=False).Vh[0]
            torch.testing.assert_close(e.readout.weights[b], c / c.sum(), atol=1e-6, rtol=1e-5)


def check_map(e, warned: list | None = None) -> None:
    """A finite map, non-constant for every sample -- or, for methods that keep a positive part only
    (attn_gradcam's ReLU) on random weights, a constant one the user was warned about."""
    s = e.scores
    assert torch.isfinite(s).all()
    if not (s.amax(1) > s.amin(1)).all():
        assert any(issubclass(w.category, attnx.errors.DegenerateMapWarning) for w in warned or []), \
            f"{e.method}: a constant map without a warning"


def model_logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def check_family(model: nn.Module, x: torch.Tensor, description: str, methods=QUICK_METHODS, explainer=None) -> None:
    explainer = explainer or attnx.Explainer(model)
    g = last_state_gradient(model, x)
    reference = model_logits(model, x)
    for method in methods:
        try:
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                e = explainer(x, method=method, target=TARGET)
        except AttnxError:
            assert method not in QUICK_METHODS, f"{method} refused"
            continue
        torch.testing.assert_close(e.logits, reference, atol=1e-5, rtol=1e-5)
        check_map(e, warned)
        if e.readout is not None:
            assert e.readout.description == description
            check_readout_is_the_heads(e, g)


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_family(name):
    overrides, description = TIMM[name]
    check_family(timm_model(name, **overrides), images(), description)


@pytest.mark.parametrize("name", TIMM_REFUSED)
def test_timm_family_refused_by_type(name):
    model = timm_model(name)
    for method in QUICK_METHODS:
        with pytest.raises(AttnxError):
            attnx.explain(model, images(), method=method, target=TARGET)


def hf(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, num_labels=5)
    return lambda: randomize_(model_cls(config_cls(**{**cfg, **kw}))).eval()


def hf_dual(config_cls, model_cls):
    v = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return lambda: randomize_(model_cls(config_cls(vision_config=v, text_config=text, num_labels=5))).eval()


def hf_swin(config_cls, model_cls):
    return lambda: randomize_(model_cls(config_cls(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                   num_heads=[2, 2], window_size=4, num_labels=5))).eval()


#: Hugging Face family -> (builder, adapter, expected readout description)
HF = {
    "ViT": (hf(T.ViTConfig, T.ViTForImageClassification), None, "class token"),
    "DeiT": (hf(T.DeiTConfig, T.DeiTForImageClassification), None, "class token"),
    "DeiTWithTeacher": (hf(T.DeiTConfig, T.DeiTForImageClassificationWithTeacher), None,
                        "mean of class and distillation tokens"),
    "BEiT-mean": (hf(T.BeitConfig, T.BeitForImageClassification, use_mean_pooling=True), None, "mean of 16 patch tokens"),
    "BEiT-cls": (hf(T.BeitConfig, T.BeitForImageClassification, use_mean_pooling=False), None, "class token"),
    "Data2VecVision": (hf(T.Data2VecVisionConfig, T.Data2VecVisionForImageClassification, use_mean_pooling=True),
                       "intercept", "mean of 16 patch tokens"),
    "Dinov2": (hf(T.Dinov2Config, T.Dinov2ForImageClassification), None, "class token and mean of 16 patch tokens"),
    "Dinov2WithRegisters": (hf(T.Dinov2WithRegistersConfig, T.Dinov2WithRegistersForImageClassification,
                               num_register_tokens=4), None, "class token and mean of 16 patch tokens"),
    "ViTMSN": (hf(T.ViTMSNConfig, T.ViTMSNForImageClassification), None, "class token"),
    "IJepa": (hf(T.IJepaConfig, T.IJepaForImageClassification), None, "mean of 16 patch tokens"),
    "CLIP": (hf_dual(T.CLIPConfig, T.CLIPForImageClassification), None, "mean of 16 patch tokens"),
    "Siglip": (hf_dual(T.SiglipConfig, T.SiglipForImageClassification), None, "mean of 16 patch tokens"),
    "Swin": (hf_swin(T.SwinConfig, T.SwinForImageClassification), None, "mean of 16 patch tokens"),
    "Swinv2": (hf_swin(T.Swinv2Config, T.Swinv2ForImageClassification), None, "mean of 16 patch tokens"),
}


@pytest.mark.parametrize("name", list(HF))
def test_hf_family(name):
    build, adapter, description = HF[name]
    model = build()
    x = images()
    explainer = attnx.Explainer(model, adapter=adapter)
    if name.startswith("Swin"):  # the readout rows are those of the last stage, whose blocks are hooked
        e = explainer(x, method="rollout", target=TARGET)
        assert e.readout.description == description
        torch.testing.assert_close(e.logits, model_logits(model, x), atol=1e-5, rtol=1e-5)
        check_map(e)
        return
    check_family(model, x, description, explainer=explainer)


def test_hf_data2vec_with_its_sdpa_kernel_is_refused_by_type_by_the_hf_adapter():
    model = HF["Data2VecVision"][0]()
    with pytest.raises(attnx.errors.UnsupportedModelError, match="adapter='intercept'"):
        attnx.explain(model, images(), method="rollout")


@pytest.mark.parametrize("build", [
    lambda: T.PvtForImageClassification(T.PvtConfig(image_size=32, num_labels=5, hidden_sizes=[16] * 4,
                                                     num_attention_heads=[1] * 4, depths=[1] * 4)).eval(),
    lambda: T.LevitForImageClassification(T.LevitConfig(image_size=32, num_labels=5)).eval(),
], ids=["Pvt", "Levit"])
def test_hf_hierarchical_families_refused_by_type(build):
    with pytest.raises(AttnxError):
        attnx.explain(build(), images(), method="rollout")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "beit_base_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "vit_base_patch16_siglip_224", "HF:Dinov2"])
def test_every_method(name):
    """The whole method list on a few families: a finite, non-constant map or a typed refusal."""
    if name.startswith("HF:"):
        build, _, description = HF[name[3:]]
        model = build()
    else:
        model, description = timm_model(name), TIMM[name][1]
    check_family(model, images(), description, methods=attnx.list_methods())
