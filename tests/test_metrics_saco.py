"""SaCo (Wu et al., CVPR 2024) against Algorithm 1 written out as loops, and on a linear model
whose prediction drops are known in closed form."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnx import metrics
from attnx.errors import AttnxValueError


def algorithm_1(salience: list[float], drops: list[float], K: int) -> float:
    """The paper's Algorithm 1, feature by feature: sort descending, K equal groups, pairwise weights."""
    order = sorted(range(len(salience)), key=lambda k: (-salience[k], k))
    n = len(salience)
    s = [0.0] * K
    d = [0.0] * K
    for rank, k in enumerate(order):
        s[rank * K // n] += salience[k]
    for g in range(K):
        d[g] = drops[g]
    F = total = 0.0
    for i in range(K - 1):
        for j in range(i + 1, K):
            w = s[i] - s[j] if d[i] >= d[j] else -(s[i] - s[j])
            F += w
            total += abs(w)
    return F / total


def test_coefficient_equals_the_written_out_algorithm():
    g = torch.Generator().manual_seed(0)
    for K in (2, 3, 5, 10):
        sal = torch.randn(4, 20, generator=g, dtype=torch.float64)
        drops = torch.randn(4, K, generator=g, dtype=torch.float64)
        groups = metrics.salience_groups(sal, K)
        sums = torch.stack([torch.stack([sal[b][groups[b] == k].sum() for k in range(K)]) for b in range(4)])
        got = metrics.saco_coefficient(sums, drops)
        for b in range(4):
            want = algorithm_1(sal[b].tolist(), drops[b].tolist(), K)
            assert abs(float(got[b]) - want) < 1e-12


def test_hand_computed_example():
    # s = (3, 2, 0), drops (0.1, 0.5, 0.0): pairs (0,1) gap 1 reversed, (0,2) gap 3 kept, (1,2) gap 2 kept
    got = metrics.saco_coefficient(torch.tensor([[3.0, 2.0, 0.0]]), torch.tensor([[0.1, 0.5, 0.0]]))
    assert float(got[0]) == pytest.approx((-1 + 3 + 2) / (1 + 3 + 2))


def test_constant_map_is_undefined():
    got = metrics.saco_coefficient(torch.ones(1, 4), torch.randn(1, 4))
    assert math.isnan(float(got[0]))


class Linear(nn.Module):
    """Logit 0 = Σ w ⊙ x over a 4x4 single-channel image, logit 1 = 0."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x[:, 0] * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_end_to_end_on_a_linear_model():
    w = torch.arange(16, dtype=torch.float64).reshape(4, 4) / 16
    model = Linear(w)
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    # the true contributions w ⊙ x rank the groups exactly as their logit drops: F = 1; reversed: -1
    assert float(metrics.saco(model, x, w[None], target=0, groups=4, measure="logit")[0]) == pytest.approx(1.0)
    assert float(metrics.saco(model, x, -w[None], target=0, groups=4, measure="logit")[0]) == pytest.approx(-1.0)
    # a scrambled map against the independently computed drops (a removed pixel becomes 0: drop = its w)
    sal = torch.randn(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    order = sorted(range(16), key=lambda k: (-float(sal[k]), k))
    drops = [sum(float(w.flatten()[k]) for k in order[4 * g:4 * g + 4]) for g in range(4)]
    got = metrics.saco(model, x, sal.reshape(1, 4, 4), target=0, groups=4, measure="logit", batch_size=3)
    assert float(got[0]) == pytest.approx(algorithm_1(sal.tolist(), drops, 4), abs=1e-12)


def test_bad_group_count():
    with pytest.raises(AttnxValueError, match="groups"):
        metrics.salience_groups(torch.randn(1, 5), 6)
