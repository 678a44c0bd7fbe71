"""attnx.metrics: every metric against values computed by hand on tiny synthetic cases, then
one run per family on a tiny real ViT / BERT with real explanations.

The expected numbers are written as fractions with the arithmetic beside them; none is
obtained by calling the code under test.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import attnx
from attnx import metrics as M
from conftest import CASES, text_inputs


# --------------------------------------------------------------------------------------------
# toy models
# --------------------------------------------------------------------------------------------
class RegionSum(nn.Module):
    """Logits ``[Σ_{region} x - offset, 0]`` summed over the channels; a region-detector."""

    def __init__(self, region: torch.Tensor, offset: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("region", region.bool())
        self.offset = offset
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = (x.sum(dim=1) * self.region).flatten(1).sum(dim=1) - self.offset
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def top_left(H=4, W=4, h=2, w=2) -> torch.Tensor:
    r = torch.zeros(H, W, dtype=torch.bool)
    r[:h, :w] = True
    return r


def ones(B=1, C=1, H=4, W=4, dtype=torch.float64) -> torch.Tensor:
    return torch.ones(B, C, H, W, dtype=dtype)


PERFECT = top_left().double()[None]  # relevance 1 on the region, 0 elsewhere
INVERTED = 1 - PERFECT


def close(a, b, tol=1e-9) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# --------------------------------------------------------------------------------------------
# perturbation test (Chefer et al.)
# --------------------------------------------------------------------------------------------
def test_perturbation_perfect_map_is_best_and_inverted_worst():
    model = RegionSum(top_left())
    x = ones()
    fr = (0.25, 0.5, 0.75, 1.0)  # int(16 f) = 4, 8, 12, 16 pixels
    pos = M.perturbation_curve(model, x, PERFECT, target=0, fractions=fr, measure="logit")
    inv = M.perturbation_curve(model, x, INVERTED, target=0, fractions=fr, measure="logit")
    # perfect: the 4 region pixels go first -> logit 4, then 0 from the first step on
    assert close(pos.values, [[4, 0, 0, 0, 0]])
    # inverted: the 12 other pixels go first (4, 8, 12 of them), the region only at the end
    assert close(inv.values, [[4, 4, 4, 4, 0]])
    assert close(pos.fractions, [0, 0.25, 0.5, 0.75, 1.0])
    # trapezoid, dx = 1/4: perfect (4+0)/2 * 1/4 = 1/2; inverted (4+4+4 + (4+0)/2) * 1/4 = 7/2
    assert close(pos.auc(), [0.5]) and close(inv.auc(), [3.5])
    # any other order lies between the two
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        rnd = M.perturbation_curve(model, x, torch.rand(1, 4, 4, generator=g, dtype=torch.float64), target=0,
                                   fractions=fr, measure="logit")
        assert 0.5 <= rnd.auc().item() <= 3.5
    # negative perturbation removes the least relevant first: the roles swap
    neg = M.perturbation_curve(model, x, PERFECT, target=0, mode="negative", fractions=fr, measure="logit")
    assert close(neg.values, [[4, 4, 4, 4, 0]])


def test_perturbation_default_fractions_counts_and_auc():
    # logit = Σ x over the whole 4x4 image of ones; removing int(16 f) pixels (set to 0):
    # f = .1 .2 .3 .4 .5 .6 .7 .8 .9 -> int(1.6, 3.2, 4.8, 6.4, 8, 9.6, 11.2, 12.8, 14.4)
    #                                  = 1, 3, 4, 6, 8, 9, 11, 12, 14 pixels removed
    model = RegionSum(torch.ones(4, 4))
    rel = torch.arange(16, dtype=torch.float64).view(1, 4, 4)
    c = M.perturbation_curve(model, ones(), rel, target=0, measure="logit")
    assert close(c.values, [[16, 15, 13, 12, 10, 8, 7, 5, 4, 2]])
    assert close(c.fractions, [0, .1, .2, .3, .4, .5, .6, .7, .8, .9])
    # AUC over x in [0, 0.9], dx = 0.1: 0.1 * ((16 + 2)/2 + 15+13+12+10+8+7+5+4) = 0.1 * 83 = 8.3
    assert close(c.auc(), [8.3])
    # end_value=0 appends (1.0, 0): + 0.1 * (2 + 0)/2 = 0.1
    assert close(c.auc(end_value=0.0), [8.4])
    assert close(c.auc(normalize=True), [8.3 / 0.9])
    assert c.protocol == "perturbation:positive:pixel" and c.measure == "logit"


def test_perturbation_removes_the_highest_regardless_of_scale_and_breaks_ties_by_position():
    model = RegionSum(torch.zeros(4, 4).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(1.0)))
    flat = torch.zeros(1, 4, 4, dtype=torch.float64)  # all tied: row-major order, pixel (0, 0) first
    c = M.perturbation_curve(model, ones(), flat, target=0, fractions=(1 / 16,), measure="logit")
    assert close(c.values, [[1, 0]])
    c = M.perturbation_curve(model, ones(), flat, target=0, mode="negative", fractions=(15 / 16,), measure="logit")
    assert close(c.values, [[1, 0]])  # negative on ties: also row-major, 15 of them include (0, 0)


def test_perturbation_baseline_in_pixel_space_and_other_baselines():
    model = RegionSum(torch.ones(4, 4))
    x = ones(C=3)
    half = (0.5,) * 3
    # pixel 0 with mean = std = 0.5 is (0 - 0.5)/0.5 = -1 in input space: removing 8 of 16 pixels
    # in 3 channels gives 3 * (8 * 1 + 8 * (-1)) = 0
    c = M.perturbation_curve(model, x, PERFECT.expand(1, 4, 4), target=0, fractions=(0.5,), baseline=0.0,
                             mean=half, std=half, measure="logit")
    assert close(c.values, [[48, 0]])
    # a number without mean/std is a value in input space: 3 * (8 + 8 * 0.25) = 30
    c = M.perturbation_curve(model, x, PERFECT, target=0, fractions=(0.5,), baseline=0.25, measure="logit")
    assert close(c.values, [[48, 30]])
    # a per-channel tensor (C,): 8 * 1 * 3 + 8 * (1 + 2 + 3) = 72
    c = M.perturbation_curve(model, x, PERFECT, target=0, fractions=(0.5,), baseline=torch.tensor([1.0, 2.0, 3.0]),
                             measure="logit")
    assert close(c.values, [[48, 72]])
    # "mean": the image's per-channel mean (1 for an image of ones) -> unchanged
    xm = x.clone()
    xm[:, :, 0, 0] = 17.0  # channel means (17 + 15) / 16 = 2; region sum 3 * (17 + 15) = 96
    c = M.perturbation_curve(model, xm, PERFECT, target=0, fractions=(1 / 16,), baseline="mean", measure="logit")
    # the most relevant pixel, (0, 0), becomes 2 in every channel: 96 - 3 * 17 + 3 * 2 = 51
    assert close(c.values, [[96, 51]])
    # a callable
    c = M.perturbation_curve(model, x, PERFECT, target=0, fractions=(0.5,), baseline=lambda t: 2 * t, measure="logit")
    assert close(c.values, [[48, 72]])  # 3 * (8 + 8 * 2)


def test_perturbation_patch_granularity():
    # 4x4 image, 2x2 grid of 2x2 patches; the model reads the top-left patch only
    model = RegionSum(top_left())
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2]], dtype=torch.float64)  # top-right patch first, then bottom-left
    c = M.perturbation_curve(model, ones(), scores, target=0, fractions=(0.25, 0.5, 0.75), granularity="patch",
                             measure="logit")
    # int(4 f) = 1, 2, 3 patches; the top-left patch (score 0.1) is the 4th, never removed
    assert close(c.values, [[4, 4, 4, 4]])
    c = M.perturbation_curve(model, ones(), scores, target=0, fractions=(0.25, 0.5, 0.75), granularity="patch",
                             measure="logit", mode="negative")
    assert close(c.values, [[4, 0, 0, 0]])  # top-left is the least relevant: removed first
    assert c.protocol == "perturbation:negative:patch"
    # the same through a (B, h, w) map and an explicit grid
    c2 = M.perturbation_curve(model, ones(), scores.view(1, 2, 2), target=0, fractions=(0.25, 0.5, 0.75),
                              granularity="patch", measure="logit", mode="negative")
    assert torch.equal(c.values, c2.values)
    with pytest.raises(ValueError, match="grid"):
        M.perturbation_curve(model, ones(), torch.ones(1, 3), granularity="patch")


def test_measures_accuracy_labels_probability_sigmoid_present_callable():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.tensor([[2.0, -1.0, 0.0]], dtype=torch.float64).expand(x.shape[0], 3)

    x, rel = ones(B=2), torch.rand(2, 4, 4, dtype=torch.float64)
    kw = dict(fractions=(0.5,))
    # prediction is class 0 for both samples
    assert close(M.perturbation_curve(Fixed(), x, rel, **kw).values, [[1, 1], [1, 1]])
    assert close(M.perturbation_curve(Fixed(), x, rel, labels=[0, 2], **kw).values, [[1, 1], [0, 0]])
    assert close(M.perturbation_curve(Fixed(), x, rel, target=1, **kw).values, [[0, 0], [0, 0]])
    # softmax of (2, -1, 0) at class 1: e^-1 / (e^2 + e^-1 + 1)
    p1 = math.exp(-1) / (math.exp(2) + math.exp(-1) + 1)
    assert close(M.perturbation_curve(Fixed(), x, rel, target=1, measure="probability", **kw).values, [[p1] * 2] * 2)
    # sigmoid(-1) = 1 / (1 + e)
    assert close(M.perturbation_curve(Fixed(), x, rel, target=[1, 1], measure="sigmoid", **kw).values,
                 [[1 / (1 + math.e)] * 2] * 2)
    assert close(M.perturbation_curve(Fixed(), x, rel, target=[0, 1], measure="present", **kw).values, [[1, 1], [0, 0]])
    assert close(M.perturbation_curve(Fixed(), x, rel, target=2, measure="logit", **kw).values, [[0, 0], [0, 0]])

    def margin(logits, target):
        return logits.gather(1, target[:, None])[:, 0] - logits.max(dim=1).values

    c = M.perturbation_curve(Fixed(), x, rel, target=[0, 2], measure=margin, **kw)
    assert close(c.values, [[0, 0], [-2, -2]]) and c.measure == "margin"


def test_curve_auc_trapezoid_on_irregular_fractions_and_cat():
    c = M.Curve(torch.tensor([0.0, 0.1, 0.4, 1.0], dtype=torch.float64),
                torch.tensor([[1.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64), "logit")
    # sample 0: 0.1 * (1 + .5)/2 + 0.3 * (.5 + .5)/2 + 0.6 * (.5 + 0)/2 = 0.075 + 0.15 + 0.15 = 0.375
    # sample 1: 0.1 * 0 + 0.3 * (0 + 1)/2 + 0.6 * (1 + 1)/2 = 0.15 + 0.6 = 0.75
    assert close(c.auc(), [0.375, 0.75])
    assert close(c.mean_auc(), (0.375 + 0.75) / 2)
    assert close(c.mean, [0.5, 0.25, 0.75, 0.5])
    both = M.Curve.cat([c, c])
    assert both.values.shape == (4, 4) and close(both.auc(), [0.375, 0.75, 0.375, 0.75])
    with pytest.raises(ValueError, match="fractions"):
        M.Curve.cat([c, M.Curve(torch.tensor([0.0, 1.0]), torch.zeros(1, 2), "logit")])


def test_deletion_and_insertion_follow_rise():
    model = RegionSum(top_left())
    x = ones()
    # default step = one image row (4 pixels) -> 4 steps, points remove 0, 4, 8, 12, 16 pixels
    d = M.deletion_curve(model, x, PERFECT, target=0, measure="logit")
    assert close(d.fractions, [0, .25, .5, .75, 1]) and close(d.values, [[4, 0, 0, 0, 0]])
    # RISE's normalised area: (Σ v - (v0 + vn)/2) / n = (4 - 2) / 4 = 1/2
    assert close(d.auc(), [0.5])
    d_inv = M.deletion_curve(model, x, INVERTED, target=0, measure="logit")
    assert close(d_inv.values, [[4, 4, 4, 4, 0]]) and close(d_inv.auc(), [(16 - 2) / 4])
    # insertion from a zero canvas: perfect map puts the region back first
    i = M.insertion_curve(model, x, PERFECT, target=0, baseline=0.0, measure="logit")
    assert close(i.values, [[0, 4, 4, 4, 4]]) and close(i.auc(), [(16 - 2) / 4])  # (0+4*4 - (0+4)/2)/4 = 7/2
    i_inv = M.insertion_curve(model, x, INVERTED, target=0, baseline=0.0, measure="logit")
    assert close(i_inv.values, [[0, 0, 0, 0, 4]]) and close(i_inv.auc(), [0.5])
    assert i.protocol == "insertion:pixel"
    # steps=3: floor(i * 16 / 3) = 0, 5, 10, 16 pixels; x-axis 0, 1/3, 2/3, 1
    rel = torch.arange(16, 0, -1, dtype=torch.float64).view(1, 4, 4)  # row-major order
    d3 = M.deletion_curve(RegionSum(torch.ones(4, 4)), x, rel, target=0, steps=3, measure="logit")
    assert close(d3.values, [[16, 11, 6, 0]]) and close(d3.fractions, [0, 1 / 3, 2 / 3, 1])
    # step_size=6: ceil(16 / 6) = 3 steps removing 0, 6, 12, 16
    d6 = M.deletion_curve(RegionSum(torch.ones(4, 4)), x, rel, target=0, step_size=6, measure="logit")
    assert close(d6.values, [[16, 10, 4, 0]])
    # patches: one patch per step by default
    dp = M.deletion_curve(model, x, torch.tensor([[0.9, 0.1, 0.2, 0.3]], dtype=torch.float64), target=0,
                          granularity="patch", measure="logit")
    assert close(dp.values, [[4, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="not both"):
        M.deletion_curve(model, x, PERFECT, steps=2, step_size=3)


def test_gaussian_blur_is_normalised():
    x = torch.ones(1, 2, 21, 21, dtype=torch.float64)
    b = M.gaussian_blur(x)
    assert close(b[0, :, 10, 10], [1.0, 1.0])  # far from the border the kernel sums to 1
    assert b[0, 0, 0, 0] < 0.5  # zero padding at the corner, as RISE's substrate
    # the default insertion baseline is the blurred image: its first point is the blurred input
    model = RegionSum(torch.ones(21, 21))
    c = M.insertion_curve(model, x, torch.rand(1, 21, 21, dtype=torch.float64), target=0, steps=1, measure="logit")
    assert close(c.values[0, 0], b.sum()) and close(c.values[0, 1], x.sum())


def test_curves_leave_the_model_alone_and_chunk_batches():
    model = RegionSum(top_left()).train()
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    rel = torch.rand(3, 4, 4, dtype=torch.float64)
    a = M.perturbation_curve(model, x.detach(), rel, target=0, measure="logit")
    calls = model.calls
    b = M.perturbation_curve(model, x.detach(), rel, target=0, measure="logit", batch_size=2)
    assert torch.equal(a.values, b.values)
    # 27 perturbed images + 3 unperturbed in chunks of 2: 14 + 2 calls
    assert model.calls - calls == 16
    assert model.training and x.grad is None and torch.is_grad_enabled()
    assert a.values.dtype == torch.float64


def test_curve_errors_name_what_was_expected():
    model = RegionSum(top_left())
    x = ones(B=2)
    with pytest.raises(ValueError, match="2 samples|samples"):
        M.perturbation_curve(model, x, torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="mode must be"):
        M.perturbation_curve(model, x, torch.rand(2, 4, 4), mode="top")
    with pytest.raises(ValueError, match="fractions"):
        M.perturbation_curve(model, x, torch.rand(2, 4, 4), fractions=(0.5, 0.2))
    with pytest.raises(ValueError, match="out of range"):
        M.perturbation_curve(model, x, torch.rand(2, 4, 4), target=5)
    with pytest.raises(ValueError, match="unknown measure"):
        M.perturbation_curve(model, x, torch.rand(2, 4, 4), measure="f1")
    with pytest.raises(ValueError, match="broadcast"):
        M.perturbation_curve(model, x, torch.rand(2, 4, 4), baseline=torch.zeros(5))
    with pytest.raises(ValueError, match="both mean and std"):
        M.perturbation_curve(model, x, torch.rand(2, 4, 4), mean=(0.5,))
    with pytest.raises(TypeError, match="image batch"):
        M.perturbation_curve(model, [x], torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        M.perturbation_curve(model, x, torch.full((2, 4, 4), math.nan))
    with pytest.raises(ValueError, match="granularity"):
        M.perturbation_curve(model, x, torch.rand(2, 4, 4), granularity="superpixel")


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
# text
# --------------------------------------------------------------------------------------------
PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
TOK = SimpleNamespace(all_special_ids=[PAD, CLS, SEP, MASK, UNK], mask_token_id=MASK, unk_token_id=UNK,
                      pad_token_id=PAD)


class BagOfWords(nn.Module):
    """Logit 0 = Σ weight[id] over attended tokens; [CLS] weighs 10 so that removing it would show."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(10, dtype=torch.float64)
        w[CLS], w[5], w[6], w[7] = 10, 3, 2, 1
        self.register_buffer("w", w)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        s = (self.w[input_ids] * mask).sum(dim=1)
        return SimpleNamespace(logits=torch.stack([s, torch.zeros_like(s)], dim=1))


