"""Validated inputs: the batch an adapter prepares, and the checks every adapter shares."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import AttnxTypeError, AttnxValueError
from .layout import Layout

__all__ = ["READOUT_LOGITS_ONLY", "Batch", "check_image_batch", "check_on_real_device", "check_input_dtype", "check_text_inputs", "check_token_ids", "outside_inference_mode"]

#: ``Batch.extra`` flag set by the pass when the target reads the logits at the layout's readout
#: positions only: a language model may then skip its output layer at the other positions
READOUT_LOGITS_ONLY = "readout_logits_only"


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
        Per-sample tensors an adapter keeps beside the call arguments, and flags such as
        :data:`READOUT_LOGITS_ONLY`.
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
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise AttnxTypeError(f"expected integer input_ids (token ids, torch.long), got dtype {ids.dtype}")
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


def tensors_of(inputs: Any) -> list[torch.Tensor]:
    """The tensors of an input: itself, or the values of a dict (a tokenizer's output)."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    return []


def check_on_real_device(inputs: Any, model: nn.Module) -> None:
    """Inputs (and weights) on the ``meta`` device have shapes but no values: nothing to explain."""
    if any(t.device.type == "meta" for t in tensors_of(inputs)):
        raise AttnxValueError(
            "the inputs are on the meta device (shapes without values); attnx explains real values: "
            "create the inputs on a real device ('cpu', 'cuda', ...)"
        )
    p = next(model.parameters(), None)
    if p is None or p.device.type != "meta":
        return
    if not any(hasattr(m, "_hf_hook") for m in model.modules()):  # accelerate's offload loads meta weights itself
        raise AttnxValueError(
            "the model's weights are on the meta device (not loaded); load them first "
            "(from_pretrained, or model.to_empty(device='cpu') and load_state_dict)"
        )


def outside_inference_mode(inputs: Any) -> Any:
    """``inputs`` with every tensor created under ``torch.inference_mode()`` cloned (call this
    under ``torch.inference_mode(False)``): autograd cannot record inference tensors; the user's
    tensors are not changed."""
    def plain(v: Any) -> Any:
        return v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v

    if isinstance(inputs, torch.Tensor):
        return plain(inputs)
    if isinstance(inputs, Mapping) and any(isinstance(v, torch.Tensor) and v.is_inference() for v in inputs.values()):
        return {k: plain(v) for k, v in inputs.items()}
    return inputs


def learned_positions(model: nn.Module) -> int | None:
    """How many tokens a model with learned absolute position embeddings takes (BERT-family
    ``position_embeddings``, GPT-2 ``wpe``); ``None`` for rotary or relative positions."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe"):
            offset = 0 if m.padding_idx is None else m.padding_idx + 1  # RoBERTa counts from padding_idx + 1
            return m.num_embeddings - offset
    return None


def token_type_table(model: nn.Module) -> nn.Embedding | None:
    """The token type (segment) embedding of a BERT-family model, if it has one."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] == "token_type_embeddings":
            return m
    return None


def check_input_dtype(batch: Batch, model: nn.Module) -> None:
    """Images passed positionally (``model(x)``: timm, torchvision, research code) in the model's
    dtype: float64 images on a float32 model (or the reverse) cannot be computed. Half precision on
    either side is computed in float32 (:mod:`attnx.core.runtime`); Hugging Face models cast their
    ``pixel_values`` themselves."""
    x = next((a for a in batch.args if isinstance(a, torch.Tensor)), None)
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    if x is None or p is None or not x.is_floating_point():
        return
    half = (torch.float16, torch.bfloat16)
    if x.dtype != p.dtype and x.dtype not in half and p.dtype not in half:
        raise AttnxTypeError(
            f"the inputs are {x.dtype} but the model computes in {p.dtype}; cast them with x.to({p.dtype}) "
            f"(or the model with model.to({x.dtype}))"
        )


def check_token_ids(batch: Batch, embeddings: nn.Module | None, model: nn.Module) -> None:
    """Token ids must index the vocabulary, and a text must fit the model's position embeddings."""
    ids = batch.kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or not isinstance(embeddings, nn.Embedding):
        return
    V = embeddings.num_embeddings
    bad = (ids < 0) | (ids >= V)
    if bad.any():
        where = torch.nonzero(bad)[0].tolist()
        raise AttnxValueError(
            f"token id {ids[bad][0].item()} (sample {where[0]}, position {where[1]}) is outside the model's "
            f"vocabulary of {V} tokens (0..{V - 1}); was the text tokenised by this model's tokenizer?"
        )
    types = batch.kwargs.get("token_type_ids")
    table = token_type_table(model)
    if isinstance(types, torch.Tensor) and table is not None:
        if types.is_floating_point() or ((types < 0) | (types >= table.num_embeddings)).any():
            raise AttnxValueError(
                f"token_type_ids must be integers in 0..{table.num_embeddings - 1} (the model's token types), "
                f"got values {sorted(set(types.flatten().tolist()))[:8]}"
            )
    limit = learned_positions(model)
    if limit is not None and ids.shape[1] > limit:
        raise AttnxValueError(
            f"{ids.shape[1]} tokens, the model takes at most {limit}; truncate with "
            f"tokenizer(..., truncation=True, max_length={limit})"
        )
