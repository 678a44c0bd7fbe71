"""Attention manipulated during a forward: every self-attention's probabilities pass through a function.

:class:`AttentionEditor` is a ``TorchFunctionMode`` that sees a model's attention wherever it runs
(as :mod:`attnx.adapters.kernels` observes it) and hands the probabilities ``(..., Nq, Nk)`` of
every self-attention over the explained tokens to ``edit``; the product with the values uses what
``edit`` returns. It reaches:

* ``F.scaled_dot_product_attention`` (timm's fused path, Hugging Face ``sdpa``), written out by
  :func:`~attnx.adapters.kernels.explicit_attention` so that the probabilities exist;
* attention written out (Hugging Face ``eager``, timm with ``fused_attn=False``, DINO-style code):
  the softmax output is replaced where the product with the values consumes it;
* ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``: torchvision ViTs, OpenCLIP), whose
  scores exist only inside its kernel: written out as the kernel defines it (in-projection, heads,
  masks, :func:`~attnx.adapters.kernels.explicit_attention`, out-projection) by
  :func:`written_out_mha`; the rarely used ``bias_k`` / ``bias_v`` / ``add_zero_attn`` /
  ``static_k`` / ``static_v`` and dropout while training are refused.

Only probabilities over ``num_tokens`` keys with as many queries are edited (an attention-pool
probe reading the tokens is a head, not a layer); windowed attention (Swin) is refused.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core.recorder import AttentionRecorder
from ..errors import UnsupportedModelError
from .kernels import SoftmaxFlow, explicit_attention

__all__ = ["AttentionEditor", "written_out_mha"]


def written_out_mha(
    edit: Callable[[torch.Tensor], torch.Tensor], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    embed_dim_to_check: int, num_heads: int, in_proj_weight: torch.Tensor | None, in_proj_bias: torch.Tensor | None,
    bias_k: torch.Tensor | None, bias_v: torch.Tensor | None, add_zero_attn: bool, dropout_p: float,
    out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor | None, training: bool = True,
    key_padding_mask: torch.Tensor | None = None, need_weights: bool = True, attn_mask: torch.Tensor | None = None,
    use_separate_proj_weight: bool = False, q_proj_weight: torch.Tensor | None = None,
    k_proj_weight: torch.Tensor | None = None, v_proj_weight: torch.Tensor | None = None,
    static_k: torch.Tensor | None = None, static_v: torch.Tensor | None = None,
    average_attn_weights: bool = True, is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.multi_head_attention_forward`` written out, its probabilities passed through ``edit``."""
    if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None \
            or (training and dropout_p > 0):
        raise UnsupportedModelError(
            "nn.MultiheadAttention with bias_k / bias_v, add_zero_attn, static keys or dropout in training cannot be "
            "written out for attention manipulation"
        )
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    L, N, E = query.shape
    S, H = key.shape[0], num_heads
    weights = (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight else in_proj_weight.chunk(3)
    biases = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)

    def heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # (T, N, E) -> (N, H, T, d)
        return F.linear(x, w, b).reshape(x.shape[0], N, H, -1).permute(1, 2, 0, 3)

    q, k, v = heads(query, weights[0], biases[0]), heads(key, weights[1], biases[1]), heads(value, weights[2], biases[2])
    additive = torch.zeros(N, H, L, S, dtype=q.dtype, device=q.device)
    if attn_mask is None and is_causal:
        attn_mask = ~torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    for mask, shape in ((attn_mask, (-1, H, L, S)), (key_padding_mask, (N, 1, 1, S))):
        if mask is None:
            continue
        mask = mask.reshape(shape) if mask.dim() == 3 or mask is key_padding_mask else mask
        additive = additive.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else additive + mask.to(q.dtype)
    recorder = AttentionRecorder(N)
    out = explicit_attention(recorder, q, k, v, attn_mask=additive, edit=edit)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(L, N, E), out_proj_weight, out_proj_bias)
    probs = recorder.probs[-1] if need_weights else None
    if probs is not None and average_attn_weights:
        probs = probs.mean(dim=1)
    if unbatched:
        out = out.squeeze(1)
        probs = None if probs is None else probs.squeeze(0)
    return out, probs

class AttentionEditor(TorchFunctionMode):
    """While active, ``edit(probs)`` replaces the probabilities of every self-attention over
    ``num_tokens`` tokens; ``edited`` counts the attentions it replaced; :meth:`check` after the
    forward raises what could not be manipulated.

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
        self.refusal: UnsupportedModelError | None = None

    def check(self) -> None:
        """Raise what the forward could not manipulate (windows), or that it saw no attention at all."""
        if self.refusal is not None:
            raise self.refusal
        if self.edited == 0:
            raise UnsupportedModelError(
                f"no self-attention over the {self.num_tokens} explained tokens was seen to manipulate (attention "
                "through F.scaled_dot_product_attention, nn.MultiheadAttention or written out as a softmax "
                "multiplied with the values)"
            )

    def over_tokens(self, probs: torch.Tensor) -> bool:
        return probs.shape[-1] == self.num_tokens and probs.shape[-2] == self.num_tokens

    def edited_probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        if not self.over_tokens(probs):
            return probs
        if probs.dim() == 4 and probs.shape[0] != self.samples:
            # raised after the forward (check): an error inside ``@`` would become Python's TypeError
            self.refusal = UnsupportedModelError(
                f"attention over windows of {self.num_tokens} tokens ({probs.shape[0]} windows for {self.samples} samples): "
                "attention manipulation needs global self-attention over the explained tokens, not a windowed model"
            )
            return probs
        self.edited += 1
        self.recorder = AttentionRecorder()  # keep no graph alive between layers
        return self.edit(probs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return explicit_attention(self.recorder, *args, **kwargs, edit=self.edited_probabilities)
        if func is F.multi_head_attention_forward:
            return written_out_mha(self.edited_probabilities, *args, **kwargs)
        return self.flow.call(func, args, kwargs, self.edited_probabilities)
