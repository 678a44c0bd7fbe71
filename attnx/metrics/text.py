"""Text: faithfulness of token relevance, and its agreement with human rationales.

:func:`token_deletion_curve`
    The text counterpart of the deletion curve: content tokens are removed in order of relevance
    (never special tokens nor padding) while the target's probability is followed; it returns a
    :class:`~attnx.metrics.curves.Curve`, as the image curves do.
:func:`rationale_f1`
    Token-level F1 of the top-k tokens against human rationales (as in ERASER, DeYoung et al.
    2020), with :class:`RationaleScores`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..core.explanation import Explanation
from ..errors import AttnxTypeError, AttnxValueError
from .common import RelevanceLike, bool_mask, check_finite, ranks_descending
from .curves import Curve
from .measures import (
    Measure,
    apply_measure,
    class_vector,
    forward_chunked,
    measure_name,
    resolve_target,
    run_points,
)

__all__ = ["token_deletion_curve", "rationale_f1", "RationaleScores"]

#: keys a Hugging Face tokenizer may return that the model does not accept
_TOKENIZER_ONLY_KEYS = (
    "special_tokens_mask", "offset_mapping", "length", "overflow_to_sample_mapping", "num_truncated_tokens",
    "overflowing_tokens",
)


def _text_batch(batch: Any) -> dict:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise AttnxTypeError("expected the dict a Hugging Face tokenizer returns (with 'input_ids'), got "
                        f"{type(batch).__name__}")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise AttnxValueError("expected input_ids as a (B, T) tensor (tokenize with return_tensors='pt')")
    return dict(batch)


def _special_mask(batch: dict, tokenizer: Any) -> torch.Tensor:
    ids = batch["input_ids"]
    if batch.get("special_tokens_mask") is not None:
        special = torch.as_tensor(batch["special_tokens_mask"], device=ids.device).bool()
        if special.shape != ids.shape:
            raise AttnxValueError(f"special_tokens_mask has shape {tuple(special.shape)}, input_ids {tuple(ids.shape)}")
        return special
    if tokenizer is not None and getattr(tokenizer, "all_special_ids", None) is not None:
        return torch.isin(ids, torch.as_tensor(list(tokenizer.all_special_ids), dtype=ids.dtype, device=ids.device))
    raise AttnxValueError(
        "cannot tell the special tokens ([CLS], [SEP], ...) from the content: tokenize with "
        "return_special_tokens_mask=True or pass tokenizer="
    )


def _text_scores(relevance: RelevanceLike, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(relevance, Explanation):
        if relevance.grid is not None:
            raise AttnxValueError("this explanation is of an image; use perturbation_curve / deletion_curve")
        scores = relevance.scores
    elif isinstance(relevance, torch.Tensor):
        scores = relevance
    else:
        raise AttnxTypeError(f"relevance must be an attnx Explanation or a (B, T) tensor, got {type(relevance).__name__}")
    scores = scores.detach()
    if scores.shape != ids.shape:
        raise AttnxValueError(f"expected relevance of shape {tuple(ids.shape)} (one value per token), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.float()
    check_finite(scores, "relevance")
    return scores.to(ids.device)


def token_deletion_curve(
    model: Callable,
    batch: Mapping[str, torch.Tensor],
    relevance: RelevanceLike,
    target: Any = None,
    *,
    most_relevant_first: bool = True,
    steps: int = 10,
    replacement: str | int = "mask",
    tokenizer: Any = None,
    measure: Measure = "probability",
    labels: Any = None,
    batch_size: int | None = None,
) -> Curve:
    """Remove a text's tokens in order of relevance and follow the target's probability.

    Only content tokens are removed: never special tokens ([CLS], [SEP], ...; from the batch's
    ``special_tokens_mask`` if present, else ``tokenizer.all_special_ids``) nor padding
    (``attention_mask == 0``). With ``n_b`` content tokens in sample ``b``, point ``i`` of the
    curve (``i = 0..steps``, x-axis ``i / steps``) has the ``floor(i * n_b / steps)`` most
    relevant (``most_relevant_first=True``; least relevant otherwise) content tokens removed;
    ties go by position. A removed token is replaced by ``[MASK]`` (``replacement="mask"``),
    ``[UNK]`` (``"unk"``), any token id (an int), or dropped from attention
    (``"pad"``: its ``attention_mask`` set to 0). ``curve.auc()`` is the trapezoid area over
    [0, 1]. Low AUC for ``most_relevant_first=True`` (and high for ``False``) is faithful.

    Parameters
    ----------
    model:
        A text classifier, called as ``model(**batch)`` (keys only a tokenizer uses, such as
        ``special_tokens_mask`` and ``offset_mapping``, are removed).
    batch:
        The dict a Hugging Face tokenizer returns (``input_ids``, ``attention_mask``, ...).
    relevance:
        A text :class:`attnx.Explanation` (its ``scores``) or a ``(B, T)`` tensor.
    target, measure, labels, batch_size:
        As in :func:`perturbation_curve` (default measure: softmax probability of the target).
    tokenizer:
        Gives the special-token ids and the ``[MASK]`` / ``[UNK]`` ids (any object with
        ``all_special_ids``, ``mask_token_id``, ``unk_token_id``).
    """
    data = _text_batch(batch)
    ids = data["input_ids"]
    B, T = ids.shape
    name = measure_name(measure)
    if not isinstance(steps, int) or steps < 1:
        raise AttnxValueError(f"steps must be a positive int, got {steps!r}")
    special = _special_mask(data, tokenizer)
    attention = data.get("attention_mask")
    attention = torch.ones_like(ids) if attention is None else torch.as_tensor(attention, device=ids.device)
    if attention.shape != ids.shape:
        raise AttnxValueError(f"attention_mask has shape {tuple(attention.shape)}, input_ids {tuple(ids.shape)}")
    content = attention.bool() & ~special
    scores = _text_scores(relevance, ids)

    replace_id = None
    if replacement in ("mask", "unk"):
        attr = f"{replacement}_token_id"
        replace_id = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if replace_id is None:
            raise AttnxValueError(
                f"replacement={replacement!r} needs the tokenizer's {attr}: pass tokenizer= (or a token id, or replacement='pad')"
            )
    elif isinstance(replacement, int) and not isinstance(replacement, bool):
        replace_id = replacement
    elif replacement != "pad":
        raise AttnxValueError(f"replacement must be 'mask', 'unk', 'pad' or a token id, got {replacement!r}")

    model_inputs = {k: v for k, v in data.items() if k not in _TOKENIZER_ONLY_KEYS}
    if replacement == "pad" and "attention_mask" not in model_inputs:
        model_inputs["attention_mask"] = attention

    def select(i: torch.Tensor) -> dict:
        i = i.to(ids.device)
        return {k: v[i] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v
                for k, v in model_inputs.items()}

    base_logits = forward_chunked(model, B, batch_size, select)
    tgt = resolve_target(target, relevance, base_logits)
    lab = None if labels is None else class_vector(labels, B, base_logits.shape[1], base_logits.device, "labels")
    base = apply_measure(measure, base_logits, tgt, lab)

    key = scores if most_relevant_first else -scores
    key = torch.where(content, key, torch.full_like(key, -math.inf))  # never removed: sorted last
    rank = ranks_descending(key)
    n = content.sum(dim=1)  # (B,)
    counts = torch.stack([(i * n) // steps for i in range(steps + 1)])  # (K, B)

    def build(k_idx: torch.Tensor, b_idx: torch.Tensor) -> dict:
        k_idx, b_idx = k_idx.to(ids.device), b_idx.to(ids.device)
        removed = (rank[b_idx] < counts[k_idx, b_idx][:, None]) & content[b_idx]
        out = select(b_idx)
        if replace_id is not None:
            out["input_ids"] = torch.where(removed, torch.full_like(out["input_ids"], replace_id), out["input_ids"])
        else:
            out["attention_mask"] = out["attention_mask"].masked_fill(removed, 0)
        return out

    values = run_points(model, build, counts != 0, base, measure, tgt, lab, batch_size)
    fractions = torch.tensor([i / steps for i in range(steps + 1)], dtype=torch.float64)
    order = "most" if most_relevant_first else "least"
    return Curve(fractions, values, name, f"token_deletion:{order}:{replacement}")


@dataclass
class RationaleScores:
    """Token-level precision, recall and F1 of predicted rationales, each ``(B,)``."""

    precision: torch.Tensor
    recall: torch.Tensor
    f1: torch.Tensor


def rationale_f1(
    relevance: RelevanceLike,
    rationale_mask: torch.Tensor,
    k: int | Sequence[int] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    special_tokens_mask: torch.Tensor | None = None,
) -> RationaleScores:
    """Token-level F1 of the ``k`` most relevant tokens against human rationales (ERASER).

    Per sample, the predicted rationale is the set of the ``k`` highest-scoring candidate tokens
    (candidates: ``attention_mask == 1`` and not ``special_tokens_mask``; all tokens when neither
    is given; ties by position; fewer than ``k`` candidates -> all of them). With ``R`` the
    rationale tokens: precision = |top-k ∩ R| / |top-k|, recall = |top-k ∩ R| / |R|,
    F1 = 2 P R / (P + R), each 0 when undefined. ERASER's token F1 averages the per-sample F1
    (``.f1.mean()``). The reference BERT evaluation of Chefer et al. scores words, taking each
    word's maximum over its word pieces and keeping only positive relevance; pool the scores
    to words yourself for that variant.

    Parameters
    ----------
    relevance:
        A text :class:`attnx.Explanation` (whose padding mask is used when ``attention_mask``
        is not given) or a ``(B, T)`` tensor.
    rationale_mask:
        ``(B, T)`` bool (or 0/1): the tokens annotated as rationale.
    k:
        Number of tokens to select: one int, or one per sample.
    """
    if isinstance(relevance, Explanation):
        if relevance.grid is not None:
            raise AttnxValueError("rationale_f1 scores text explanations; this one is of an image")
        scores = relevance.scores
        layout = relevance.layout
        if attention_mask is None and layout is not None and (layout.valid is not None or layout.columns is not None):
            attention_mask = layout.score_mask(len(relevance), scores.device)
    elif isinstance(relevance, torch.Tensor):
        scores = relevance
    else:
        raise AttnxTypeError(f"relevance must be an attnx Explanation or a (B, T) tensor, got {type(relevance).__name__}")
    scores = scores.detach()
    if scores.dim() != 2:
        raise AttnxValueError(f"expected (B, T) token relevance, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.float()
    check_finite(scores, "relevance")
    B, T = scores.shape
    truth = bool_mask(rationale_mask, (B, T), "rationale_mask").to(scores.device)
    candidates = torch.ones(B, T, dtype=torch.bool, device=scores.device)
    if attention_mask is not None:
        candidates &= bool_mask(attention_mask, (B, T), "attention_mask").to(scores.device)
    if special_tokens_mask is not None:
        candidates &= ~bool_mask(special_tokens_mask, (B, T), "special_tokens_mask").to(scores.device)
    if isinstance(k, bool) or isinstance(k, float):
        raise AttnxTypeError(f"k must be an int or one int per sample, got {k!r}")
    kk = torch.as_tensor(k, device=scores.device)
    if kk.is_floating_point():
        raise AttnxTypeError(f"k must hold ints, got dtype {kk.dtype}")
    kk = kk.long().reshape(-1).expand(B) if kk.numel() == 1 else kk.long().reshape(-1)
    if kk.numel() != B or (kk < 0).any():
        raise AttnxValueError(f"k must be a non-negative int or {B} of them, got {k!r}")
    key = torch.where(candidates, scores, torch.full_like(scores, -math.inf))
    rank = ranks_descending(key)
    picked = (rank < kk[:, None]) & candidates
    hits = (picked & truth).sum(dim=1).double()
    n_pred, n_true = picked.sum(dim=1).double(), truth.sum(dim=1).double()
    precision = torch.where(n_pred > 0, hits / n_pred.clamp(min=1), torch.zeros_like(hits))
    recall = torch.where(n_true > 0, hits / n_true.clamp(min=1), torch.zeros_like(hits))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(hits))
    return RationaleScores(precision, recall, f1)
