"""Class names a model carries and class targets given by name (attnx.core.labels): a string target
on a classifier without labels is one clear line; names from a Hugging Face ``id2label``, from the
embedded vision model and from timm's ImageNet head, matched forgivingly with a suggestion.
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx import zoo
from attnx.errors import AttnxValueError
from conftest import CASES


def test_string_target_on_a_classifier_without_labels():
    model, x = CASES["timm_vit"].model(), CASES["timm_vit"].inputs()
    with pytest.raises(AttnxValueError) as info:
        attnx.explain(model, x, target="cat")
    msg = str(info.value)
    assert "target 'cat' is a string" in msg and "classifier without class names" in msg
    assert "need a language model" in msg and "model with labels" in msg and "\n" not in msg

def test_string_target_through_the_models_labels():
    model, x = CASES["hf_vit_sdpa"].model(), CASES["hf_vit_sdpa"].inputs()
    model.config.id2label = {i: f"garment {i}" for i in range(7)}
    by_name = attnx.explain(model, x, method="generic", target="garment 3")
    by_index = attnx.explain(model, x, method="generic", target=3)
    assert by_name.targets.tolist() == [3, 3] and torch.equal(by_name.scores, by_index.scores)
    assert attnx.explain(model, x, method="rollout", target=["garment 1", "Garment_5"]).targets.tolist() == [1, 5]
    with pytest.raises(AttnxValueError, match=r"'garmnet 3' is not a class name of ViTForImageClassification "
                                              r"\(7 classes: 'garment 0', .*\); did you mean 'garment 3'"):
        attnx.explain(model, x, target="garmnet 3")

def test_string_target_on_the_embedded_vision_model():
    vit = zoo.vision_model()
    x = vit.preprocess(zoo.scenes(2).images)
    assert attnx.explain(vit.model, x, method="rollout", target="coat").targets.tolist() == [4, 4]
    with pytest.raises(AttnxValueError, match=r"did you mean 'Coat'"):
        attnx.explain(vit.model, x, target="Cot")

def test_timm_imagenet_names():
    import timm

    model = timm.create_model("test_vit", pretrained=False, num_classes=1000).eval()
    from attnx.core.labels import class_names

    names = class_names(model)
    assert len(names) == 1000 and names[281] == "tabby, tabby cat"
    assert attnx.core.labels.class_index("Tabby cat", names) == 281