def toy_batch(special_mask: bool = True) -> dict:
    ids = torch.tensor([[CLS, 5, 6, 7, 8, SEP, PAD], [CLS, 7, 5, SEP, PAD, PAD, PAD]])
    batch = {"input_ids": ids, "attention_mask": (ids != PAD).long(), "token_type_ids": torch.zeros_like(ids)}
    if special_mask:
        batch["special_tokens_mask"] = torch.isin(ids, torch.tensor([PAD, CLS, SEP])).long()
    return batch


# sample 0 in perfect order (CLS, SEP and PAD get huge scores that must be ignored); sample 1: 5 before 7
TOY_REL = torch.tensor([[100, 3, 2, 1, 0, 50, 99], [100, 0, 1, 60, 70, 80, 90]], dtype=torch.float64)


def test_token_deletion_by_hand():
    model = BagOfWords()
    c = M.token_deletion_curve(model, toy_batch(), TOY_REL, target=0, steps=4, measure="logit", tokenizer=TOK)
    # sample 0: 10 + 3 + 2 + 1 + 0 = 16; 4 content tokens, floor(i * 4 / 4) = i removed: 5, 6, 7, 8
    #           -> 16, 13, 11, 10, 10;  AUC 1/4 * ((16 + 10)/2 + 13 + 11 + 10) = 47/4
    # sample 1: 10 + 1 + 3 = 14; 2 content tokens, floor(i * 2 / 4) = 0, 0, 1, 1, 2 removed: 5 then 7
    #           -> 14, 14, 11, 11, 10;  AUC 1/4 * ((14 + 10)/2 + 14 + 11 + 11) = 12
    assert close(c.values, [[16, 13, 11, 10, 10], [14, 14, 11, 11, 10]])
    assert close(c.fractions, [0, .25, .5, .75, 1]) and close(c.auc(), [47 / 4, 12])
    # "pad" drops the tokens from attention: the same values; "unk" and a raw id too (weight 0)
    for repl in ("pad", "unk", 9):
        ci = M.token_deletion_curve(model, toy_batch(), TOY_REL, target=0, steps=4, measure="logit",
                                    tokenizer=TOK, replacement=repl)
        assert torch.equal(ci.values, c.values), repl
    # least relevant first, sample 0: 8, 7, 6, 5 -> 16, 16, 15, 13, 10; AUC 1/4 * (13 + 16 + 15 + 13) = 57/4
    lr = M.token_deletion_curve(model, toy_batch(), TOY_REL, target=0, steps=4, measure="logit", tokenizer=TOK,
                                most_relevant_first=False)
    assert close(lr.values[0], [16, 16, 15, 13, 10]) and close(lr.auc()[0], 57 / 4)
    # special tokens from the tokenizer instead of the batch's special_tokens_mask
    ct = M.token_deletion_curve(model, toy_batch(False), TOY_REL, target=0, steps=4, measure="logit", tokenizer=TOK)
    assert torch.equal(ct.values, c.values)


