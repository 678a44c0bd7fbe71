"""attnx.metrics curves (perturbation test, RISE deletion / insertion, the Curve type) against
values computed by hand on tiny synthetic cases, then on a tiny real ViT with real explanations.

The expected numbers are written as fractions with the arithmetic beside them; none is
obtained by calling the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnx import metrics as M
from metrics_toys import INVERTED, PERFECT, RegionSum, close, explained_vit, ones, top_left


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
# real explanations on a tiny model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    return explained_vit()


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
