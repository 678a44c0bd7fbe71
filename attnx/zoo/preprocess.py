"""One contract for every bundle's ``preprocess``: images in any usual form -> model input.

``bundle.preprocess(images)`` accepts

* one image: a PIL image, a path to an image file (``str`` / ``os.PathLike``), an ``(H, W, 3)``
  uint8 array, or a ``(C, H, W)`` tensor (float in ``[0, 1]`` or uint8) -> a ``(C, h, w)`` float
  tensor;
* several: a list or tuple of such images, or a ``(B, C, H, W)`` tensor -> a ``(B, C, h, w)``
  float tensor,

resized and normalised as the model expects. A single image keeps its rank, as torchvision
and timm transforms do (``model(preprocess(img)[None])``, ``model(preprocess([a, b]))``).

Models whose own transform reads PIL images only (timm, torchvision and Hugging Face processors,
model files) see tensors converted to 8-bit PIL images first; the embedded models resize and
normalise tensors directly.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch

from ..errors import AttnxTypeError, AttnxValueError

__all__ = ["ImagePreprocess"]


class ImagePreprocess:
    """A bundle's ``preprocess`` under the contract of this module.

    Parameters
    ----------
    single:
        The model's own transform of one image (a PIL image, or what ``reads_tensors`` allows)
        to a ``(C, h, w)`` tensor.
    reads_tensors:
        Whether ``single`` takes tensors, arrays and ``(B, C, H, W)`` batches itself (the
        embedded models' preprocessing); else they are converted to PIL images one by one.
    """

    def __init__(self, single: Callable[[Any], torch.Tensor], reads_tensors: bool = False) -> None:
        self.single = single
        self.reads_tensors = reads_tensors

    def __call__(self, images: Any, **options: Any) -> torch.Tensor:
        """``images`` -> model input; ``options`` go to the model's own transform (e.g. the
        DINOv2 bundle's ``size=``)."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise AttnxValueError("expected at least one image, got an empty list")
            return torch.stack([self._one(x, options) for x in images])
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            if self.reads_tensors:
                return self.single(images, **options).float()
            return torch.stack([self._one(x, options) for x in images])
        return self._one(images, options)

    def _one(self, image: Any, options: dict) -> torch.Tensor:
        if isinstance(image, (str, os.PathLike)):
            image = _open(image)
        elif not self.reads_tensors and isinstance(image, (torch.Tensor, np.ndarray)):
            image = _to_pil(image)
        elif not hasattr(image, "convert") and not isinstance(image, (torch.Tensor, np.ndarray)):
            raise AttnxTypeError(f"expected an image (PIL image, path, (H, W, 3) array or (C, H, W) tensor), "
                                 f"got {type(image).__name__}")
        out = self.single(image, **options)
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            raise AttnxValueError(f"the model's transform gave {getattr(out, 'shape', type(out).__name__)} for one image, "
                                  "expected (C, H, W)")
        return out.float()


def _open(path: str | os.PathLike) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise AttnxValueError(f"no such image file: {os.fspath(path)}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise AttnxValueError(f"{os.fspath(path)} is not an image file PIL can read: {str(exc) or type(exc).__name__}") from None


def _to_pil(image: torch.Tensor | np.ndarray) -> Any:
    """A ``(C, H, W)`` tensor (float in [0, 1] or uint8) or an ``(H, W, C)`` array as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        array = image
    else:
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise AttnxValueError(f"expected an image tensor (C, H, W) with 1 or 3 channels, got shape {tuple(image.shape)}")
        t = image.detach().cpu()
        t = t if t.dtype == torch.uint8 else (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        array = t.permute(1, 2, 0).numpy()
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")
