"""The embedded vision model: a stock timm ViT that finds Fashion-MNIST garments in cluttered scenes.

:func:`vision_model` returns a **stock** ``timm.models.vision_transformer.VisionTransformer``
(64x64 RGB input, 8x8 patches, class token, ``global_pool='token'``) trained by
``training/train_vision.py`` to recognise Fashion-MNIST garments in cluttered scenes of one or two
garments (:func:`attnx.data.make_scenes`). It is multi-label: one logit per class, a class is
present where ``sigmoid(logit) > 0.5``. Its weights (float16 safetensors) and a JSON sidecar (model
kwargs, normalisation, class names, held-out metrics, the training command) live in
``attnx/zoo/assets``; nothing is downloaded. Because it is the stock timm class, every adapter and method
of attnx applies to it unchanged::

    import attnx
    from attnx import zoo

    vit = zoo.vision_model()
    scenes = zoo.scenes()                         # held-out scenes with exact garment masks
    x = vit.preprocess(scenes.images[:8])         # [0, 1] images -> normalised model input
    e = attnx.explain(vit.model, x, method="transformer_attribution", target=scenes.classes[:8, 0])
    e.heatmap()                                   # (8, 64, 64); compare with scenes.masks

:func:`scenes` needs no Fashion-MNIST files: a small held-out scene set (t10k garments, with labels
and exact per-class masks) ships next to the weights. :func:`attnx.data.make_scenes` composes any
number of new ones from local Fashion-MNIST files.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.scenes import Scenes
from ..errors import AttnxValueError
from .assets import asset
from .bundle import ZooModel

__all__ = [
    "CONFIG_FILE",
    "SCENES_FILE",
    "WEIGHTS_FILE",
    "describe",
    "image_preprocess",
    "multilabel_metrics",
    "read_info",
    "scenes",
    "vision_model",
]

WEIGHTS_FILE = "vit_fashion_scenes.safetensors"
CONFIG_FILE = "vit_fashion_scenes.json"
SCENES_FILE = "fashion_scenes_test.npz"


@lru_cache(maxsize=1)
def read_info() -> dict:
    """The JSON sidecar of the embedded vision model (a fresh copy is not made: do not mutate)."""
    return json.loads(asset(CONFIG_FILE).read_text())


def image_preprocess(size: tuple[int, int], mean, std) -> Callable[[Any], torch.Tensor]:
    """The ``preprocess`` of a model of ``size`` ``(H, W)`` RGB input normalised with ``mean`` / ``std``."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def preprocess(images: Any) -> torch.Tensor:
        """Images -> normalised model input.

        Accepts a PIL image or an ``(H, W, 3)`` numpy array (-> ``(3, h, w)``), or a tensor
        ``(3, H, W)`` / ``(B, 3, H, W)``, float in ``[0, 1]`` or uint8 (-> the same rank). Images of
        another size are resized (bilinear, antialiased) to the model's input size.
        """
        if not isinstance(images, torch.Tensor):
            array = np.asarray(images.convert("RGB") if hasattr(images, "convert") else images)
            if array.ndim == 2:
                array = np.repeat(array[..., None], 3, axis=-1)
            images = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)  # PIL arrays are read-only
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        single = x.dim() == 3
        if single:
            x = x[None]
        if x.dim() != 4 or x.shape[1] != 3:
            raise AttnxValueError(f"expected RGB images (3, H, W) or (B, 3, H, W), got shape {tuple(images.shape)}")
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - mean_t) / std_t
        return x[0] if single else x

    return preprocess


def vision_model(dtype: torch.dtype = torch.float32) -> ZooModel:
    """The embedded vision model and what is needed to use it; no network.

    Parameters
    ----------
    dtype:
        Floating dtype of the returned model (the weights ship in float16).

    Returns
    -------
    ZooModel
        ``model``: a stock ``timm`` ``VisionTransformer`` in eval mode, 10 multi-label logits;
        ``class_names`` (Fashion-MNIST); ``preprocess`` (images -> normalised input, see its
        docstring); ``mean`` / ``std`` (per channel, for ``[0, 1]`` images); ``info``: ``name``,
        ``image_size`` ``(H, W)``, ``multi_label``, ``metrics`` (held-out, as measured by the
        training script), ``model_kwargs`` and ``training``.
    """
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    config = read_info()
    model = VisionTransformer(**config["model_kwargs"])
    state = load_file(str(asset(WEIGHTS_FILE)))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model.to(dtype).eval()
    size = tuple(config["image_size"])
    # timm's own record of the model: its class names (string targets) and preprocessing
    model.pretrained_cfg = {"architecture": "vit_fashion_scenes", "num_classes": len(config["class_names"]),
                            "label_names": list(config["class_names"]), "input_size": (3, *size),
                            "mean": tuple(config["mean"]), "std": tuple(config["std"]), "classifier": "head",
                            "multi_label": True}
    info = {
        "name": "attnx-vit-fashion-scenes",
        "image_size": size,
        "multi_label": True,
        "metrics": config["metrics"],
        "model_kwargs": dict(config["model_kwargs"]),
        "training": config["training"],
    }
    return ZooModel(model, "image", class_names=list(config["class_names"]),
                    preprocess=image_preprocess(size, config["mean"], config["std"]),
                    mean=tuple(config["mean"]), std=tuple(config["std"]), info=info)


