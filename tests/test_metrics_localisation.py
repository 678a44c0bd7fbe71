"""attnx.metrics localisation (segmentation protocol, pointing game, relevance mass, class
discrimination) against values computed by hand on tiny synthetic cases, then on a tiny real ViT
with real explanations.

The expected numbers are written as fractions with the arithmetic beside them; none is
obtained by calling the code under test.
"""
from __future__ import annotations

import pytest
import torch

import attnx
from attnx import metrics as M
from metrics_toys import close, explained_vit, top_left


# --------------------------------------------------------------------------------------------
# localisation
# --------------------------------------------------------------------------------------------
MAP44 = torch.tensor([[0.9, 0.8, 0.1, 0.0],
                      [0.7, 0.6, 0.2, 0.1],
                      [0.3, 0.2, 0.1, 0.0],
                      [0.1, 0.0, 0.0, 0.4]], dtype=torch.float64)
MASK44 = torch.tensor([[1, 1, 1, 0],
                       [1, 1, 0, 0],
                       [0, 0, 0, 0],
                       [0, 0, 0, 0]], dtype=torch.bool)
MAP22A, MASK22A = torch.tensor([[1.0, 0.5], [0.0, 0.25]], dtype=torch.float64), torch.tensor([[1, 0], [0, 1]]).bool()
MAP22B, MASK22B = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64), torch.tensor([[0, 1], [0, 0]]).bool()


def ap_by_definition(scores, labels) -> float:
    """Σ over distinct thresholds t (descending) of (R_t - R_{t-1}) P_t, written with loops."""
    pairs = list(zip(scores, labels))
    positives = sum(labels)
    if positives == 0:
        return 0.0
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        chosen = [y for s, y in pairs if s >= t]
        tp = sum(chosen)
        recall, precision = tp / positives, tp / len(chosen)
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def test_average_precision_by_hand_with_ties():
    scores = torch.tensor([[0.9, 0.8, 0.8, 0.3, 0.1], [0.9, 0.8, 0.8, 0.3, 0.1]])
    labels = torch.tensor([[1, 0, 1, 0, 1], [0, 0, 0, 0, 0]]).bool()
    # thresholds 0.9: P=1, R=1/3 | 0.8 (tie, one positive): P=2/3, R=2/3 | 0.3: dR=0 | 0.1: P=3/5, R=1
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 1/3 + 2/9 + 1/5 = 34/45; no positives -> 0
    assert close(M.average_precision(scores, labels), [34 / 45, 0.0])
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 5, (4, 30), generator=g).double() / 4  # many ties
    y = torch.rand(4, 30, generator=g) > 0.6
    want = [ap_by_definition(s[i].tolist(), y[i].long().tolist()) for i in range(4)]
    assert close(M.average_precision(s, y), want)


def test_segmentation_protocol_by_hand():
    # MAP44: min 0, max 0.9; normalised mean = (4.5 / 16) / 0.9; above it (raw > 0.28125):
    # 0.9, 0.8, 0.7, 0.6, 0.3, 0.4 -> foreground (0,0) (0,1) (1,0) (1,1) (2,0) (3,3)
    # mask: (0,0) (0,1) (0,2) (1,0) (1,1)
    # fg: inter 4, union 6 + 5 - 4 = 7        -> IoU 4/7
    # bg: inter 16 - 7 = 9, union 10 + 11 - 9 = 12 -> IoU 3/4
    # pixel accuracy (4 + 9) / 16 = 13/16; mIoU (4/7 + 3/4) / 2 = 37/56
    s = M.segmentation_scores(MAP44[None], MASK44[None])
    assert s.pixel_correct.tolist() == [13] and s.pixel_labeled.tolist() == [16]
    assert s.intersection.tolist() == [[9, 4]] and s.union.tolist() == [[12, 7]]
    assert close(s.pixel_accuracy, [13 / 16]) and close(s.iou, [[3 / 4, 4 / 7]]) and close(s.miou, [37 / 56])
    # AP input: the 16 foreground scores map/0.9 labelled by the mask and the 16 background scores
    # 1 - map/0.9 labelled by ~mask, pooled (32 entries, 16 positives)
    norm = (MAP44 / 0.9).flatten().tolist()
    pooled = [1 - v for v in norm] + norm
    truth = [int(not m) for m in MASK44.flatten().tolist()] + [int(m) for m in MASK44.flatten().tolist()]
    assert close(s.ap, [ap_by_definition(pooled, truth)], tol=1e-7)


