"""Attention kernels written out with engine-visible ops, so that their parts get rules.

``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward`` compute the attention
in one kernel; :class:`attnx.lrp.rules.Decompose` runs them as the functions below, each op going
through the engine (``call``) so that ``Q Kᵀ``, the softmax and ``A V`` meet their own rules.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["sdpa_decomposition", "mha_decomposition"]


def finite_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive float mask with ``-inf`` replaced by the dtype's lowest value: the same softmax
    (the masked probabilities underflow to exactly 0), but rules that split the relevance of a sum
    by its terms (``a / (a + b)``) see no ``-inf / -inf``."""
    return mask.to(dtype).clamp(min=torch.finfo(dtype).min)


def sdpa_decomposition(call, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` written out with engine-visible ops."""
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = call(torch.repeat_interleave, key, rep, dim=-3)
        value = call(torch.repeat_interleave, value, rep, dim=-3)
    # scaling the queries rather than the (N x N) scores: the same linear map, a smaller tensor
    scores = call(torch.matmul, call(torch.mul, query, scale), call(torch.Tensor.transpose, key, -2, -1))
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = call(torch.Tensor.masked_fill, scores, ~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = call(torch.Tensor.masked_fill, scores, ~attn_mask, float("-inf"))
        else:
            scores = call(torch.add, scores, finite_mask(attn_mask, scores.dtype))
    probs = call(torch.softmax, scores, -1)
    if attn_mask is not None:  # (a causal mask alone leaves every query its first key)
        # a query that may attend to no key (a left-padding position) gets zeros, as in SDPA
        dead = torch.isneginf(scores.detach()).all(dim=-1, keepdim=True)
        if dead.any():  # (no copy of the probabilities when every query sees a key)
            probs = call(torch.Tensor.masked_fill, probs, dead, 0.0)
    if dropout_p > 0.0:
        probs = call(F.dropout, probs, dropout_p, True)
    return call(torch.matmul, probs, value)


def mha_decomposition(call, query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                      bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
                      key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
                      q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                      average_attn_weights=True, is_causal=False):
    """``F.multi_head_attention_forward`` written out with engine-visible ops (the common case:
    no ``bias_k``/``bias_v``, no ``add_zero_attn``, no static keys)."""
    if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
        raise NotImplementedError("LRP through nn.MultiheadAttention supports no bias_k/bias_v/add_zero_attn/static_k/static_v")
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, B, E = query.shape
    S = key.shape[0]
    hd = E // num_heads
    if use_separate_proj_weight:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        wq, wk, wv = in_proj_weight.chunk(3)
    bq, bk, bv = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
    q = call(F.linear, query, wq, bq)
    k = call(F.linear, key, wk, bk)
    v = call(F.linear, value, wv, bv)
    # (L, B, E) -> (B*H, L, hd)
    q = call(torch.Tensor.transpose, call(torch.Tensor.reshape, q, L, B * num_heads, hd), 0, 1)
    k = call(torch.Tensor.transpose, call(torch.Tensor.reshape, k, S, B * num_heads, hd), 0, 1)
    v = call(torch.Tensor.transpose, call(torch.Tensor.reshape, v, S, B * num_heads, hd), 0, 1)
    mask = None
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0)
        mask = torch.zeros_like(m, dtype=q.dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(q.dtype)
    if is_causal and attn_mask is None:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        mask = torch.zeros(1, L, S, dtype=q.dtype, device=q.device).masked_fill(~causal, float("-inf"))
    if key_padding_mask is not None:
        kp = key_padding_mask
        kp = torch.zeros_like(kp, dtype=q.dtype).masked_fill(kp, float("-inf")) if kp.dtype == torch.bool else kp.to(q.dtype)
        kp = kp.view(B, 1, 1, S).expand(B, num_heads, 1, S).reshape(B * num_heads, 1, S)
        mask = kp if mask is None else mask + kp
    scores = call(torch.bmm, call(torch.mul, q, 1.0 / math.sqrt(hd)), call(torch.Tensor.transpose, k, -2, -1))
    if mask is not None:
        scores = call(torch.add, scores, finite_mask(mask, scores.dtype))
    probs = call(torch.softmax, scores, -1)
    if dropout_p > 0.0 and training:
        probs = call(F.dropout, probs, dropout_p, True)
    out = call(torch.bmm, probs, v)  # (B*H, L, hd)
    out = call(torch.Tensor.reshape, call(torch.Tensor.transpose, out, 0, 1), L * B, E)
    out = call(F.linear, out, out_proj_weight, out_proj_bias)
    out = call(torch.Tensor.reshape, out, L, B, E)
    weights = None
    if need_weights:
        weights = probs.view(B, num_heads, L, S)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    if not batched:
        out = out.squeeze(1)
    return out, weights