def num_scenes() -> int:
    """How many held-out scenes ship with attnx (:func:`scenes`)."""
    with np.load(asset(SCENES_FILE)) as arrays:
        return len(arrays[arrays.files[0]])


def scenes(n: int | None = None) -> Scenes:
    """The held-out scenes that ship with attnx (no Fashion-MNIST files needed).

    Parameters
    ----------
    n:
        ``None``: all of them, in the shipped order (the one-garment half first); an int: the first
        ``n`` of the alternating order (one garment, two garments, one, ...), an even mix.

    Returns
    -------
    attnx.data.Scenes
        ``images (N, 3, 64, 64)`` in ``[0, 1]`` (stored as uint8; the model's input is
        ``vision_model().preprocess(images)``), multi-hot ``labels (N, 10)``, ``masks (N, 10, 64, 64)``
        bool (exact garment pixels per class), ``classes (N, 2)`` (``-1``: no second garment) and
        ``boxes``.
    """
    with np.load(asset(SCENES_FILE)) as arrays:
        shipped = Scenes.from_numpy({k: arrays[k] for k in arrays.files})
    if n is None:
        return shipped
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(shipped):
        raise AttnxValueError(f"n must be an int between 1 and {len(shipped)} (the shipped held-out scenes), got {n!r}")
    half = len(shipped) // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()
    return shipped[order[:n]]


# --------------------------------------------------------------------------------------------
# metrics of a multi-label classifier on scenes
# --------------------------------------------------------------------------------------------
def _average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the precision-recall curve as a step function (``sklearn``'s definition)."""
    if positives.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def multilabel_metrics(logits: torch.Tensor, labels: torch.Tensor, num_objects: torch.Tensor) -> dict[str, float]:
    """Held-out metrics of the embedded vision model's task.

    Parameters
    ----------
    logits, labels:
        ``(N, C)`` logits and multi-hot ground truth.
    num_objects:
        ``(N,)`` number of garments per scene (1 or 2).

    Returns
    -------
    dict
        ``single_exact``: one-garment scenes whose thresholded set (``sigmoid > 0.5``) is exactly the
        true class; ``single_top1``: their arg-max is the true class; ``two_top2``: two-garment
        scenes whose two highest logits are the two true classes; ``two_exact``: their thresholded set
        is exactly the true pair; ``mAP``: mean over classes of the average precision over all scenes.
    """
    logits = logits.detach().float().cpu()
    labels = labels.detach().float().cpu() > 0.5
    num_objects = num_objects.detach().cpu()
    exact = ((logits > 0) == labels).all(1)
    out: dict[str, float] = {}
    one, two = num_objects == 1, num_objects == 2
    if one.any():
        out["single_exact"] = float(exact[one].float().mean())
        out["single_top1"] = float(labels[one].gather(1, logits[one].argmax(1, keepdim=True)).float().mean())
    if two.any():
        top2 = torch.zeros_like(labels[two]).scatter_(1, logits[two].topk(2, dim=1).indices, True)
        out["two_top2"] = float((top2 == labels[two]).all(1).float().mean())
        out["two_exact"] = float(exact[two].float().mean())
    ap = [_average_precision(logits[:, c].numpy(), labels[:, c].numpy()) for c in range(labels.shape[1])]
    out["mAP"] = float(np.nanmean(ap))
    return out


def describe() -> str:
    """One line for ``attnx models``: the architecture and the held-out metrics (from the sidecar)."""
    c = read_info()
    m = c["metrics"]["held_out"]
    k = c["model_kwargs"]
    return (
        f"default (image): timm VisionTransformer {k['img_size']}px/{k['patch_size']}, dim {k['embed_dim']}, "
        f"depth {k['depth']}, {k['num_heads']} heads; Fashion-MNIST garments in cluttered scenes, multi-label; "
        f"held-out exact {m['single_exact']:.1%} (1 garment), top-2 {m['two_top2']:.1%} (2 garments), "
        f"mAP {m['mAP']:.3f}"
    )
