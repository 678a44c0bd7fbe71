"""The attention kernels of any PyTorch model, seen through a ``TorchFunctionMode``.

A mode active during the forward sees every call of ``F.scaled_dot_product_attention`` and
``F.multi_head_attention_forward`` (timm, torchvision and Hugging Face all end up in one of the
two). ``AttentionInterceptor`` replaces the first by its explicit definition
``softmax(Q K^T * scale + mask) V`` so that the probabilities exist as a tensor in the graph, and
asks the second for per-head weights. ``TokenWatcher`` only notes how many tokens each call
attends over, leaving the computation as it is.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..recorder import AttentionRecorder
from .switches import record_mha_weights

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
    if is_causal or attn_mask is not None:
        # a query that may attend to no key (a left-padding position) gets zeros, as in SDPA
        probs = probs.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
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


class TokenWatcher(TorchFunctionMode):
    """Notes the number of key tokens of every attention kernel call, and the output grid of a
    patch embedding (a convolution whose stride equals its kernel) applied to images of
    ``image_size``, changing nothing."""

    def __init__(self, recorder: AttentionRecorder, image_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.recorder = recorder
        self.image_size = image_size

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and self.image_size is not None:
            out = func(*args, **kwargs)
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
            stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
            if tuple(x.shape[-2:]) == self.image_size and tuple(weight.shape[-2:]) == stride:
                self.recorder.saw_patch_grid(tuple(out.shape[-2:]))
            return out
        if func is F.scaled_dot_product_attention:
            key = args[1] if len(args) > 1 else kwargs["key"]
            self.recorder.saw_tokens(key.shape[-2])
        elif func is F.multi_head_attention_forward:
            key = _MHA_SIGNATURE.bind(*args, **kwargs).arguments["key"]
            self.recorder.saw_tokens(key.shape[0])  # (S, B, E) or unbatched (S, E): S leads
        return func(*args, **kwargs)
