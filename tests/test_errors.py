"""Bad input gets a clear error that says what was expected (DESIGN.md §6)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnx
from attnx.errors import AttnxTypeError, AttnxValueError, UnsupportedModelError
from cli_runner import run
from conftest import CASES, ids

IMAGE_ADAPTERS = [CASES[n] for n in ("timm_vit", "torchvision_vit", "hf_vit_sdpa")]


@pytest.fixture(params=IMAGE_ADAPTERS, ids=ids(IMAGE_ADAPTERS))
def image_case(request):
    return request.param


@pytest.fixture(params=[CASES["hf_bert_sdpa"], CASES["hf_distilbert_eager"]], ids=["bert", "distilbert"])
def text_case(request):
    return request.param


# images ---------------------------------------------------------------------------------------
def test_wrong_channels(image_case):
    x = torch.randn(2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"expects 3 input channels.*\(2, 1, 32, 32\)"):
        attnx.explain(image_case.model(), x)


@pytest.mark.parametrize("name", ["timm_vit", "torchvision_vit", "timm_avgpool"])
def test_wrong_image_size_for_a_fixed_size_model(name):
    with pytest.raises(ValueError, match=r"expects 32x32 images, got 40x56"):
        attnx.explain(CASES[name].model(), torch.randn(2, 3, 40, 56))


def test_timm_error_suggests_dynamic_img_size():
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        attnx.explain(CASES["timm_vit"].model(), torch.randn(1, 3, 48, 48))


def test_hf_image_size_not_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match=r"40x50 is not a multiple of the model's patch size 8"):
        attnx.explain(CASES["hf_vit_sdpa"].model(), torch.randn(1, 3, 40, 50))


def test_single_image_without_batch_dimension(image_case):
    with pytest.raises(ValueError, match=r"single image of shape \(3, 32, 32\).*unsqueeze\(0\)"):
        attnx.explain(image_case.model(), torch.randn(3, 32, 32))


def test_wrong_rank(image_case):
    with pytest.raises(ValueError, match=r"\(B, C, H, W\), got shape \(2, 3, 32, 32, 1\)"):
        attnx.explain(image_case.model(), torch.randn(2, 3, 32, 32, 1))


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"image batch tensor.*got list"):
        attnx.explain(CASES["timm_vit"].model(), [[0.0]])


def test_integer_images():
    with pytest.raises(TypeError, match="floating point"):
        attnx.explain(CASES["timm_vit"].model(), torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_empty_image_batch(image_case):
    with pytest.raises(ValueError, match=r"empty \(B = 0\)"):
        attnx.explain(image_case.model(), torch.randn(0, 3, 32, 32))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_input(image_case, bad):
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 5, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        attnx.explain(image_case.model(), x)


# targets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [CASES["timm_vit"], CASES["hf_bert_eager"]], ids=["timm_vit", "hf_bert_eager"])
@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_target_out_of_range(case, method):
    x = case.inputs(2)
    C = case.num_classes
    with pytest.raises(ValueError, match=rf"target class {C} is out of range: the model has {C} classes \(0..{C - 1}\)"):
        attnx.explain(case.model(), x, method=method, target=C)
    with pytest.raises(ValueError, match=r"target class -1 is out of range"):
        attnx.explain(case.model(), x, method=method, target=[0, -1])


def test_wrong_number_of_targets():
    case = CASES["timm_vit"]
    with pytest.raises(ValueError, match=r"got 3 targets for a batch of 2 samples"):
        attnx.explain(case.model(), case.inputs(2), method="grad_rollout", target=[0, 1, 2])


@pytest.mark.parametrize("target", [1.0, [0.5, 1.0], torch.tensor([0.0, 1.0]), True])
def test_float_or_bool_target(target):
    case = CASES["timm_vit"]
    with pytest.raises(TypeError, match=r"target.*(int|integers)"):
        attnx.explain(case.model(), case.inputs(2), method="grad_rollout", target=target)


def test_callable_target_with_wrong_shape():
    case = CASES["timm_vit"]
    with pytest.raises(ValueError, match=r"callable target must return a tensor of shape \(2,\).*got \(2, 7\)"):
        attnx.explain(case.model(), case.inputs(2), method="grad_rollout", target=lambda out: out)
    with pytest.raises(ValueError, match=r"callable target must return.*got float"):
        attnx.explain(case.model(), case.inputs(2), method="grad_rollout", target=lambda out: 1.0)


# text -----------------------------------------------------------------------------------------
def test_empty_text(text_case):
    x = {"input_ids": torch.zeros(2, 0, dtype=torch.long), "attention_mask": torch.zeros(2, 0, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"text is empty \(T = 0"):
        attnx.explain(text_case.model(), x)


def test_empty_text_batch(text_case):
    x = {"input_ids": torch.zeros(0, 5, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"text batch is empty \(B = 0\)"):
        attnx.explain(text_case.model(), x)


def test_all_zero_attention_mask(text_case):
    x = text_case.inputs(2)
    x["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"no tokens \(its attention_mask is all zeros\)"):
        attnx.explain(text_case.model(), x)


def test_text_without_batch_dimension(text_case):
    x = {k: v[0] for k, v in text_case.inputs(1).items()}
    with pytest.raises(ValueError, match=r"input_ids of shape \(B, T\), got shape \(9,\).*batch dimension"):
        attnx.explain(text_case.model(), x)


def test_text_mask_of_the_wrong_shape(text_case):
    x = text_case.inputs(2)
    x["attention_mask"] = x["attention_mask"][:, :5]
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), expected the shape of input_ids \(2, 9\)"):
        attnx.explain(text_case.model(), x)


def test_text_model_given_an_image_tensor(text_case):
    with pytest.raises(TypeError, match="dict a Hugging Face tokenizer returns"):
        attnx.explain(text_case.model(), torch.randn(2, 3, 32, 32))


def test_text_inputs_without_ids(text_case):
    with pytest.raises(ValueError, match=r"no 'input_ids'"):
        attnx.explain(text_case.model(), {"attention_mask": torch.ones(1, 3, dtype=torch.long)})


# models ---------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_model_without_attention(method):
    with pytest.raises(UnsupportedModelError, match=r"no attention was observed in SmallCNN.*"
                                                    r"\['timm_vit', 'timm_swin', 'torchvision_vit', 'hf_dual_encoder', 'open_clip', 'hf_decoder', 'hf_swin', 'hf', 'intercept'\]"
                                                    r".*register_adapter"):
        attnx.explain(SmallCNN(), torch.randn(2, 3, 16, 16), method=method)


def test_not_a_module():
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got function"):
        attnx.Explainer(lambda x: x)


def test_unknown_adapter_and_adapter_of_another_family():
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'; available: \['timm_vit'"):
        attnx.Explainer(CASES["timm_vit"].model(), adapter="nope")
    with pytest.raises(UnsupportedModelError, match=r"adapter 'timm_vit' does not apply to BertForSequenceClassification"):
        attnx.Explainer(CASES["hf_bert_sdpa"].model(), adapter="timm_vit")


def test_unsupported_model_error_is_a_type_error():
    assert issubclass(UnsupportedModelError, TypeError)


# methods and options --------------------------------------------------------------------------
@pytest.fixture
def timm():
    case = CASES["timm_vit"]
    return attnx.Explainer(case.model()), case.inputs(2)


@pytest.mark.parametrize("name", ["rolout", "", None, 3])
def test_unknown_method(timm, name):
    explainer, x = timm
    with pytest.raises(ValueError, match=r"unknown method .*; available: \['raw_attention', 'rollout'"):
        explainer.explain(x, method=name)


@pytest.mark.parametrize("method,option", [("rollout", "fusion"), ("generic", "discard_ratio"),
                                           ("raw_attention", "start_layer"), ("grad_rollout", "head_fusion")])
def test_unknown_method_option(timm, method, option):
    explainer, x = timm
    with pytest.raises(TypeError, match=rf"method '{method}' got unknown option\(s\) \['{option}'\]; its options:"):
        explainer.explain(x, method=method, **{option: 1})


def test_unknown_option_names_the_known_ones(timm):
    explainer, x = timm
    with pytest.raises(TypeError, match=r"head_fusion='mean', discard_ratio=0.0, start_layer=0"):
        explainer.explain(x, method="rollout", headfusion="max")
    with pytest.raises(TypeError, match=r"its options: start_layer=0, libragrad=False$"):
        explainer.explain(x, method="generic", head_fusion="max")


@pytest.mark.parametrize("method", ["rollout", "raw_attention"])
@pytest.mark.parametrize("fusion", ["avg", "Mean", "", None])
def test_bad_head_fusion(timm, method, fusion):
    explainer, x = timm
    with pytest.raises(ValueError, match=r"head_fusion must be one of \('mean', 'max', 'min'\)"):
        explainer.explain(x, method=method, head_fusion=fusion)


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_bad_discard_ratio(timm, method, ratio):
    explainer, x = timm
    with pytest.raises(ValueError, match=rf"discard_ratio must be in \[0, 1\), got {ratio}"):
        explainer.explain(x, method=method, discard_ratio=ratio)


@pytest.mark.parametrize("method,option", [("rollout", "start_layer"), ("grad_rollout", "start_layer"),
                                           ("raw_attention", "layer"), ("attn_gradcam", "layer")])
@pytest.mark.parametrize("value", [3, -4, 100])
def test_layer_out_of_range(timm, method, option, value):
    """The error names the option the user passed (``layer`` or ``start_layer``)."""
    explainer, x = timm
    with pytest.raises(ValueError, match=rf"^{option} {value} is out of range for a model with 3 layers"):
        explainer.explain(x, method=method, **{option: value})


@pytest.mark.parametrize("method,option", [("rollout", "start_layer"), ("raw_attention", "layer")])
@pytest.mark.parametrize("value", [1.0, "1", True])
def test_layer_of_the_wrong_type(timm, method, option, value):
    explainer, x = timm
    with pytest.raises(TypeError, match=rf"^{option}: expected an int, got"):
        explainer.explain(x, method=method, **{option: value})


def test_valid_edge_options_are_accepted(timm):
    explainer, x = timm
    for kw in ({"start_layer": 2}, {"start_layer": -3}, {"discard_ratio": 0.0}, {"discard_ratio": 0.99}):
        assert torch.isfinite(explainer.explain(x, method="rollout", **kw).scores).all()


# --------------------------------------------------------------------------------------------
# bad inputs of every kind: meta tensors, token ids, lengths, misspelt names
# --------------------------------------------------------------------------------------------
def test_meta_device_inputs():
    model = CASES["timm_vit"].model()
    with pytest.raises(AttnxValueError, match=r"^the inputs are on the meta device \(shapes without values\)"):
        attnx.explain(model, torch.empty(2, 3, 32, 32, device="meta"))
    text = CASES["hf_bert_sdpa"]
    meta_ids = {k: v.to("meta") for k, v in text.inputs().items()}
    with pytest.raises(AttnxValueError, match="meta device"):
        attnx.explain(text.model(), meta_ids)
    with pytest.raises(AttnxValueError, match=r"model's weights are on the meta device \(not loaded\)"):
        attnx.explain(CASES["timm_vit"].model().to("meta"), CASES["timm_vit"].inputs())

def test_discard_ratio_as_a_string(capsys):
    model, x = CASES["timm_vit"].model(), CASES["timm_vit"].inputs()
    with pytest.raises(AttnxTypeError) as info:
        attnx.explain(model, x, method="rollout", discard_ratio="0.5")
    assert str(info.value) == "discard_ratio: expected a number in [0, 1), got '0.5' (a str)"
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--method", "rollout", "--option", "discard_ratio=abc")
    assert status == 2 and err.strip() == "attnx: error: discard_ratio: expected a number in [0, 1), got 'abc'"

def decoder(name: str = "gpt2"):
    from decoder_models import DecoderCase

    case = DecoderCase(name, "lm", "eager")
    return case.model(), case.inputs()

@pytest.mark.parametrize("bad", [60, 1000, -1])
@pytest.mark.parametrize("case", ["hf_bert_sdpa", "hf_distilbert_eager", "gpt2"])
def test_token_ids_outside_the_vocabulary(case, bad):
    model, inputs = decoder() if case == "gpt2" else (CASES[case].model(), CASES[case].inputs())
    inputs = dict(inputs)
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][1, 2] = bad
    with pytest.raises(AttnxValueError) as info:
        attnx.explain(model, inputs, method="rollout")
    assert str(info.value).startswith(f"token id {bad} (sample 1, position 2) is outside the model's vocabulary of "
                                      "60 tokens (0..59)")

@pytest.mark.parametrize("case, limit", [("hf_bert_sdpa", 32), ("hf_roberta_eager", 32), ("hf_distilbert_eager", 32),
                                         ("gpt2", 64)])
def test_text_longer_than_the_position_embeddings(case, limit):
    model = decoder()[0] if case == "gpt2" else CASES[case].model()
    n = limit + 3
    ids = torch.randint(3, 60, (1, n))
    with pytest.raises(AttnxValueError) as info:
        attnx.explain(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, method="rollout")
    assert str(info.value) == (f"{n} tokens, the model takes at most {limit}; truncate with "
                               f"tokenizer(..., truncation=True, max_length={limit})")
    ids = ids[:, :limit]  # the longest text it takes is explained
    e = attnx.explain(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, method="rollout")
    assert e.scores.shape == (1, limit)

def test_misspelt_method_names_the_closest(capsys):
    model, x = CASES["timm_vit"].model(), CASES["timm_vit"].inputs()
    with pytest.raises(AttnxValueError, match=r"unknown method 'gradrollout'.*\(did you mean 'grad_rollout'\?\)"):
        attnx.explain(model, x, method="gradrollout")
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--method", "transformer_atribution")
    assert status == 2 and "(did you mean 'transformer_attribution'?)" in err and "\n" not in err.strip()
    with pytest.raises(AttnxTypeError, match=r"unknown option\(s\) \['head_fushion'\].*did you mean 'head_fusion'"):
        attnx.explain(model, x, method="rollout", head_fushion="max")