def test_token_deletion_errors():
    model = BagOfWords()
    with pytest.raises(ValueError, match="special_tokens_mask|tokenizer"):
        M.token_deletion_curve(model, toy_batch(False), TOY_REL, replacement=9)
    with pytest.raises(ValueError, match="mask_token_id"):
        M.token_deletion_curve(model, toy_batch(), TOY_REL)  # no tokenizer for [MASK]
    with pytest.raises(ValueError, match="one value per token"):
        M.token_deletion_curve(model, toy_batch(), TOY_REL[:, :5], tokenizer=TOK)
    with pytest.raises(TypeError, match="input_ids"):
        M.token_deletion_curve(model, torch.zeros(2, 7), TOY_REL, tokenizer=TOK)
    with pytest.raises(ValueError, match="replacement"):
        M.token_deletion_curve(model, toy_batch(), TOY_REL, tokenizer=TOK, replacement="drop")


def test_rationale_f1_by_hand():
    scores = torch.tensor([[9, 5, 4, 3, 1, 8], [0, 1, 2, 3, 0, 0]], dtype=torch.float64)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    special = torch.tensor([[1, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]])
    rationale = torch.tensor([[0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]]).bool()
    r = M.rationale_f1(scores, rationale, 2, attention_mask=attention, special_tokens_mask=special)
    # sample 0: candidates 1..4 (scores 5 4 3 1) -> top-2 {1, 2}; hits {1}: P 1/2, R 1/3,
    #           F1 = 2 * 1/2 * 1/3 / (1/2 + 1/3) = (1/3) / (5/6) = 2/5
    # sample 1: candidates 1..3 -> top-2 {3, 2}; both in the rationale: P = R = F1 = 1
    assert close(r.precision, [1 / 2, 1]) and close(r.recall, [1 / 3, 1]) and close(r.f1, [2 / 5, 1])
    # k per sample; sample 1 with k = 5 has only 3 candidates: P 2/3, R 1, F1 = 2 * 2/3 / (5/3) = 4/5
    r = M.rationale_f1(scores, rationale, [2, 5], attention_mask=attention, special_tokens_mask=special)
    assert close(r.f1, [2 / 5, 4 / 5])
    # no rationale -> 0; without masks every token is a candidate: top-2 of sample 0 = {0, 5}: no hit
    r = M.rationale_f1(scores, torch.zeros(2, 6, dtype=torch.bool), 2)
    assert close(r.f1, [0, 0])
    assert close(M.rationale_f1(scores, rationale, 2).precision, [0, 1])
    with pytest.raises(ValueError, match="rationale_mask"):
        M.rationale_f1(scores, rationale[:, :4], 2)


