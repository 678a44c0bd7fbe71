"""The embedded CLIP model (attnx.zoo.clip): shipped whole, loads offline, is a stock ``CLIPModel``, its
tokenizer covers the caption templates, and it matches held-out scenes with their captions far above
chance.

The held-out scenes are the ones shipped with attnx (``zoo.scenes()``: t10k garments, never seen in
training); the accuracies are recomputed here through ``CLIPModel.forward`` (the training script
measured them through ``get_image_features`` / ``get_text_features``), with scenes grouped by a
different rule than the training script's.
"""
from __future__ import annotations

import re
import socket

import pytest
import torch

from attnx import zoo
from attnx.data import CLASS_NAMES
from attnx.data.captions import CLASS_WORDS, Caption, class_prompt, label_set_caption, sample_caption, template_texts
from attnx.zoo import clip as clip_zoo
from attnx.zoo.assets import asset

GROUP = 8


@pytest.fixture(scope="module")
def clip():
    return zoo.clip_model()


@pytest.fixture(scope="module")
def shipped():
    return zoo.scenes()


def garment_set(classes: torch.Tensor) -> tuple[int, ...]:
    return tuple(sorted(int(c) for c in classes if c >= 0))


def groups_of_distinct_sets(scenes, size: int) -> list[list[int]]:
    """Each scene joins the first open group that lacks its garment set; full groups are kept."""
    open_groups: list[list[int]] = []
    full = []
    for i in range(len(scenes)):
        key = garment_set(scenes.classes[i])
        for g in open_groups:
            if all(garment_set(scenes.classes[j]) != key for j in g):
                g.append(i)
                break
        else:
            open_groups.append([i])
        for g in [g for g in open_groups if len(g) == size]:
            open_groups.remove(g)
            full.append(g)
    return full


def similarities(clip, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """``(n_images, n_texts)`` logits of the stock forward."""
    tokens = clip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return clip.model(pixel_values=clip.preprocess(images), **tokens).logits_per_image


# --------------------------------------------------------------------------------------------
# the files and the loader
# --------------------------------------------------------------------------------------------
def test_assets_are_small_and_describe_themselves():
    from safetensors import safe_open

    weights = asset(clip_zoo.WEIGHTS_FILE)
    assert weights.stat().st_size <= 5_000_000
    assert asset(clip_zoo.TOKENIZER_FILE).stat().st_size <= 100_000
    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "F32"}
    info = clip_zoo.read_info()
    assert info["model_class"] == "transformers.CLIPModel"
    vision, text = info["config"]["vision_config"], info["config"]["text_config"]
    assert vision["image_size"] == 64 and vision["patch_size"] == 8 and 64 <= vision["hidden_size"] <= 128
    assert 2 <= vision["num_hidden_layers"] <= 4 and 2 <= text["num_hidden_layers"] <= 4
    assert info["training"]["command"].startswith("python training/train_clip.py")
    held_out = info["metrics"]["held_out"]
    for key, chance in (("retrieval_i2t", "retrieval"), ("retrieval_t2i", "retrieval"),
                        ("zero_shot_top1", "zero_shot_top1"), ("label_set_top1", "label_set_top1")):
        assert held_out[key] > 5 * held_out["chance"][chance], key


