"""What goes into and comes out of a model: typed one-line errors for bad inputs and targets, dict
outputs with a ``logits`` entry, embedding outputs (a similarity target is needed), a user's wrapper
around a text model, and Hugging Face output-capturing hooks never left behind."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import transformers as T
from torch import nn

import attnx
from attnx.errors import AttnxError, AttnxTypeError, AttnxValueError

sys.path.insert(0, str(Path(__file__).parent))


def bert(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       num_labels=3, initializer_range=0.3, **kw)
    return T.BertForSequenceClassification(cfg).eval()


def vit(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
                             patch_size=8, depth=2).eval()


IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))


def one_line_error(kind, fn, match):
    with pytest.raises(kind, match=match) as info:
        fn()
    assert isinstance(info.value, AttnxError) and "\n" not in str(info.value)


def test_float_input_ids():
    one_line_error(AttnxTypeError, lambda: attnx.explain(bert(), {"input_ids": IDS.float()}, method="rollout"),
                   r"expected integer input_ids \(token ids, torch.long\), got dtype torch.float32")


def test_out_of_range_token_type_ids():
    one_line_error(AttnxValueError, lambda: attnx.explain(bert(), {"input_ids": IDS, "token_type_ids": torch.full_like(IDS, 5)},
                                                          method="rollout"),
                   r"token_type_ids must be integers in 0..1 .*got values \[5\]")


@pytest.mark.parametrize("target", [2**70, [2**70, 1], -1])
def test_huge_targets(target):
    one_line_error(AttnxValueError, lambda: attnx.explain(bert(), {"input_ids": IDS}, method="generic", target=target),
                   r"target class.* (out of range|must be ints in 0..2)")


@pytest.mark.parametrize("method", ["generic", "lrp"])
def test_constant_callable_target(method):
    one_line_error(AttnxValueError, lambda: attnx.explain(bert(), {"input_ids": IDS}, method=method, target=lambda out: torch.ones(2)),
                   r"(do|does) not depend on the model output")


def test_float64_images_on_a_float32_model():
    one_line_error(AttnxTypeError, lambda: attnx.explain(vit(), torch.randn(2, 3, 32, 32, dtype=torch.float64), method="rollout"),
                   r"the inputs are torch.float64 but the model computes in torch.float32; cast them")


class DictOutput(nn.Module):
    """A research model returning {"logits": ..., "features": ...}."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"features": self.inner.forward_features(x), "logits": self.inner(x)}


@pytest.mark.parametrize("method", ["generic", "lrp"])
def test_dict_outputs_with_logits(method):
    """The map of a {"logits": ...} model equals that of the model inside it, with an int target
    and with a callable reading the dict."""
    model = vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    plain = attnx.Explainer(model, adapter="intercept")(x, method=method, target=[1, 3])
    wrapped = attnx.explain(DictOutput(model), x, method=method, target=[1, 3])
    called = attnx.explain(DictOutput(model), x, method=method, target=lambda out: out["logits"][:, 1] - out["logits"][:, 0])
    reference = attnx.Explainer(model, adapter="intercept")(x, method=method, target=lambda out: out[:, 1] - out[:, 0])
    assert torch.allclose(wrapped.scores, plain.scores, atol=1e-6)
    assert torch.allclose(called.scores, reference.scores, atol=1e-6)


def test_dict_output_without_logits_names_what_was_expected():
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = vit()

        def forward(self, x):
            return {"features": self.inner(x)}

    one_line_error(AttnxTypeError, lambda: attnx.explain(Features(), torch.randn(1, 3, 32, 32), method="rollout"),
                   r"cannot find the logits in a model output of type dict with keys \['features'\]; expected")


class ClassToken(nn.Module):
    """A backbone wrapped to return its class-token embedding (as the zoo's DINOv2 does)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values):
        return self.backbone(pixel_values=pixel_values).pooler_output


def embedding_models() -> dict:
    cfg = T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                         patch_size=8)
    torch.manual_seed(0)
    dino = T.Dinov2Model(cfg).eval()
    return {"hf_dinov2": dino, "wrapped_dinov2": ClassToken(dino), "timm_headless": vit(num_classes=0)}


@pytest.mark.parametrize("method", ["generic", "lrp"])
def test_bert_backbone_without_target_names_the_similarity_targets(method):
    """A BertModel's output is its pooled embedding (no logits)."""
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)).eval()
    one_line_error(AttnxValueError, lambda: attnx.explain(model, {"input_ids": IDS}, method=method),
                   r"BertModel outputs an embedding, not class logits.*attnx.similarity.cosine_to")


