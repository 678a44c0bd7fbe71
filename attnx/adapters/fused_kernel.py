"""Attention left in the model's fused kernel, its probabilities recomputed layer by layer in the backward.

A method that folds each layer as the backward reaches it (:mod:`attnx.core.layer_fold`: generic
attention explainability, gradient-weighted rollout, attention GradCAM) reads ``A`` and
``dy_t/dA`` of one layer at a time. It needs no model-wide switch to the kernel that returns the
probabilities (Hugging Face ``eager``), whose forward keeps every layer's ``(B, H, N, N)`` map
for the backward: ``F.scaled_dot_product_attention`` keeps running forward as the model calls
it (flash / memory-efficient / math, whatever SDPA picks), and :class:`FusedKernelProbe` wraps
each call in :class:`RecomputedAttention`, whose backward, given ``dy_t/do`` of the attention
output ``o = A v``:

* recomputes ``A = softmax(q kᵀ · scale + mask)`` from the query and key the kernel kept;
* forms ``dy_t/dA = dy_t/do · vᵀ``, hands ``(A, dy_t/dA)`` to the layer's fold and lets them go;
* returns the kernel's input gradients, ``dv = Aᵀ dy_t/do``, ``dS = A ⊙ (dy_t/dA − Σ_k A ⊙ dy_t/dA)``,
  ``dq = dS k · scale``, ``dk = dSᵀ q · scale`` (summed over the query heads of a key head under
  grouped-query attention).

A fold that declares how its results on tiles of query rows join (:func:`attnx.core.layer_fold.joined_by`;
``row_separable``: the rows concatenated) gets the layer in tiles, :data:`TILE_BYTES` per
``(B, H, rows, N)`` map: the backward never holds a layer's whole map.

Peak memory: the fused kernel's forward + backward, plus what the fold keeps per layer, plus
about three maps of one tile (``A``, ``dy_t/dA`` and one of their products: ``dS`` or the fold's)
and the gradients of the keys and values repeated to every query head; for a fold without a join
the tile is the whole ``(B, H, N, N)`` layer. Time: the fused forward, and per layer in the backward
the products of the attention written out (``q kᵀ``, ``dy_t/do · vᵀ``, ``Aᵀ dy_t/do``, ``dS k``,
``dSᵀ q``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core.recorder import AttentionRecorder

__all__ = [
    "TILE_BYTES", "FusedKernelProbe", "KernelCall", "KernelFolder", "RecomputedAttention",
    "probed_attention", "sdpa_probabilities", "sdpa_scale",
]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def repeated_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys or values ``(..., H_kv, N, D)`` repeated to ``heads`` query heads (grouped-query attention)."""
    if t.dim() < 3 or t.shape[-3] == heads:
        return t
    return t.repeat_interleave(heads // t.shape[-3], dim=-3)


def sdpa_scale(query: torch.Tensor, scale: float | None) -> float:
    """The factor of ``q kᵀ`` in SDPA: ``scale``, or ``1/√d`` by default."""
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale


def sdpa_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The probabilities ``softmax(q kᵀ · scale + mask)`` of ``F.scaled_dot_product_attention`` on
    these arguments, ``(..., Nq, Nk)``; a query that may attend to no key gets zeros, as in SDPA."""
    L, S = query.shape[-2], key.shape[-2]
    scale = sdpa_scale(query, scale)
    if enable_gqa and query.dim() >= 3:
        key = repeated_heads(key, query.shape[-3])
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    dead = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            # -inf entries as the dtype's lowest value: the same softmax, and relevance rules that
            # split a sum by its terms (a / (a + b)) meet no -inf / -inf
            dead = torch.isneginf(attn_mask).all(dim=-1, keepdim=True)
            scores = scores + attn_mask.to(scores.dtype).clamp(min=torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if is_causal or attn_mask is not None:
        # the mask is read off the detached scores, which is not a use of them
        no_key = torch.isneginf(scores.detach()).all(dim=-1, keepdim=True)
        if dead is not None:
            no_key = no_key | dead
        if no_key.any():
            probs = probs.masked_fill(no_key, 0.0)
    return probs


#: bytes of one ``(B, H, rows, N)`` tile of a layer's map in the tiled backward
TILE_BYTES = 2**24


class KernelFolder(Protocol):
    """What the folding backward (:func:`attnx.core.layer_fold.fold_kernel_backward`) gives each
    call; in a pass without a backward, the forward (``gradient`` ``None``)."""

    def tiled(self, index: int) -> bool:
        """Whether layer ``index`` may be folded in query-row tiles."""

    def piece(self, index: int, rows: slice, probs: torch.Tensor, gradient: torch.Tensor | None) -> None:
        """Fold the query ``rows`` of layer ``index``: ``A`` and ``dy_t/dA`` ``(B, H, len(rows), Nk)``."""

    def done(self, index: int) -> None:
        """Every row of layer ``index`` has been folded."""


@dataclass
class KernelCall:
    """One attention call left to the fused kernel: what its backward needs, besides the query,
    key and value the kernel's autograd node saves, to recompute ``A``. ``folder`` is set by
    the backward that folds; ``folded`` tells whether that backward reached the call."""

    index: int
    attn_mask: torch.Tensor | None
    is_causal: bool
    scale: float | None
    enable_gqa: bool
    #: whether the backward passes gradients on to the kernel's inputs (not below the lowest layer read)
    input_gradients: bool = True
    folder: KernelFolder | None = field(default=None, repr=False)
    folded: bool = False

    def row_tiles(self, query: torch.Tensor, key: torch.Tensor) -> list[slice]:
        """The query-row tiles the backward computes one at a time: ``(B, H, rows, Nk)`` maps of at
        most :data:`TILE_BYTES` where the fold allows, else the whole layer."""
        n = query.shape[-2]
        if self.folder is not None and not self.folder.tiled(self.index):
            return [slice(0, n)]
        per_row = query.shape[0] * query.shape[-3] * key.shape[-2] * max(4, query.element_size())
        rows = max(1, min(n, TILE_BYTES // per_row))
        return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]

    def probabilities(self, query: torch.Tensor, key: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``A`` ``(B, H, Nq, Nk)`` (its query ``rows`` when given) of this call on ``query`` and
        ``key``: softmax in float32 for a half-precision query, the result in the query's dtype
        (as Hugging Face's eager kernels compute it)."""
        n, m = query.shape[-2], key.shape[-2]
        rows = slice(0, n) if rows is None else rows
        mask = self.attn_mask
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] == n:
            mask = mask[..., rows, :]
        if self.is_causal:  # the rows of the top-left causal mask
            causal = torch.ones(n, m, dtype=torch.bool, device=query.device).tril()[rows]
            if mask is None:
                mask = causal
            elif mask.dtype == torch.bool:
                mask = mask & causal
            else:
                mask = mask.masked_fill(~causal, float("-inf"))
        up = (lambda t: t.float()) if query.dtype in (torch.float16, torch.bfloat16) else (lambda t: t)
        probs = sdpa_probabilities(up(query[..., rows, :]), up(key), mask, False, self.scale,
                                   self.enable_gqa or key.shape[-3] != query.shape[-3])
        return probs.to(query.dtype)