# --------------------------------------------------------------------------------------------
# correlations and parameter randomisation
# --------------------------------------------------------------------------------------------
def test_spearman_and_pearson_by_hand():
    a = torch.tensor([[1.0, 2, 3, 4], [1.0, 2, 2, 3]])
    b = torch.tensor([[1.0, 3, 2, 4], [1.0, 2, 3, 4]])
    # row 0: d = (0, -1, 1, 0), Σ d² = 2, rho = 1 - 6 * 2 / (4 * 15) = 4/5
    # row 1: ranks of a (1, 2.5, 2.5, 4); centred (-1.5, 0, 0, 1.5) and (-1.5, -.5, .5, 1.5):
    #        4.5 / sqrt(4.5 * 5) = sqrt(9/10)
    assert close(M.spearman(a, b), [4 / 5, math.sqrt(0.9)])
    # pearson((1, 2, 3), (1, 2, 4)): centred (-1, 0, 1), (-4/3, -1/3, 5/3): 3 / sqrt(2 * 42/9) = 9 / sqrt(84)
    assert close(M.pearson(torch.tensor([[1.0, 2, 3]]), torch.tensor([[1.0, 2, 4]])), [9 / math.sqrt(84)])
    assert close(M.spearman(a, 10 * a + 3), [1, 1])
    # a mask keeps each sample's True entries: row 0 without its last entry: (1, 2, 3) vs (1, 3, 2):
    # d = (0, -1, 1), rho = 1 - 6 * 2 / (3 * 8) = 1/2; row 1 without its first: (2, 2, 3) vs (2, 3, 4):
    # ranks (1.5, 1.5, 3) centred (-.5, -.5, 1) vs (-1, 0, 1): 1.5 / sqrt(1.5 * 2) = sqrt(3)/2
    keep = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]).bool()
    assert close(M.spearman(a, b, keep), [1 / 2, math.sqrt(3) / 2])
    assert torch.isnan(M.pearson(torch.ones(1, 3), torch.rand(1, 3))).all()


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for n, m in model.named_modules()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "params": {n: id(p) for n, p in model.named_parameters()},
    }


