"""Generic fallback: intercept the attention kernels of any PyTorch model.

A ``TorchFunctionMode`` active during the forward sees every call of
``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward`` (timm, torchvision and
Hugging Face all end up in one of the two). The first is replaced by its explicit definition
``softmax(Q K^T * scale + mask) V`` so that the probabilities exist as a tensor in the graph; the
second is asked for per-head weights. Models nobody wrote an adapter for get explained this way.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .base import Adapter, AttentionRecorder, Batch, Layout, check_image_batch, check_text_inputs, infer_image_layout
from .torchvision_vit import record_mha_weights

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def explicit_attention(
    recorder: AttentionRecorder,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` written out, recording the probabilities."""
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    if probs.dim() == 4:
        recorder.record(probs)
    elif probs.dim() == 3:
        recorder.record(probs.unsqueeze(1), grad_wrt=probs)
    else:
        raise ValueError(f"cannot record attention probabilities of shape {tuple(probs.shape)}")
    return torch.matmul(probs, value)


class AttentionInterceptor(TorchFunctionMode):
    """Records the attention probabilities of every attention kernel called while active."""

    def __init__(self, recorder: AttentionRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return explicit_attention(self.recorder, *args, **kwargs)
        if func is F.multi_head_attention_forward:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
            need = bound.arguments.get("need_weights", True)
            average = bound.arguments.get("average_attn_weights", True)
            bound.arguments["need_weights"] = True
            bound.arguments["average_attn_weights"] = False
            out, weights = func(*bound.args, **bound.kwargs)
            record_mha_weights(self.recorder, weights)
            return out, (None if not need else weights.mean(dim=1) if average else weights)
        return func(*args, **kwargs)


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output: the tensor itself, ``.logits``, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}")


class GenericAdapter(Adapter):
    """Fallback adapter for any model whose attention goes through SDPA or ``nn.MultiheadAttention``.

    Parameters
    ----------
    model:
        The model.
    layout_from:
        An adapter of the model's family that knows its token layout; without one, the layout
        is inferred (image grids from the token count, text from the attention mask).
    """

    name = "generic"
    expects = "an image batch tensor (B, C, H, W) or the dict a Hugging Face tokenizer returns"

    def __init__(self, model: nn.Module, layout_from: Adapter | None = None) -> None:
        super().__init__(model)
        self.family = layout_from

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True

    def prepare(self, inputs: Any) -> Batch:
        if self.family is not None:
            return self.family.prepare(inputs)
        if isinstance(inputs, Mapping):
            kwargs = check_text_inputs(inputs)
            ids = kwargs["input_ids"]
            mask = kwargs.get("attention_mask")
            layout = Layout(ids.shape[1], 0, 0, valid=None if mask is None else mask.bool())
            return Batch((), kwargs, ids.shape[0], layout, ids.device)
        x = check_image_batch(inputs, None)
        return Batch((x,), {}, x.shape[0], None, x.device)  # layout inferred after the forward

    def resolve_layout(self, batch: Batch, num_tokens: int) -> Layout:
        if batch.layout is None:
            batch.layout = infer_image_layout(batch.args[0], num_tokens)
        return super().resolve_layout(batch, num_tokens)

    def input_embeddings(self) -> nn.Module | None:
        if self.family is not None:
            return self.family.input_embeddings()
        get = getattr(self.model, "get_input_embeddings", None)
        return get() if callable(get) else None

    @contextlib.contextmanager
    def observe(self, recorder: AttentionRecorder) -> Iterator[None]:
        with AttentionInterceptor(recorder):
            yield

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        if self.family is not None:
            return self.family.call(batch)
        out = self.model(*batch.args, **batch.kwargs)
        return out, logits_of(out)
