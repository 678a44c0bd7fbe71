"""The one shape every loader of :mod:`attnx.zoo` returns: a model with what it needs around it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .preprocess import ImagePreprocess

__all__ = ["ImagePreprocess", "ZooModel"]


@dataclass
class ZooModel:
    """A model ready to explain, with what is needed to feed it and to name its classes.

    Attributes
    ----------
    model:
        The model, in eval mode.
    kind:
        ``"image"``, ``"text"``, or ``"image_text"`` for a dual encoder (CLIP, SigLIP, OpenCLIP:
        ``preprocess`` for its images, ``tokenizer`` for its prompts).
    class_names:
        The name of each class index, if known.
    preprocess:
        Images -> normalised model input, the same contract for every bundle
        (:mod:`attnx.zoo.preprocess`): a PIL image, a path, an array or a ``(C, H, W)`` tensor ->
        ``(C, h, w)``; a list of them or a ``(B, C, H, W)`` tensor -> ``(B, C, h, w)``; ``None``
        if unknown. A plain function given here is taken to read tensors and batches itself (as
        the embedded models' do); wrap a PIL-only transform in
        :class:`~attnx.zoo.preprocess.ImagePreprocess`.
    tokenizer:
        Text: the model's tokenizer.
    mean, std:
        Images: the per-channel normalisation of ``preprocess`` (to show inputs, and to black out
        pixels before normalising), if known.
    info:
        What else is known: ``name``, ``multi_label``, a sidecar's metrics, ...
    """

    model: nn.Module
    kind: str
    class_names: list[str] | None = None
    preprocess: Callable[[Any], torch.Tensor] | None = None
    tokenizer: Any = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preprocess is not None and not isinstance(self.preprocess, ImagePreprocess):
            self.preprocess = ImagePreprocess(self.preprocess, reads_tensors=True)

    @property
    def multi_label(self) -> bool:
        """Whether each class is an independent sigmoid (several classes per input)."""
        return bool(self.info.get("multi_label", False))