class RecomputedAttention(torch.autograd.Function):
    """``F.scaled_dot_product_attention(q, k, v, ...)`` by the fused kernel, whose backward
    recomputes ``A`` and ``dy_t/dA`` for the layer's fold (module docstring). ``probe`` is a scalar
    leaf whose gradient (zero) the folding backward asks for, so the backward reaches this call."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, probe: torch.Tensor,
                call: KernelCall) -> torch.Tensor:
        ctx.call = call
        ctx.save_for_backward(query, key, value)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=call.attn_mask, is_causal=call.is_causal, scale=call.scale,
            enable_gqa=call.enable_gqa,
        )

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        call: KernelCall = ctx.call
        query, key, value = ctx.saved_tensors
        heads = query.shape[-3]
        key_, value_ = repeated_heads(key, heads), repeated_heads(value, heads)
        scale = sdpa_scale(query, call.scale)
        needs = [n and call.input_gradients for n in ctx.needs_input_grad[:3]]
        grad_query = torch.empty_like(query) if needs[0] else None
        grad_key = torch.zeros_like(key_) if needs[1] else None
        grad_value = torch.zeros_like(value_) if needs[2] else None
        for rows in call.row_tiles(query, key):
            probs = call.probabilities(query, key, rows)
            out_rows = grad_out[..., rows, :]
            grad_probs = torch.matmul(out_rows, value_.transpose(-2, -1))
            if call.folder is not None:
                call.folder.piece(call.index, rows, probs, grad_probs)
            if grad_value is not None:
                grad_value += torch.matmul(probs.transpose(-2, -1), out_rows)
            if grad_query is not None or grad_key is not None:
                # the softmax's backward: dS = A ⊙ (dA − Σ_k A ⊙ dA) · scale (not in place: the fold
                # may have kept dy_t/dA)
                row = (probs * grad_probs).sum(dim=-1, keepdim=True)
                grad_scores = (grad_probs - row).mul_(probs).mul_(scale)
                if grad_query is not None:
                    grad_query[..., rows, :] = torch.matmul(grad_scores, key_)
                if grad_key is not None:
                    grad_key += torch.matmul(grad_scores.transpose(-2, -1), query[..., rows, :])
            del probs, grad_probs
        if call.folder is not None:
            call.folder.done(call.index)
        call.folded = True
        kv_heads = key.shape[-3]

        def summed(g: torch.Tensor | None) -> torch.Tensor | None:
            # a key head's gradient sums those of the query heads that share it
            if g is None or kv_heads == heads:
                return g
            return g.unflatten(-3, (kv_heads, heads // kv_heads)).sum(dim=-3)

        return grad_query, summed(grad_key), summed(grad_value), torch.zeros((), device=grad_out.device), None


def probed_attention(recorder: AttentionRecorder, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention(*args, **kwargs)`` run as :class:`RecomputedAttention` and
    recorded as a :class:`KernelCall` (``recorder.record_kernel``); ``None`` for a call the
    recomputation does not cover (dropout on, a mask that requires grad, fewer than 4 dimensions,
    no input that requires grad, no gradient mode), which the caller runs as it is.

    In a pass without a backward whose layers are folded (``recorder.forward_folder``: rollout,
    raw attention), the call's ``A`` is computed here instead, in query-row tiles where the fold
    joins them, and folded; the kernel then runs as the model called it."""
    bound = dict(zip(_SDPA_ARGS, args), **kwargs)
    query, key, value = bound["query"], bound["key"], bound["value"]
    mask = bound.get("attn_mask")
    folder = recorder.forward_folder
    covered = (
        float(bound.get("dropout_p", 0.0) or 0.0) == 0.0
        and query.dim() == 4 and key.dim() == 4 and value.dim() == 4
        and (mask is None or not mask.requires_grad)
        and (folder is not None or (any(t.requires_grad for t in (query, key, value)) and torch.is_grad_enabled()))
    )
    if not covered:
        return None
    call = KernelCall(
        index=len(recorder.kernel_calls), attn_mask=mask, is_causal=bool(bound.get("is_causal", False)),
        scale=bound.get("scale"), enable_gqa=bool(bound.get("enable_gqa", False)),
    )
    probe = torch.zeros((), dtype=torch.float32, device=query.device, requires_grad=folder is None)
    if folder is None:
        out = RecomputedAttention.apply(query, key, value, probe, call)
    else:
        call.folder = folder
        with torch.no_grad():
            for rows in call.row_tiles(query, key):
                folder.piece(call.index, rows, call.probabilities(query, key, rows), None)
        folder.done(call.index)
        call.folded, call.folder = True, None
        out = F.scaled_dot_product_attention(*args, **kwargs)
    recorder.record_kernel(call, probe, (query.shape[0], query.shape[1], query.shape[2], key.shape[2]))
    return out


class FusedKernelProbe(TorchFunctionMode):
    """Every ``F.scaled_dot_product_attention`` call made while active runs through
    :func:`probed_attention`. A call it does not cover runs as it is and is not recorded: the
    adapter then sees fewer layers than the model has and explains with the probabilities
    written out instead."""

    def __init__(self, recorder: AttentionRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = probed_attention(self.recorder, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)