def test_a_stock_clip_model_loaded_offline(clip, monkeypatch):
    from transformers import CLIPModel

    assert type(clip.model) is CLIPModel and not clip.model.training
    assert all(p.dtype == torch.float32 for p in clip.model.parameters())
    assert clip.kind == "image_text" and clip.class_names == list(CLASS_NAMES)
    assert clip.info["prompts"][8] == "a photo of a bag" and clip.info["prompts"][9] == "a photo of an ankle boot"
    assert clip.info["caption"]([8, 4]) == "a photo of a coat and a bag"

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    again = zoo.clip_model()
    for (name, a), b in zip(clip.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(line.startswith("clip (image-text): CLIPModel") for line in zoo.describe())


# --------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Lowercase words (hyphens kept) and single punctuation marks, by a regular expression."""
    return re.findall(r"[\w-]+|[^\w\s]", text.lower())


def test_tokenizer_covers_every_template_word_and_nothing_else(clip):
    tok = clip.tokenizer
    texts = template_texts()
    vocabulary = {w for t in texts for w in words(t)}
    assert set(tok.get_vocab()) == vocabulary | set(clip_zoo.SPECIALS)
    assert {"bag", "t-shirt", "ankle", "boot", "where", "?", "left"} <= vocabulary
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == ["[BOS]", *words(text), "[EOS]"]
        assert tok.decode(ids, skip_special_tokens=True).split() == words(text)
    assert len(tok) == clip.model.config.text_config.vocab_size
    assert tok.eos_token_id == clip.model.config.text_config.eos_token_id != 2  # pooled at the first [EOS]
    assert tok.convert_ids_to_tokens(tok("Where is the HAT?")["input_ids"]) == \
        ["[BOS]", "where", "is", "the", "[UNK]", "?", "[EOS]"]


def test_tokenizer_pads_on_the_right_and_padding_leaves_embeddings_alone(clip):
    tok = clip.tokenizer
    texts = ["a bag", "where is the ankle boot?", "a sneaker on the left and a coat on the right"]
    batch = tok(texts, padding=True, return_tensors="pt")
    lengths = [len(words(t)) + 2 for t in texts]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, n in zip(range(3), lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["input_ids"][row, n - 1] == tok.eos_token_id
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
    with torch.no_grad():
        together = clip.model.get_text_features(**batch).pooler_output
        for row, text in enumerate(texts):
            alone = clip.model.get_text_features(**tok([text], return_tensors="pt")).pooler_output
            torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------
def test_sampled_captions_are_true_of_their_scene(shipped):
    import random

    rng = random.Random(0)
    for i in range(len(shipped)):
        classes, boxes = shipped.classes[i], shipped.boxes[i]
        for _ in range(5):
            cap = sample_caption(classes, boxes, 64, rng)
            assert cap.fits(classes, boxes, 64), cap
            toks = words(cap.text)
            named = {c for c, w in enumerate(CLASS_WORDS)
                     if any(toks[k:k + len(w.split())] == w.split() for k in range(len(toks)))}
            assert named == set(cap.named), cap
    # a caption of one scene is not true of a scene with other garments
    bag_coat = Caption("a bag and a coat", (8, 4), True)
    assert bag_coat.fits(torch.tensor([4, 8]), torch.zeros(2, 4), 64)
    assert not bag_coat.fits(torch.tensor([8, -1]), torch.zeros(2, 4), 64)
    left = Caption("a bag to the left of a coat", (8, 4), True, ((8, "left"), (4, "right")))
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0], [33.0, 10.0, 30.0, 30.0]])
    assert left.fits(torch.tensor([8, 4]), boxes, 64) and not left.fits(torch.tensor([4, 8]), boxes, 64)


# --------------------------------------------------------------------------------------------
# held-out accuracy, recomputed
# --------------------------------------------------------------------------------------------
def test_retrieval_on_held_out_scenes_is_far_above_chance(clip, shipped):
    """Image -> text and text -> image among 8 scenes with different garments (chance 1/8)."""
    groups = groups_of_distinct_sets(shipped, GROUP)
    assert len(groups) >= 5
    i2t = t2i = n = 0
    for g in groups:
        sim = similarities(clip, shipped.images[g], [label_set_caption(shipped.classes[i]) for i in g])
        i2t += int((sim.argmax(1) == torch.arange(GROUP)).sum())
        t2i += int((sim.argmax(0) == torch.arange(GROUP)).sum())
        n += GROUP
    assert i2t / n >= 0.6 and t2i / n >= 0.6, (i2t / n, t2i / n)  # chance 0.125


def test_zero_shot_classification_of_one_garment_scenes(clip, shipped):
    one = (shipped.num_objects == 1).nonzero()[:, 0]
    sim = similarities(clip, shipped.images[one], [class_prompt(c) for c in range(10)])
    accuracy = float((sim.argmax(1) == shipped.classes[one, 0]).float().mean())
    assert accuracy >= 0.6, accuracy  # chance 0.1


def test_where_is_the_garment_prefers_the_garments_present(clip, shipped):
    """"where is the {garment}?" scores the two garments of a two-garment scene above the eight absent."""
    two = (shipped.num_objects == 2).nonzero()[:, 0]
    sim = similarities(clip, shipped.images[two], [class_prompt(c, "where is {the}?") for c in range(10)])
    present = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, shipped.classes[two], True)
    # the weaker of the two present garments against the strongest absent one
    margin = sim.masked_fill(~present, float("inf")).amin(1) - sim.masked_fill(present, float("-inf")).amax(1)
    assert float((margin > 0).float().mean()) >= 0.4  # chance 1/45
    # the mean rank (0 = best) of a present garment among the ten
    ranks = sim.argsort(1, descending=True).argsort(1)
    assert float(ranks[present].float().mean()) < 2.0  # chance 4.5
