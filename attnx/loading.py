"""Load models for the command line and notebooks: timm names, torchvision names, Hugging Face ids
or folders, saved checkpoints, and the embedded default models (no network needed for those).

Hub models need a network the first time (timm ``pretrained=True``, torchvision weights,
``from_pretrained``); the embedded defaults are trained by the project and ship with it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["Loaded", "load_model", "MODEL_KINDS"]

MODEL_KINDS = {
    "default": "the embedded default model (vision for images, text for --text); no network needed",
    "timm:NAME or NAME": "a timm model with pretrained weights, e.g. vit_base_patch16_224, deit_small_patch16_224",
    "torchvision:NAME": "a torchvision model with its default weights, e.g. torchvision:vit_b_16",
    "hf:ID or ID/with/slash": "a Hugging Face image or text classifier id, e.g. google/vit-base-patch16-224, "
    "or a causal language model (GPT-2, Llama, Qwen, Gemma, Phi-3, ...), e.g. openai-community/gpt2",
    "PATH/": "a local Hugging Face folder (config.json + weights)",
    "PATH.pt": "a checkpoint saved with torch.save(model) (a whole nn.Module)",
}


@dataclass
class Loaded:
    """A model ready to explain, with what is needed to feed it and to name its classes."""

    model: nn.Module
    kind: str  # "image" or "text"
    class_names: list[str] | None = None
    preprocess: Callable[[Any], torch.Tensor] | None = None  # PIL image -> (C, H, W) tensor
    tokenizer: Any = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    info: dict = field(default_factory=dict)


def _pil_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Callable:
    from torchvision.transforms import functional as TF

    def f(img):
        img = img.convert("RGB").resize((size[1], size[0]))
        return TF.normalize(TF.to_tensor(img), mean, std)

    return f


def _timm(name: str) -> Loaded:
    import timm

    model = timm.create_model(name, pretrained=True).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    names = None
    if getattr(model, "num_classes", 0) == 1000:
        names = list(timm.data.ImageNetInfo().label_descriptions())
    return Loaded(model, "image", names, lambda img: transform(img.convert("RGB")), mean=cfg["mean"], std=cfg["std"])


def _torchvision(name: str) -> Loaded:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name, weights=weights).eval()
    transform = weights.transforms()
    return Loaded(model, "image", list(weights.meta.get("categories", [])) or None, transform,
                  mean=transform.mean, std=transform.std)


def _hf(name: str) -> Loaded:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    labels = [config.id2label[i] for i in range(len(config.id2label))] if getattr(config, "id2label", None) else None
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ForCausalLM" in archs or "LMHeadModel" in archs:  # a language model: explain its next token
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name).eval()
        return Loaded(model, "text", None, tokenizer=AutoTokenizer.from_pretrained(name), info={"language_model": True})
    if "SequenceClassification" in archs or getattr(config, "model_type", "") in ("bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(name).eval()
        return Loaded(model, "text", labels, tokenizer=AutoTokenizer.from_pretrained(name))
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(name).eval()
    proc = AutoImageProcessor.from_pretrained(name)
    return Loaded(model, "image", labels, lambda img: proc(img.convert("RGB"), return_tensors="pt")["pixel_values"][0],
                  mean=getattr(proc, "image_mean", None), std=getattr(proc, "image_std", None))


def _checkpoint(path: str) -> Loaded:
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{path} holds a {type(model).__name__}, expected a whole nn.Module saved with torch.save(model)")
    return Loaded(model.eval(), "image", None, None)


def load_model(spec: str | None, kind: str = "image") -> Loaded:
    """Load a model from a specification (see ``MODEL_KINDS``); ``None`` or ``"default"`` gives the
    embedded default model of ``kind`` (``"image"`` or ``"text"``)."""
    if spec in (None, "", "default"):
        from . import zoo

        return zoo.default_text() if kind == "text" else zoo.default_vision()
    if spec.startswith("timm:"):
        return _timm(spec[5:])
    if spec.startswith("torchvision:"):
        return _torchvision(spec[12:])
    if spec.startswith("hf:"):
        return _hf(spec[3:])
    if os.path.isfile(spec) and spec.endswith((".pt", ".pth", ".ckpt")):
        return _checkpoint(spec)
    if os.path.isdir(spec) or "/" in spec:
        return _hf(spec)
    return _timm(spec)
