"""The league's class-discrimination column on the embedded CLIP (``attnx.evaluate.image_text``)."""
from __future__ import annotations

import math

import pytest
import torch

import attnx
from attnx import metrics, zoo
from attnx.data.captions import class_prompt
from attnx.errors import AttnxValueError
from attnx.evaluate import image_text as it


@pytest.fixture(scope="module")
def clip_results():
    return it.class_discrimination_column(["generic", "random"], models=("clip",), limit=8, batch_size=8)


def test_two_garment_maps_pair_each_garment_with_the_other():
    scenes = zoo.scenes()
    maps = it.two_garment_maps(scenes, limit=5)
    assert len(maps["scene"]) == 10
    for k in range(10):
        s, t, o = int(maps["scene"][k]), int(maps["target"][k]), int(maps["other"][k])
        assert int(scenes.num_objects[s]) == 2
        assert sorted((t, o)) == sorted(int(c) for c in scenes.classes[s]) and t != o
        assert torch.equal(maps["mask"][k], scenes.masks[s, t]) and torch.equal(maps["mask_other"][k], scenes.masks[s, o])
        assert maps["mask"][k].any() and maps["mask_other"][k].any()
    # the first five two-garment scenes, in order, each twice
    double = [i for i in range(len(scenes)) if int(scenes.num_objects[i]) == 2][:5]
    assert maps["scene"].tolist() == [i for i in double for _ in range(2)]


def test_clip_numbers_are_in_range_and_the_text_makes_the_difference(clip_results):
    generic, random = clip_results["clip"]["generic"], clip_results["clip"]["random"]
    for r in (generic, random):
        assert r["maps"] == 16 and 0.0 <= r["discrimination"] <= 1.0 and r["mass_ratio"] > 0 and r["seconds"] > 0
    # random reads neither the model nor the prompt: the two maps of a scene are the same image's, so
    # exactly one of them wins (ties aside): 0.5 and a ratio of 1
    assert random["discrimination"] == 0.5 and random["mass_ratio"] == pytest.approx(1.0)
    # generic follows the prompt's gradient: most maps put more relevance on the garment asked about
    assert generic["discrimination"] >= 0.7 and generic["mass_ratio"] > 1.5


def test_clip_targets_are_the_class_prompts(clip_results):
    """The same numbers from every (image, prompt) pair explained at once, the garment's prompt picked."""
    clip = zoo.clip_model()
    scenes = zoo.scenes()
    maps = it.two_garment_maps(scenes, limit=8)
    prompts = [class_prompt(c) for c in range(10)]
    assert prompts == clip.info["prompts"]
    x = clip.preprocess(scenes.images[maps["scene"][::2]])
    pair = attnx.explain(clip.model, x, text=prompts, tokenizer=clip.tokenizer, method="generic", towers="image")
    scores = pair.image_scores()  # (S, 10, patches)
    rows = scores[torch.arange(16) // 2, maps["target"]]
    side = int(math.isqrt(rows.shape[1]))
    cd = metrics.class_discrimination(rows.reshape(-1, side, side), maps["mask"], maps["mask_other"])
    a, b = cd.mass_target.double(), cd.mass_other.double()
    assert float((a > b).double().mean()) == clip_results["clip"]["generic"]["discrimination"]
    assert float(a.sum() / b.sum()) == pytest.approx(clip_results["clip"]["generic"]["mass_ratio"], rel=1e-6)


def test_markdown_and_errors(clip_results):
    table = it.to_markdown(clip_results)
    assert table.splitlines()[0] == "| method | CLIP discrim. ↑ | CLIP mass ratio ↑ |"
    assert "| `random` | 0.500 | 1.00 |" in table
    with pytest.raises(AttnxValueError, match="models must be among"):
        it.class_discrimination_column(["generic"], models=("siglip",))
    with pytest.raises(AttnxValueError):
        it.class_discrimination_column(["no_such_method"], models=("clip",))
