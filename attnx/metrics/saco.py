"""The salience-guided faithfulness coefficient (SaCo) of Wu et al., CVPR 2024.

"On the Faithfulness of Vision Transformer Explanations" (Wu, Kang, Tang, Song, Tian, Zhang):
a map is faithful when the parts it scores higher change the prediction more. The features
(patches of the map) are sorted by salience and split into ``K`` equal groups ``G_1 .. G_K``
(most salient first). For each group, ``s(G_i)`` is the sum of its salience and
``∇pred(G_i) = p(x) - p(x with G_i removed)`` the drop of the explained class's measure when
only that group is removed. Over every pair ``i < j`` (so ``s(G_i) >= s(G_j)``)::

    w_ij = s(G_i) - s(G_j)      if ∇pred(G_i) >= ∇pred(G_j)
    w_ij = -(s(G_i) - s(G_j))   otherwise
    F    = Σ w_ij / Σ |w_ij|                                  (Algorithm 1 of the paper)

``F`` lies in ``[-1, 1]``: ``1`` when the groups' effects are ordered as their salience, ``-1``
when reversed. Unlike area-under-curve metrics, a map whose ranking is right but whose salience
gaps are wrong is penalised in proportion to the gaps; a random map scores about ``0``. A map
whose groups all carry the same salience has no ordering: ``F`` is NaN.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import AttnxValueError
from .common import RelevanceLike, ranks_descending
from .curves import check_images, fill_values, image_relevance
from .measures import Measure, apply_measure, forward_chunked, measure_name, resolve_target, run_points

__all__ = ["saco", "saco_coefficient", "salience_groups"]


def salience_groups(salience: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, n)`` group index of every feature: ``0`` for the most salient ``n / K`` features, ...,
    ``K - 1`` for the least salient (``floor(rank * K / n)``; ties keep index order)."""
    n = salience.shape[1]
    if not isinstance(groups, int) or isinstance(groups, bool) or not 2 <= groups <= n:
        raise AttnxValueError(f"groups must be an int in [2, {n}] (the number of features), got {groups!r}")
    return ranks_descending(salience) * groups // n


def saco_coefficient(group_salience: torch.Tensor, prediction_drop: torch.Tensor) -> torch.Tensor:
    """``F`` of Algorithm 1 from the groups' salience sums and prediction drops, both ``(B, K)``
    with group 0 the most salient. Returns ``(B,)``; NaN where every pair's salience gap is 0."""
    s = group_salience.double()
    d = prediction_drop.double()
    K = s.shape[1]
    i, j = torch.triu_indices(K, K, offset=1)
    gap = s[:, i] - s[:, j]  # >= 0 by the sort
    sign = torch.where(d[:, i] >= d[:, j], 1.0, -1.0).to(s.dtype)
    weight = sign * gap
    total = weight.abs().sum(dim=1)
    out = weight.sum(dim=1) / total
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))


def saco(
    model: Callable,
    inputs: torch.Tensor,
    relevance: RelevanceLike,
    target: Any = None,
    *,
    groups: int = 10,
    granularity: str = "patch",
    baseline: Any = 0.0,
    mean: Any = None,
    std: Any = None,
    measure: Measure = "probability",
    grid: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """SaCo of each sample of an image batch (:mod:`attnx.metrics.saco`).

    Parameters
    ----------
    model:
        The image model (called as ``model(x)``; wrap others in a lambda).
    inputs:
        ``(B, C, H, W)`` images, as the model takes them.
    relevance:
        An :class:`attnx.Explanation` or a ``(B, h, w)`` / ``(B, P)`` / ``(B, H, W)`` tensor.
    target:
        Explained class per sample; default: the explanation's targets, else the prediction.
    groups:
        ``K``, the number of salience groups (10 in the paper).
    granularity:
        ``"patch"`` (the map's own cells, the default) or ``"pixel"``.
    baseline, mean, std:
        The value a removed feature takes, as in :func:`attnx.metrics.perturbation_curve`
        (default 0: black in pixel space with ``mean``/``std``, else 0 in the model's input).
    measure:
        What ``p`` is: ``"probability"`` (softmax of the class, the paper's), ``"sigmoid"``,
        ``"logit"`` or a callable ``(logits, target) -> (B,)``.
    batch_size:
        At most this many perturbed images per model call.

    Returns
    -------
    torch.Tensor
        ``(B,)`` float64 in ``[-1, 1]``; NaN for a map without any salience gap between groups.
    """
    x = check_images(inputs)
    B, C, H, W = x.shape
    measure_name(measure)
    key, g = image_relevance(relevance, B, H, W, granularity, grid)
    key = key.to(x.device)
    group = salience_groups(key, groups)  # (B, n)
    one_hot = torch.nn.functional.one_hot(group, groups).to(key.dtype)  # (B, n, K)
    group_salience = torch.einsum("bn,bnk->bk", key, one_hot)
    fill = fill_values(baseline, x, mean, std)
    base_logits = forward_chunked(model, B, batch_size, lambda i: x[i.to(x.device)])
    tgt = resolve_target(target, relevance, base_logits)
    base = apply_measure(measure, base_logits, tgt, None)

    def build(k_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
        k_idx, b_idx = k_idx.to(x.device), b_idx.to(x.device)
        removed = group[b_idx] == k_idx[:, None]  # (m, n)
        if g is None:
            removed = removed.view(-1, 1, H, W)
        else:
            removed = removed.view(-1, 1, *g).repeat_interleave(H // g[0], 2).repeat_interleave(W // g[1], 3)
        return torch.where(removed, fill[b_idx], x[b_idx])

    todo = torch.ones(groups, B, dtype=torch.bool)
    removed = run_points(model, build, todo, base, measure, tgt, None, batch_size)  # (B, K)
    return saco_coefficient(group_salience, base[:, None] - removed)