def test_segmentation_ap_on_2x2_by_hand_and_meter():
    # MAP22A, mask (0,0) (1,1). Pooled (score, label): fg (1, 1) (.5, 0) (0, 0) (.25, 1);
    # bg (0, 0) (.5, 1) (1, 1) (.75, 0). 4 positives. Thresholds:
    # 1.0: 2 entries, both positive -> P = 1, dR = 2/4 | .75: dR = 0 | .5: tp 3 of 5 -> P = 3/5, dR = 1/4
    # .25: tp 4 of 6 -> P = 2/3, dR = 1/4 | 0: dR = 0.  AP = 1/2 + 3/20 + 1/6 = 49/60
    # threshold at the mean .4375: fg (0,0) (0,1); fg IoU 1/3, bg IoU 1/3, accuracy 2/4
    a = M.segmentation_scores(MAP22A[None], MASK22A[None])
    assert close(a.ap, [49 / 60]) and close(a.iou, [[1 / 3, 1 / 3]]) and close(a.pixel_accuracy, [0.5])
    # MAP22B is perfect: fg (0,1) only; the four score-1 entries are all positive -> AP 1
    b = M.segmentation_scores(MAP22B[None], MASK22B[None])
    assert close(b.ap, [1.0]) and close(b.iou, [[1, 1]]) and close(b.pixel_accuracy, [1.0])

    meter = M.SegmentationMeter()
    meter.update(MAP44[None], MASK44[None])
    meter.update(torch.stack([MAP22A, MAP22B]), torch.stack([MASK22A, MASK22B]))
    r = meter.compute()
    # counts summed over the three images:
    # correct 13 + 2 + 4 = 19 of 16 + 4 + 4 = 24
    # fg inter 4 + 1 + 1 = 6, union 7 + 3 + 1 = 11; bg inter 9 + 1 + 3 = 13, union 12 + 3 + 3 = 18
    assert r["images"] == 3
    assert close(r["pixel_accuracy"], 19 / 24, 1e-12)
    assert close(r["iou"], [13 / 18, 6 / 11], 1e-12)
    assert close(r["miou"], (13 / 18 + 6 / 11) / 2, 1e-12)
    ap44 = ap_by_definition([1 - v for v in (MAP44 / 0.9).flatten().tolist()] + (MAP44 / 0.9).flatten().tolist(),
                            [int(not m) for m in MASK44.flatten().tolist()] + [int(m) for m in MASK44.flatten().tolist()])
    assert close(r["mean_ap"], (ap44 + 49 / 60 + 1) / 3, 1e-7)
    # the dataset mIoU is not the mean of per-image mIoUs
    assert not close(r["miou"], (37 / 56 + 1 / 3 + 1) / 3, 1e-3)
    meter.reset()
    assert meter.compute()["images"] == 0


def test_segmentation_is_scale_invariant_and_upsamples_patch_maps():
    s1 = M.segmentation_scores(MAP44[None], MASK44[None])
    s2 = M.segmentation_scores(3 * MAP44[None] - 7, MASK44[None])
    assert torch.equal(s1.intersection, s2.intersection)
    # the pooled AP list has exact ties between foreground and background entries (0.8/0.9 and
    # 1 - 0.1/0.9), so only scalings that keep the floats exact keep the AP exact
    assert close(s1.ap, M.segmentation_scores(2 * MAP44[None], MASK44[None]).ap)
    assert close(s1.ap, s2.ap, 0.01)
    # a 2x2 patch map on 4x4 masks is bilinearly upsampled: a top-left patch map finds the top-left
    patch = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    s = M.segmentation_scores(patch, top_left()[None])
    assert s.intersection[0, 1] >= 3
    with pytest.raises(ValueError, match="masks"):
        M.segmentation_scores(MAP44[None], MASK44)
    with pytest.raises(ValueError, match="0 and 1"):
        M.segmentation_scores(MAP44[None], 2 * MASK44[None].long())