def test_parameter_randomisation_leaves_the_model_untouched():
    case = CASES["timm_vit"]
    model = case.model()
    model.blocks[1].train()  # mixed modes must survive (the tiny model has no dropout)
    handle = model.head.register_forward_hook(lambda m, i, o: None)
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)
    before = snapshot(model)
    x = case.inputs(batch=2)
    r = M.parameter_randomisation(model, x, "generic")
    after = snapshot(model)
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    assert before["training"] == after["training"] and before["hooks"] == after["hooks"]
    assert before["params"] == after["params"]
    assert after["grads"][next(iter(after["grads"]))] is first.grad and torch.equal(first.grad, torch.full_like(first, 0.5))
    assert all(g is None for n, g in list(after["grads"].items())[1:])
    handle.remove()
    # default steps: the head (final norm + classifier), the blocks top down, the embeddings
    assert r.layers == ["none", "head", "blocks.2", "blocks.1", "blocks.0", "embeddings"]
    assert r.spearman.shape == (6, 2) and r.maps.shape == (6, 2, 16)
    assert close(r.spearman[0], [1, 1]) and close(r.pearson[0], [1, 1])
    assert (r.spearman[-1] < 0.999).all()  # a fully random model explains differently


def test_parameter_randomisation_without_layers_and_orders():
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(batch=2)
    r = M.parameter_randomisation(model, x, "rollout", layers=[])
    assert r.layers == ["none"] and close(r.spearman, [[1, 1]]) and close(r.spearman_abs, [[1, 1]])
    casc = M.parameter_randomisation(model, x, "rollout", layers=["blocks.2", "blocks.1"], seed=3)
    ind = M.parameter_randomisation(model, x, "rollout", layers=["blocks.2", "blocks.1"], seed=3, order="independent")
    # the first step randomises the same parameters with the same draws in both orders
    assert torch.equal(casc.maps[1], ind.maps[1])
    assert not torch.equal(casc.maps[2], ind.maps[2])  # cascade has blocks.2 still randomised
    only_1 = M.parameter_randomisation(model, x, "rollout", layers=["blocks.1"], seed=3)
    assert not torch.equal(only_1.maps[1], ind.maps[2])  # the seed includes the step index
    assert [row["layer"] for row in casc.summary()] == ["none", "blocks.2", "blocks.1"]

    def fn(m, inputs, target):  # a callable method returning a tensor
        return attnx.explain(m, inputs, method="rollout", target=target).heatmap()

    rf = M.parameter_randomisation(model, x, fn, layers=["head"])
    assert rf.maps.shape == (2, 2, 32 * 32) and close(rf.spearman[0], [1, 1])
    with pytest.raises(ValueError, match="neither a module nor a parameter"):
        M.parameter_randomisation(model, x, "rollout", layers=["blocks.9"])
    with pytest.raises(ValueError, match="order"):
        M.parameter_randomisation(model, x, "rollout", order="random")


