"""Attention manipulated during a forward: every self-attention's probabilities pass through a function.

:class:`AttentionEditor` is a ``TorchFunctionMode`` that sees a model's attention wherever it runs
(as :mod:`attnx.adapters.kernels` observes it) and hands the probabilities ``(..., Nq, Nk)`` of
every self-attention over the explained tokens to ``edit``; the product with the values uses what
``edit`` returns. It reaches:

* ``F.scaled_dot_product_attention`` (timm's fused path, Hugging Face ``sdpa``), written out by
  :func:`~attnx.adapters.kernels.explicit_attention` so that the probabilities exist;
* attention written out (Hugging Face ``eager``, timm with ``fused_attn=False``, DINO-style code):
  the softmax output is replaced where the product with the values consumes it.

Only probabilities over ``num_tokens`` keys with as many queries are edited (an attention-pool
probe reading the tokens is a head, not a layer). ``nn.MultiheadAttention`` computes its
probabilities inside one kernel that no mode reaches (torchvision ViTs, OpenCLIP): refused.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core.recorder import AttentionRecorder
from ..errors import UnsupportedModelError
from .kernels import SoftmaxFlow, explicit_attention

__all__ = ["AttentionEditor"]

class AttentionEditor(TorchFunctionMode):
    """While active, ``edit(probs)`` replaces the probabilities of every self-attention over
    ``num_tokens`` tokens; ``edited`` counts the attentions it replaced.

    Parameters
    ----------
    edit:
        ``probs (..., N, N) -> probs``, the leading axes batch-major (``(B, H)`` or ``B*H``).
    num_tokens:
        ``N``, the token count of the explained layout.
    samples:
        The batch size of the forward: a ``(B', H, N, N)`` attention with ``B'`` other than it
        attends within windows (Swin), not over the explained tokens, and is refused.
    """

    def __init__(self, edit: Callable[[torch.Tensor], torch.Tensor], num_tokens: int, samples: int) -> None:
        super().__init__()
        self.edit = edit
        self.num_tokens = num_tokens
        self.samples = samples
        self.edited = 0
        self.flow = SoftmaxFlow()
        self.recorder = AttentionRecorder()  # explicit_attention records; nothing reads it

    def over_tokens(self, probs: torch.Tensor) -> bool:
        return probs.shape[-1] == self.num_tokens and probs.shape[-2] == self.num_tokens

    def edited_probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        if not self.over_tokens(probs):
            return probs
        if probs.dim() == 4 and probs.shape[0] != self.samples:
            raise UnsupportedModelError(
                f"attention over windows of {self.num_tokens} tokens ({probs.shape[0]} windows for {self.samples} samples): "
                "attention manipulation needs global self-attention over the explained tokens, not a windowed model"
            )
        self.edited += 1
        self.recorder = AttentionRecorder()  # keep no graph alive between layers
        return self.edit(probs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return explicit_attention(self.recorder, *args, **kwargs, edit=self.edited_probabilities)
        if func is F.multi_head_attention_forward:
            raise UnsupportedModelError(
                "nn.MultiheadAttention computes its attention scores inside one kernel that attnx cannot "
                "manipulate (torchvision ViTs, OpenCLIP towers); AtMan needs attention computed by "
                "F.scaled_dot_product_attention or written out (timm, Hugging Face)"
            )
        return self.flow.call(func, args, kwargs, self.edited_probabilities)
