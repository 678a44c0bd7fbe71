"""``attnx explain photo.jpg --model CLIP --text "a cat" "a dog"``: one map per prompt, offline.

A tiny random CLIP / SigLIP is saved with ``save_pretrained`` beside a word-level tokenizer and an
image processor, and loaded by the command as a user's folder would be; OpenCLIP is loaded by
architecture name without pretrained weights (``open_clip:ARCH``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from PIL import Image

from attnx import zoo
from cli_runner import run
from clip_models import BOS, EOT, hf_clip, hf_siglip

WORDS = ["a", "cat", "dog", "photo", "of"]


def save_folder(path, model) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{w: 3 + i for i, w in enumerate(WORDS)}, "<bos>": BOS, "<eot>": EOT}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eot>", special_tokens=[("<bos>", BOS), ("<eot>", EOT)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eot>")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def photo(path) -> str:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("build", [hf_clip, hf_siglip], ids=["clip", "siglip"])
def test_explain_writes_one_map_per_prompt(capsys, tmp_path, build):
    folder = save_folder(tmp_path / "model", build())
    img = photo(tmp_path / "photo.png")
    out = tmp_path / "maps.png"
    status, stdout, stderr = run(capsys, "explain", img, "--model", folder, "--text", "a cat", "a dog",
                                 "--method", "generic", "--out", str(out))
    assert status == 0, stderr
    assert out.is_file() and "'a cat'" in stdout and "'a dog'" in stdout
    # the probabilities printed are the model's own
    loaded = zoo.load(folder)
    assert loaded.kind == "image_text"
    x = loaded.preprocess(Image.open(img))[None]
    # SigLIP pads to its fixed length; CLIP to the longest prompt (the padding after the end of text is never seen)
    padding = dict(padding="max_length", max_length=16) if build is hf_siglip else dict(padding=True)
    with torch.no_grad():
        text = loaded.tokenizer(["a cat", "a dog"], return_tensors="pt", **padding)
        probs = loaded.model(pixel_values=x, **text).logits_per_image.softmax(-1)[0]
    assert f"'a cat' {probs[0]:.2f}, 'a dog' {probs[1]:.2f}" in stdout


@pytest.mark.slow  # a full-size OpenCLIP architecture built by name
def test_explain_open_clip_architecture_and_errors(capsys, tmp_path):
    img = photo(tmp_path / "photo.png")
    out = tmp_path / "oc.png"
    status, stdout, stderr = run(capsys, "explain", img, "--model", "open_clip:ViT-B-32", "--text", "a cat", "a dog",
                                 "--method", "rollout,lrp", "--out", str(out))
    assert status == 0, stderr
    assert out.is_file() and stdout.count("[rollout]") == 1 and stdout.count("[lrp]") == 1
    status, _, stderr = run(capsys, "explain", img, "--model", "open_clip:ViT-B-32", "--text", "a cat", "--target", "0")
    assert status != 0 and "--target and --continuation do not apply" in stderr
    status, _, stderr = run(capsys, "explain", img, "--model", "open_clip:ViT-B-32", "--text", "a cat", "--out", "x.html")
    assert status != 0 and "written as a picture" in stderr


def test_images_and_text_need_a_dual_encoder(capsys, tmp_path):
    img = photo(tmp_path / "photo.png")
    status, _, stderr = run(capsys, "explain", img, "--text", "a cat")
    assert status != 0 and "CLIP-style --model" in stderr



# ------------------------------------------------------------------------------------------------
# the embedded CLIP: --model default-clip
# ------------------------------------------------------------------------------------------------
def test_zoo_load_default_clip_is_the_embedded_clip():
    loaded = zoo.load("default-clip")
    assert loaded.kind == "image_text" and type(loaded.model).__name__ == "CLIPModel"
    reference = zoo.clip_model()
    state = reference.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.tokenizer("where is the bag?")["input_ids"] == reference.tokenizer("where is the bag?")["input_ids"]
    assert "default-clip" in zoo.MODEL_KINDS


def test_explain_default_clip_on_the_shipped_scenes(capsys, tmp_path):
    out = tmp_path / "where.png"
    prompts = ["where is the bag?", "where is the coat?"]
    status, stdout, stderr = run(capsys, "explain", "--model", "default-clip", "--text", *prompts,
                                 "--method", "generic", "--num-scenes", "2", "--out", str(out))
    assert status == 0, stderr
    assert out.is_file() and Image.open(out).size[0] > 3 * 150
    lines = [line for line in stdout.splitlines() if line.startswith("[generic]")]
    assert [line.split(":")[0] for line in lines] == ["[generic] scene0", "[generic] scene1"]
    # the printed probabilities are the stock forward's, on the first scenes of zoo.scenes(2)
    clip = zoo.clip_model()
    text = clip.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = clip.model(pixel_values=clip.preprocess(zoo.scenes(2).images), **text).logits_per_image.softmax(-1)
    for b, line in enumerate(lines):
        assert line.endswith(f"'where is the bag?' {probs[b, 0]:.2f}, 'where is the coat?' {probs[b, 1]:.2f}")


def test_explain_default_clip_on_an_image_file(capsys, tmp_path):
    scenes = zoo.scenes()
    i = int(torch.nonzero(scenes.num_objects == 2)[0])
    path = tmp_path / "scene.png"
    Image.fromarray((scenes.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    out = tmp_path / "maps.png"
    status, stdout, stderr = run(capsys, "explain", str(path), "--model", "default-clip", "--text", "where is the bag?",
                                 "a photo of a coat", "--method", "rollout,lrp", "--out", str(out))
    assert status == 0, stderr
    assert out.is_file() and stdout.count("[rollout] scene:") == 1 and stdout.count("[lrp] scene:") == 1


def test_a_dual_encoder_with_text_alone_asks_for_images(capsys, tmp_path):
    folder = save_folder(tmp_path / "model", hf_clip())
    status, _, stderr = run(capsys, "explain", "--model", folder, "--text", "a cat")
    assert status != 0 and "is a dual encoder: give image files" in stderr
    status, stdout, _ = run(capsys, "models")
    assert status == 0 and stdout.count("default-clip") == 2  # the spec, and the embedded model's line