# --------------------------------------------------------------------------------------------
# real explanations on tiny models
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    case = CASES["timm_vit"]
    model = case.model()
    x = case.inputs(batch=3, seed=4)
    return model, x, attnx.explain(model, x, method="generic")


def test_perturbation_on_a_real_vit(vit):
    model, x, e = vit
    pos = M.perturbation_curve(model, x, e)
    neg = M.perturbation_curve(model, x, e, mode="negative")
    assert pos.values.shape == neg.values.shape == (3, 10)
    # the target is the explained (predicted) class: accuracy 1 on the intact image
    assert close(pos.values[:, 0], [1, 1, 1]) and close(neg.values[:, 0], [1, 1, 1])
    # the explanation as a tensor heat map gives the same curve; chunked evaluation too
    same = M.perturbation_curve(model, x, e.heatmap(), target=e.targets, batch_size=4)
    assert torch.equal(pos.values, same.values)
    patch = M.perturbation_curve(model, x, e, granularity="patch", measure="probability")
    patch2 = M.perturbation_curve(model, x, e.scores, target=e.targets, granularity="patch", measure="probability")
    assert torch.equal(patch.values, patch2.values)
    assert close(patch.values[:, 0], e.probabilities.gather(1, e.targets[:, None])[:, 0], 1e-6)