def test_pointing_game_by_hand():
    maps = torch.stack([MAP44, MAP44.flip(0).flip(1), torch.zeros(4, 4, dtype=torch.float64)])
    masks = top_left()[None].expand(3, 4, 4)
    # 1: max 0.9 at (0,0), in the mask | 2: max at (3,3), outside | 3: constant -> first pixel (0,0)
    assert M.pointing_game(maps, masks).tolist() == [True, False, True]
    # (3,3) is sqrt(2^2 + 2^2) = 2.83 pixels from the nearest mask pixel (1,1)
    assert M.pointing_game(maps, masks, tolerance=2).tolist() == [True, False, True]
    assert M.pointing_game(maps, masks, tolerance=3).tolist() == [True, True, True]


R44 = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                    [1.0, 0.0, 0.0, 0.0],
                    [0.0, 0.0, -3.0, 0.0],
                    [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)


def test_relevance_mass_by_hand():
    # positive relevance: 2 + 1 + 1 + 1 = 5, of which 2 + 1 + 1 = 4 in the top-left 2x2 -> 4/5
    masks = torch.stack([top_left(), top_left()])
    rel = torch.stack([R44, -R44.clamp(min=0)])  # the second has no positive relevance -> 0
    assert close(M.relevance_mass(rel, masks), [4 / 5, 0.0])


def test_class_discrimination_by_hand():
    other = torch.zeros(4, 4, dtype=torch.bool)
    other[2:, 2:] = True  # bottom-right 2x2: positive relevance 1 of 5
    d = M.class_discrimination(R44[None], top_left()[None], other[None])
    # masses 4/5 vs 1/5; score (4/5 - 1/5) / (4/5 + 1/5) = 3/5
    assert close(d.mass_target, [4 / 5]) and close(d.mass_other, [1 / 5]) and close(d.score, [3 / 5])
    assert d.correct.tolist() == [True]
    # a small target (pixel (3,3): mass 1/5) against a large other object (top-left 3x3: mass 4/5)
    target = torch.zeros(4, 4, dtype=torch.bool)
    target[3, 3] = True
    big = top_left(h=3, w=3)
    d = M.class_discrimination(R44[None], target[None], big[None])
    assert close(d.score, [(1 / 5 - 4 / 5) / 1]) and d.correct.tolist() == [False]
    # per pixel: (1/5) / (1/16) = 16/5 vs (4/5) / (9/16) = 64/45; score (144 - 64) / (144 + 64) = 5/13
    d = M.class_discrimination(R44[None], target[None], big[None], area_normalized=True)
    assert close(d.mass_target, [16 / 5]) and close(d.mass_other, [64 / 45]) and close(d.score, [5 / 13])
    assert d.correct.tolist() == [True]


# --------------------------------------------------------------------------------------------
# real explanations on a tiny model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    return explained_vit()


def test_localisation_on_a_real_vit(vit):
    model, x, e = vit
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    s = M.segmentation_scores(e, masks)
    t = M.segmentation_scores(e.heatmap(), masks)
    assert torch.equal(s.intersection, t.intersection) and close(s.ap, t.ap)
    assert ((s.ap >= 0) & (s.ap <= 1)).all()
    meter = M.SegmentationMeter()
    meter.update(e, masks)
    assert 0 <= meter.compute()["miou"] <= 1
    assert M.pointing_game(e, masks).shape == (3,)
    # LRP to the input: mass of its pixel relevance
    lrp = attnx.explain(model, x, method="lrp", patch_size=8)
    mass = M.relevance_mass(lrp, masks)
    pix = lrp.pixel_relevance.clamp(min=0)
    assert close(mass, (pix * masks).flatten(1).sum(1) / pix.flatten(1).sum(1), 1e-6)
    other = ~masks
    d = M.class_discrimination(lrp, masks, other)
    assert close(d.mass_target + d.mass_other, [1, 1, 1], 1e-6)
