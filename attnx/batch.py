"""Validated inputs: the batch an adapter prepares, and the checks every adapter shares."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from .errors import AttnxTypeError, AttnxValueError
from .layout import Layout

__all__ = ["Batch", "check_image_batch", "check_text_inputs"]


@dataclass
class Batch:
    """Validated inputs, ready to be passed to the model.

    Attributes
    ----------
    args, kwargs:
        Positional and keyword arguments of the model call.
    batch_size:
        B.
    layout:
        The token layout, or ``None`` when it is only known after a forward (an image model
        nobody wrote an adapter for: the grid follows from the token count its attention sees).
    device:
        The device of the inputs.
    extra:
        Per-sample tensors an adapter keeps beside the call arguments.
    """

    args: tuple
    kwargs: dict
    batch_size: int
    layout: Layout | None
    device: torch.device
    extra: dict = field(default_factory=dict)

    def select(self, index: torch.Tensor | Sequence[int]) -> "Batch":
        """The sub-batch of the given samples (used to explain sample by sample)."""
        index = torch.as_tensor(index, dtype=torch.long)

        def take(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.batch_size:
                return v[index.to(v.device)]
            return v

        layout = None
        if self.layout is not None:
            lay = self.layout
            layout = replace(lay, valid=take(lay.valid), readout=take(lay.readout), columns=take(lay.columns))
        return Batch(
            args=tuple(take(a) for a in self.args),
            kwargs={k: take(v) for k, v in self.kwargs.items()},
            batch_size=len(index),
            layout=layout,
            device=self.device,
            extra={k: take(v) for k, v in self.extra.items()},
        )

    def with_input(self, x: torch.Tensor) -> "Batch":
        """The same batch with its explained tensor (images or pixel values) replaced by ``x``."""
        if self.args:
            return replace(self, args=(x, *self.args[1:]))
        return replace(self, kwargs={**self.kwargs, "pixel_values": x})

    @property
    def explained_input(self) -> torch.Tensor | None:
        """The tensor that identifies the samples: the token ids (text) or the images."""
        for key in ("input_ids", "pixel_values"):
            if key in self.kwargs:
                return self.kwargs[key]
        return next((a for a in self.args if isinstance(a, torch.Tensor)), None)


def check_image_batch(inputs: Any, channels: int | None) -> torch.Tensor:
    """Validate an image batch ``(B, C, H, W)`` and return it."""
    if not isinstance(inputs, torch.Tensor):
        raise AttnxTypeError(
            f"expected an image batch tensor of shape (B, C, H, W), got {type(inputs).__name__}"
        )
    if inputs.dim() == 3:
        raise AttnxValueError(
            f"expected an image batch of shape (B, C, H, W), got a single image of shape "
            f"{tuple(inputs.shape)}; add a batch dimension with x.unsqueeze(0)"
        )
    if inputs.dim() != 4:
        raise AttnxValueError(f"expected an image batch of shape (B, C, H, W), got shape {tuple(inputs.shape)}")
    if inputs.shape[0] == 0:
        raise AttnxValueError("the image batch is empty (B = 0)")
    if not inputs.is_floating_point():
        raise AttnxTypeError(f"expected a floating point image batch, got dtype {inputs.dtype}")
    if channels is not None and inputs.shape[1] != channels:
        raise AttnxValueError(
            f"the model expects {channels} input channels, got an image batch of shape "
            f"{tuple(inputs.shape)} (B, C, H, W)"
        )
    if not torch.isfinite(inputs).all():
        raise AttnxValueError("the image batch contains NaN or infinite values")
    return inputs


def check_text_inputs(inputs: Any) -> dict:
    """Validate the dict a Hugging Face tokenizer returns and return a plain dict of tensors."""
    if not isinstance(inputs, Mapping):
        raise AttnxTypeError(
            "expected the dict a Hugging Face tokenizer returns (input_ids, attention_mask, ...) "
            f"with return_tensors='pt', got {type(inputs).__name__}"
        )
    inputs = dict(inputs)
    if "input_ids" not in inputs:
        raise AttnxValueError(f"the text inputs have no 'input_ids' (got keys {sorted(inputs)})")
    for k, v in inputs.items():
        if not isinstance(v, torch.Tensor):
            raise AttnxTypeError(f"text input {k!r} must be a tensor (use return_tensors='pt'), got {type(v).__name__}")
    ids = inputs["input_ids"]
    if ids.dim() == 1:
        raise AttnxValueError(
            f"expected input_ids of shape (B, T), got shape {tuple(ids.shape)}; "
            "add a batch dimension or use return_tensors='pt'"
        )
    if ids.dim() != 2:
        raise AttnxValueError(f"expected input_ids of shape (B, T), got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0:
        raise AttnxValueError("the text batch is empty (B = 0)")
    if ids.shape[1] == 0:
        raise AttnxValueError("the text is empty (T = 0 tokens)")
    mask = inputs.get("attention_mask")
    if mask is not None:
        if mask.shape != ids.shape:
            raise AttnxValueError(
                f"attention_mask has shape {tuple(mask.shape)}, expected the shape of input_ids {tuple(ids.shape)}"
            )
        if (mask.sum(-1) == 0).any():
            raise AttnxValueError("a sample of the text batch has no tokens (its attention_mask is all zeros)")
    return inputs