def test_deletion_insertion_on_a_real_vit(vit):
    model, x, e = vit
    p = e.probabilities.gather(1, e.targets[:, None])[:, 0]
    d = M.deletion_curve(model, x, e, steps=4)
    i = M.insertion_curve(model, x, e, steps=4, granularity="patch")
    assert d.values.shape == i.values.shape == (3, 5)
    # deletion starts from the image and insertion ends with it
    assert close(d.values[:, 0], p, 1e-6) and close(i.values[:, -1], p, 1e-6)
    assert ((d.auc() >= 0) & (d.auc() <= 1)).all() and ((i.auc() >= 0) & (i.auc() <= 1)).all()


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


def test_text_metrics_on_a_real_bert():
    case = CASES["hf_bert_sdpa"]
    model = case.model()
    batch = text_inputs(2, torch.Generator().manual_seed(5), 0, lengths=[9, 6])
    batch["input_ids"][1, 5] = 1  # a [SEP]-like last real token
    batch["input_ids"][0, 8] = 1
    batch["special_tokens_mask"] = torch.isin(batch["input_ids"], torch.tensor([0, 1, 2])).long()
    e = attnx.explain(model, {k: v for k, v in batch.items() if k != "special_tokens_mask"}, method="generic")
    c = M.token_deletion_curve(model, batch, e, replacement=3, steps=5)
    assert c.values.shape == (2, 6)
    assert close(c.values[:, 0], e.probabilities.gather(1, e.targets[:, None])[:, 0], 1e-6)
    cp = M.token_deletion_curve(model, batch, e, replacement="pad", steps=5, batch_size=3)
    assert cp.values.shape == (2, 6) and close(cp.values[:, 0], c.values[:, 0])
    rationale = torch.zeros(2, 9, dtype=torch.bool)
    rationale[:, 1:3] = True
    r = M.rationale_f1(e, rationale, 2, attention_mask=batch["attention_mask"],
                       special_tokens_mask=batch["special_tokens_mask"])
    assert r.f1.shape == (2,) and ((r.f1 >= 0) & (r.f1 <= 1)).all()
    # the explanation's padding mask is used by default; k = 9 selects all real tokens of sample 1
    everything = M.rationale_f1(e, torch.ones(2, 9, dtype=torch.bool), 9)
    assert close(everything.precision, [1, 1]) and close(everything.recall, [1, 6 / 9])
    # randomisation compares the real tokens only (sample 1 has 6 of 9)
    inputs = {k: v for k, v in batch.items() if k != "special_tokens_mask"}
    rnd = M.parameter_randomisation(model, inputs, "generic", layers=["bert.encoder.layer.2"])
    assert rnd.valid.sum(dim=1).tolist() == [9, 6] and close(rnd.spearman[0], [1, 1])
    want = M.spearman(rnd.maps[1, 1:, :6], rnd.maps[0, 1:, :6])
    assert close(rnd.spearman[1, 1:], want)
