"""The embedded CLIP: a stock Hugging Face ``CLIPModel`` with small towers, trained on captioned garment scenes.

:func:`clip_model` returns a **stock** ``transformers.CLIPModel`` (vision tower: a ViT on 64x64 RGB
scenes with 8x8 patches; text tower: a causal Transformer over a word-level vocabulary of ~50 words;
float16 on disk) trained contrastively by ``training/train_clip.py`` on the scenes of
:func:`attnx.data.make_scenes` paired with generated captions (:mod:`attnx.data.captions`: "a bag
and a coat", "where is the sneaker?", "a coat to the left of a bag", ...). Nothing is downloaded.
Its tokenizer is a ``PreTrainedTokenizerFast``, called the usual way::

    import torch
    from attnx import zoo

    clip = zoo.clip_model()
    scenes = zoo.scenes()                                    # held-out scenes (t10k garments)
    texts = clip.tokenizer(["where is the bag?", "a photo of a coat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(pixel_values=clip.preprocess(scenes.images[:4]), **texts)
    out.logits_per_image                                     # (4, 2) scaled cosine similarities

Words outside the vocabulary (``clip.tokenizer.get_vocab()``) read as ``[UNK]``, which training
never showed the model: ask with the words of the captions. ``clip.info["prompts"]`` holds the
zero-shot prompt of each class ("a photo of a bag"), ``clip.info["caption"]`` writes the caption of a
garment set (:func:`attnx.data.captions.label_set_caption`). The sidecar's held-out metrics are
in ``clip.info["metrics"]``.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Sequence

import torch

from ..data.captions import class_prompt, label_set_caption
from .assets import asset
from .bundle import ZooModel
from .vision import image_preprocess

__all__ = ["FORMAT", "INFO_FILE", "SPECIALS", "TOKENIZER_FILE", "WEIGHTS_FILE", "caption_tokenizer", "clip_model",
           "describe", "load_tokenizer", "read_info"]

NAME = "clip_fashion_scenes"
WEIGHTS_FILE = f"{NAME}.safetensors"
INFO_FILE = f"{NAME}.json"
TOKENIZER_FILE = f"{NAME}_tokenizer.json"
FORMAT = "attnx-clip-1"
#: special tokens, in id order; ``[EOS]`` is not id 2 (transformers' CLIP reads id 2 as the legacy
#: "pool at the largest id" convention)
SPECIALS = ("[PAD]", "[BOS]", "[UNK]", "[EOS]")
MAX_LENGTH = 32


@lru_cache(maxsize=1)
def read_info() -> dict[str, Any]:
    """The JSON sidecar of the shipped weights (cached: do not mutate)."""
    return json.loads(asset(INFO_FILE).read_text(encoding="utf-8"))


def _wrap(tokenizer_object=None, tokenizer_file: str | None = None, max_length: int = MAX_LENGTH):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, tokenizer_file=tokenizer_file, pad_token="[PAD]", unk_token="[UNK]",
        bos_token="[BOS]", eos_token="[EOS]", padding_side="right", truncation_side="right",
        model_max_length=max_length,
    )


def caption_tokenizer(texts: Sequence[str], max_length: int = MAX_LENGTH):
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``texts``.

    NFKC and lowercase; split at whitespace and at every character that is not a letter, digit,
    underscore or hyphen (``"t-shirt"`` stays one word, ``"bag?"`` is ``bag ?``); ``[BOS] words
    [EOS]``; right padding (CLIP's text tower is causal and pools at the first ``[EOS]``).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                   pre_tokenizers.Split(Regex(r"[^\w\-]"), behavior="isolated")])
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))})
    vocab = {w: i for i, w in enumerate(list(SPECIALS) + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", pair="[BOS] $A [EOS] $B [EOS]",
        special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return _wrap(tokenizer_object=tok, max_length=max_length)


def load_tokenizer():
    """The shipped tokenizer (see :func:`caption_tokenizer`)."""
    info = read_info()
    return _wrap(tokenizer_file=str(asset(TOKENIZER_FILE)),
                 max_length=info["config"]["text_config"]["max_position_embeddings"])


def clip_model(device: str | torch.device = "cpu") -> ZooModel:
    """The embedded CLIP model and what is needed to use it; no network.

    Returns
    -------
    ZooModel
        ``model``: a stock ``transformers.CLIPModel`` in eval mode, float32 (the float16 weights
        widened: the model the sidecar's metrics were measured on); ``kind``: ``"image_text"``;
        ``tokenizer``: its ``PreTrainedTokenizerFast``; ``preprocess``: images (tensors in ``[0, 1]``
        or uint8, PIL, numpy) -> ``pixel_values``; ``class_names`` (Fashion-MNIST); ``mean`` /
        ``std``; ``info``: the sidecar plus ``name``, ``image_size``, ``prompts`` (the zero-shot
        prompt of each class) and ``caption`` (garment classes -> their caption).
    """
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    info = read_info()
    if info.get("format") != FORMAT:
        raise RuntimeError(f"{INFO_FILE} has format {info.get('format')!r}, this attnx reads {FORMAT!r}: reinstall attnx")
    model = CLIPModel(CLIPConfig(**info["config"]))
    state = {k: v.float() for k, v in load_file(str(asset(WEIGHTS_FILE))).items()}
    model.load_state_dict(state)
    model.eval().to(device)
    tokenizer = load_tokenizer()
    if len(tokenizer) != model.config.text_config.vocab_size:
        raise RuntimeError(f"{TOKENIZER_FILE} has {len(tokenizer)} tokens, the model {model.config.text_config.vocab_size}")
    size = tuple(info["image_size"])
    extra = {
        "name": "attnx-clip-fashion-scenes",
        "image_size": size,
        "prompts": [class_prompt(c) for c in range(len(info["class_names"]))],
        "caption": label_set_caption,
    }
    return ZooModel(model, "image_text", class_names=list(info["class_names"]), tokenizer=tokenizer,
                    preprocess=image_preprocess(size, info["mean"], info["std"]),
                    mean=tuple(info["mean"]), std=tuple(info["std"]), info=dict(info, **extra))


def describe() -> str:
    """One line for ``attnx models``, from the sidecar (no model is built)."""
    info = read_info()
    v, t = info["config"]["vision_config"], info["config"]["text_config"]
    m = info["metrics"]["held_out"]
    return (f"clip (image-text): CLIPModel, ViT {v['image_size']}px/{v['patch_size']} width {v['hidden_size']} x "
            f"{v['num_hidden_layers']} layers, text {t['hidden_size']} x {t['num_hidden_layers']} layers, "
            f"{t['vocab_size']} words; captioned garment scenes; held-out retrieval among {m['retrieval_candidates']} "
            f"{m['retrieval_i2t']:.1%} image->text / {m['retrieval_t2i']:.1%} text->image, zero-shot "
            f"{m['zero_shot_top1']:.1%} (--model default-clip; Python: attnx.zoo.clip_model())")
