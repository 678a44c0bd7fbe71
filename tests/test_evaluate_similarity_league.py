"""The dinov2 league on one photo pair: occlusion computed independently, SaCo in range, the
sanity row, and a method that fails given a row (not a crash)."""
from __future__ import annotations

import math

import pytest
import torch

import attnx
from attnx.evaluate.columns import SANITY_ROW
from attnx.demo import real_photos

pytestmark = pytest.mark.skipif(real_photos.available() is not None, reason=f"DINOv2 photos: {real_photos.available()}")


def test_occlusion_drops_by_hand():
    from attnx.evaluate.similarity_league import occlusion_drops

    class Left(torch.nn.Module):  # score = mean of the left half
        def forward(self, x):
            return x[:, :, :, : x.shape[-1] // 2].mean(dim=(1, 2, 3))[:, None]

    image = torch.ones(3, 56, 56)
    drops = occlusion_drops(Left(), image, square=28)
    # a 28x28 square is half of the left half's rows: the mean drops by 1/2 on the left, 0 on the right
    assert torch.allclose(drops, torch.tensor([[0.5, 0.0], [0.5, 0.0]]))


def test_one_pair_with_a_failing_method():
    from attnx.methods.registry import register_method, unregister_method
    from attnx.evaluate.similarity_league import evaluate_similarity

    @register_method("always_fails", summary="test method that raises")
    def always_fails(trace, readout):
        raise ValueError("not defined on this model")

    try:
        t = evaluate_similarity(["rollout", "always_fails"], limit=1, baselines=False)
    finally:
        unregister_method("always_fails")
    assert t.methods == ["rollout", SANITY_ROW]
    assert t.failed == {"always_fails": "ValueError: not defined on this model"}
    r = t.row("rollout")
    assert -1 <= r["occlusion_r"] <= 1 and -1 <= r["saco"] <= 1 and r["ms_per_pair"] > 0
    assert math.isnan(r["saco_se"])  # one pair: no standard error
    assert "Failed on this model: always_fails" in t.to_markdown()
    assert "always_fails" not in attnx.list_methods()


def test_ordered_pairs_cover_every_photo_first():
    import itertools

    from attnx.evaluate.similarity_league import ordered_pairs

    names = ["a", "b", "c", "d", "e", "f"]
    pairs = ordered_pairs(names)
    assert sorted(pairs) == sorted(itertools.permutations(names, 2))
    assert sorted(a for a, _ in pairs[:6]) == names