@pytest.mark.parametrize("name", ["hf_dinov2", "wrapped_dinov2", "timm_headless"])
@pytest.mark.parametrize("method", ["generic", "lrp"])
def test_embedding_model_without_target_names_the_similarity_targets(name, method):
    model = embedding_models()[name]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    one_line_error(AttnxValueError, lambda: attnx.explain(model, x, method=method),
                   r"outputs an embedding, not class logits.*attnx.similarity.cosine_to.*attnx.similarity.embedding_norm")
    # with a similarity target it is explained; a method that reads no target reports none
    e = attnx.explain(model, x, method=method, target=attnx.similarity.embedding_norm)
    assert e.scores.shape[0] == 2 and torch.isfinite(e.scores).all() and e.targets is None
    assert attnx.explain(model, x, method="rollout").targets is None


def test_classifier_is_not_taken_for_an_embedding_model():
    e = attnx.explain(vit(), torch.randn(2, 3, 32, 32), method="generic")
    assert e.targets is not None and e.targets.shape == (2,)


class TextWrapper(nn.Module):
    """A user's module around a Hugging Face text classifier."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("method", ["lrp", "transformer_attribution", "gradient_x_input"])
def test_wrapper_around_a_text_model_takes_relevance_methods(method):
    """Relevance at the token embeddings of the wrapped model, as explaining it directly gives."""
    model = bert()
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    wrapped = attnx.explain(TextWrapper(model), batch, method=method, target=[0, 2])
    direct = attnx.Explainer(model, adapter="intercept")(batch, method=method, target=[0, 2])
    assert torch.allclose(wrapped.scores, direct.scores, atol=1e-6)


def forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["lrp", "gradient_x_input", "rollout"])
def test_output_attentions_config_leaves_no_hooks(method):
    model = bert(output_attentions=True)
    before = forward_hooks(model)
    attnx.explain(model, {"input_ids": IDS}, method=method)
    assert forward_hooks(model) == before
    assert "_output_capturing_hooks_installed" not in model.__dict__


def test_gradient_x_input_on_clip_towers_gives_no_false_warning():
    """The cosine of a CLIP pair does not change with the scale of the embedding, so an LRP seed
    z * ds/dz sums to 0; gradient x input is the exact gradient and must not warn about it. The
    map equals autograd's gradient x input."""
    from clip_models import WordTokenizer, hf_clip

    model = hf_clip()
    tok = WordTokenizer()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = attnx.explain(model, x, text=["a cat"], tokenizer=tok, method="gradient_x_input", towers="image")
    text = tok(["a cat"])
    leaf = x.clone().requires_grad_(True)
    image = model.get_image_features(pixel_values=leaf, return_dict=True).pooler_output
    with torch.no_grad():
        words = model.get_text_features(**text, return_dict=True).pooler_output
    cos = torch.nn.functional.cosine_similarity(image, words)
    logit = cos * model.logit_scale.exp()
    (grad,) = torch.autograd.grad(logit.sum(), leaf)
    expected = (leaf * grad).detach().sum(1)[0]
    got = e.image.pixel_relevance[0]
    assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()))


def test_vision_backbone_through_intercept_explains_every_patch():
    """A Hugging Face vision backbone (no classifier) through the fallback: the relevance methods
    read the pixels, one score per patch of the grid (its patch embedding is no token embedding)."""
    import transformers as T

    from attnx.core import similarity

    cfg = T.Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)
    model = T.Dinov2Model(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    for method in ("lrp", "gradient_x_input", "generic"):
        e = attnx.explain(model, x, method=method, target=similarity.embedding_norm)
        assert e.layout.grid == (4, 4) and e.scores.shape == (2, 16), method
    e = attnx.explain(model, x, method="gradient_x_input", target=similarity.embedding_norm)
    xx = x.clone().requires_grad_(True)
    y = similarity.embedding_norm(model(pixel_values=xx))
    (g,) = torch.autograd.grad(y.sum(), xx)
    pixels = (g * x).sum(1)  # the 16 patches of 8x8 pixels, summed
    expected = pixels.reshape(2, 4, 8, 4, 8).sum((2, 4)).flatten(1)
    assert torch.allclose(e.scores, expected, rtol=1e-4, atol=1e-6)
