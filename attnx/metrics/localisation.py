"""Localisation: how well a map finds the object, against ground-truth masks.

:func:`segmentation_scores` and :class:`SegmentationMeter`
    The ImageNet-segmentation protocol of Chefer et al. (CVPR 2021): pixel accuracy and mIoU of
    each map thresholded at its mean, and the average precision of the map itself
    (:func:`average_precision`).
:func:`pointing_game`
    Is the map's maximum on the object (Zhang et al., ECCV 2016)?
:func:`relevance_mass`
    The share of the positive relevance inside the mask (Arras et al., 2022).
:func:`class_discrimination`
    On scenes with two objects, does a class-specific map favour its own object
    (:class:`ClassDiscrimination`)?

Maps are an image :class:`attnx.Explanation` or a tensor; masks are ``(B, H, W)`` bool (or 0/1) tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core.explanation import Explanation
from ..core.layout import normalize_per_sample
from ..errors import AttnxTypeError, AttnxValueError
from .common import RelevanceLike, bool_mask, check_finite, infer_grid

__all__ = [
    "SegmentationScores",
    "SegmentationMeter",
    "segmentation_scores",
    "average_precision",
    "pointing_game",
    "relevance_mass",
    "class_discrimination",
    "ClassDiscrimination",
]

# np.spacing(1): the stabiliser of the segmentation ratios in the reference evaluation
_SPACING = 2.220446049250313e-16


def _masks(masks: Any, name: str = "masks") -> torch.Tensor:
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise AttnxValueError(f"expected {name} as a (B, H, W) boolean tensor, got {got}")
    return bool_mask(masks, tuple(masks.shape), name)


def _maps(maps: RelevanceLike, B: int, size: tuple[int, int], *, normalise: bool) -> torch.Tensor:
    """``(B, H, W)`` maps at the mask size: min-max normalised heat maps, or raw relevance."""
    H, W = size
    if isinstance(maps, Explanation):
        if maps.grid is None:
            raise AttnxValueError("this explanation is of text; localisation metrics need image maps")
        if len(maps) != B:
            raise AttnxValueError(f"the explanation has {len(maps)} samples but the masks {B}")
        if normalise:
            return maps.heatmap(size=size)
        pixels = maps.pixel_relevance
        if pixels is not None:
            out = pixels.detach()
        else:
            out = maps.patch_map().detach()
    elif isinstance(maps, torch.Tensor):
        out = maps.detach()
        if out.dim() == 4:
            out = out.sum(dim=1)
        if out.dim() == 2:
            out = out.reshape(out.shape[0], *infer_grid(out.shape[1], H, W))
        if out.dim() != 3:
            raise AttnxValueError(f"expected maps of shape (B, H, W) (or (B, h, w), (B, P), (B, C, H, W)), got {tuple(maps.shape)}")
        if out.shape[0] != B:
            raise AttnxValueError(f"the maps have {out.shape[0]} samples but the masks {B}")
    else:
        raise AttnxTypeError(f"maps must be an attnx Explanation or a tensor, got {type(maps).__name__}")
    if not out.is_floating_point():
        out = out.float()
    if tuple(out.shape[-2:]) != (H, W):  # patch maps are upsampled as the reference does
        out = F.interpolate(out[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    check_finite(out, "maps")
    return normalize_per_sample(out) if normalise else out


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` average precision of each row of ``scores`` ``(B, n)`` against ``labels`` ``(B, n)``.

    ``AP = Σ_t (R_t - R_{t-1}) P_t`` over the distinct score thresholds in decreasing order
    (tied scores form one threshold), the definition of scikit-learn's
    ``average_precision_score``; 0 for a row without positives.
    """
    if scores.shape != labels.shape or scores.dim() != 2:
        raise AttnxValueError(f"expected scores and labels of the same (B, n) shape, got {tuple(scores.shape)} and {tuple(labels.shape)}")
    B, n = scores.shape
    s, order = scores.sort(dim=1, descending=True, stable=True)
    y = labels.gather(1, order).to(torch.float64)
    tp = y.cumsum(dim=1)
    precision = tp / torch.arange(1, n + 1, dtype=torch.float64, device=scores.device)
    start = torch.ones(B, n, dtype=torch.bool, device=scores.device)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    last = torch.ones_like(start)
    last[:, :-1] = start[:, 1:]
    group = start.long().cumsum(dim=1) - 1
    # precision at the end of each group of tied scores, spread back over the group
    at_end = torch.zeros(B, n, dtype=torch.float64, device=scores.device).scatter_reduce(
        1, group, torch.where(last, precision, torch.zeros_like(precision)), reduce="amax"
    )
    positives = y.sum(dim=1)
    ap = (y * at_end.gather(1, group)).sum(dim=1) / positives.clamp(min=1)
    return torch.where(positives > 0, ap, torch.zeros_like(ap))


@dataclass
class SegmentationScores:
    """Per-sample results of the segmentation protocol (see :func:`segmentation_scores`).

    ``pixel_correct`` / ``pixel_labeled`` ``(B,)`` and ``intersection`` / ``union`` ``(B, 2)``
    (class 0 background, 1 foreground) are counts to accumulate; ``ap`` ``(B,)``.
    """

    pixel_correct: torch.Tensor
    pixel_labeled: torch.Tensor
    intersection: torch.Tensor
    union: torch.Tensor
    ap: torch.Tensor

    @property
    def pixel_accuracy(self) -> torch.Tensor:
        """``(B,)`` fraction of pixels whose class is right."""
        return self.pixel_correct.double() / (_SPACING + self.pixel_labeled.double())

    @property
    def iou(self) -> torch.Tensor:
        """``(B, 2)`` IoU of background and foreground (0 for a class in neither map nor mask)."""
        return self.intersection.double() / (_SPACING + self.union.double())

    @property
    def miou(self) -> torch.Tensor:
        """``(B,)`` mean of the two IoUs."""
        return self.iou.mean(dim=1)


def segmentation_scores(maps: RelevanceLike, masks: torch.Tensor) -> SegmentationScores:
    """The ImageNet-segmentation protocol of Chefer et al. (``baselines/ViT/imagenet_seg_eval.py``
    with ``utils/metrices.py``), per image.

    Each map is min-max normalised to [0, 1] (patch maps first bilinearly upsampled to the mask
    size; an :class:`attnx.Explanation` gives ``heatmap(size)``) and thresholded at its own
    mean: pixels above the mean are foreground. Against the mask this gives the pixel accuracy
    and, per class (background, foreground), the intersection and union. The average precision
    is computed as the reference does: the scores ``1 - map`` labelled by ``mask == 0`` and
    ``map`` labelled by ``mask == 1`` are pooled into one list of ``2 H W`` entries per image
    (both classes at once), and scikit-learn's AP (:func:`average_precision`) is taken over it.
    Constant maps normalise to 0 everywhere, hence all background.

    For the dataset-level numbers of the reference (pixel accuracy and mIoU from counts summed
    over all images, mAP the mean of per-image APs) feed the batches to a
    :class:`SegmentationMeter`.

    Parameters
    ----------
    maps:
        An image :class:`attnx.Explanation` or a ``(B, H, W)`` tensor (``(B, h, w)`` patch maps
        and ``(B, P)`` patch scores are upsampled).
    masks:
        ``(B, H, W)`` bool: the object's pixels.
    """
    m = _masks(masks)
    B, H, W = m.shape
    maps = _maps(maps, B, (H, W), normalise=True).to(m.device)
    flat = maps.reshape(B, -1)
    fg = flat > flat.mean(dim=1, keepdim=True)
    truth = m.reshape(B, -1)
    correct = (fg == truth).sum(dim=1)
    labeled = torch.full((B,), H * W, dtype=torch.long, device=m.device)
    inter = torch.stack([(~fg & ~truth).sum(dim=1), (fg & truth).sum(dim=1)], dim=1)
    area_pred = torch.stack([(~fg).sum(dim=1), fg.sum(dim=1)], dim=1)
    area_true = torch.stack([(~truth).sum(dim=1), truth.sum(dim=1)], dim=1)
    union = area_pred + area_true - inter
    ap = average_precision(torch.cat([1 - flat, flat], dim=1), torch.cat([~truth, truth], dim=1))
    return SegmentationScores(correct, labeled, inter, union, ap)


class SegmentationMeter:
    """Accumulates :func:`segmentation_scores` over a dataset, as the reference evaluation does.

    ``pixel_accuracy = Σ correct / Σ labeled``, ``iou[c] = Σ intersection_c / Σ union_c`` (sums
    over all images so far), ``miou`` the mean of the two IoUs, ``mean_ap`` the mean of the
    per-image APs.

    >>> meter = attnx.metrics.SegmentationMeter()
    >>> for images, masks in loader:
    ...     meter.update(explainer(images, method="transformer_attribution"), masks)
    >>> meter.compute()   # {'pixel_accuracy': ..., 'miou': ..., 'mean_ap': ..., 'iou': ..., 'images': ...}
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.labeled = 0
        self.intersection = torch.zeros(2, dtype=torch.long)
        self.union = torch.zeros(2, dtype=torch.long)
        self.ap_sum = 0.0
        self.images = 0

    def update(self, maps: RelevanceLike, masks: torch.Tensor) -> SegmentationScores:
        """Add a batch; returns its per-sample scores."""
        s = segmentation_scores(maps, masks)
        self.correct += int(s.pixel_correct.sum())
        self.labeled += int(s.pixel_labeled.sum())
        self.intersection += s.intersection.sum(dim=0).cpu()
        self.union += s.union.sum(dim=0).cpu()
        self.ap_sum += float(s.ap.sum())
        self.images += s.ap.numel()
        return s

    def compute(self) -> dict:
        iou = self.intersection.double() / (_SPACING + self.union.double())
        return {
            "pixel_accuracy": self.correct / (_SPACING + self.labeled),
            "miou": float(iou.mean()),
            "mean_ap": self.ap_sum / self.images if self.images else 0.0,
            "iou": iou,
            "images": self.images,
        }


def pointing_game(maps: RelevanceLike, masks: torch.Tensor, tolerance: float = 0) -> torch.Tensor:
    """``(B,)`` bool: is the map's maximum on the object (Zhang et al., ECCV 2016)?

    The maximum is the first maximal pixel in row-major order of the map at mask size (patch
    maps bilinearly upsampled, as ``heatmap(size)`` does); it is a hit when a mask pixel lies
    within ``tolerance`` pixels (Euclidean distance; Zhang et al. use 15) of it.
    """
    m = _masks(masks)
    B, H, W = m.shape
    if tolerance < 0:
        raise AttnxValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    maps = _maps(maps, B, (H, W), normalise=False).to(m.device)
    idx = maps.reshape(B, -1).argmax(dim=1)
    if tolerance == 0:
        return m.reshape(B, -1).gather(1, idx[:, None])[:, 0]
    r, c = (idx // W).double(), (idx % W).double()
    rr = torch.arange(H, dtype=torch.float64, device=m.device).view(1, H, 1)
    cc = torch.arange(W, dtype=torch.float64, device=m.device).view(1, 1, W)
    near = (rr - r.view(B, 1, 1)) ** 2 + (cc - c.view(B, 1, 1)) ** 2 <= float(tolerance) ** 2
    return (near & m).flatten(1).any(dim=1)


def relevance_mass(relevance: RelevanceLike, masks: torch.Tensor) -> torch.Tensor:
    """``(B,)`` share of the positive relevance that falls inside the mask (Arras et al., 2022).

    ``Σ_{p ∈ mask} max(R_p, 0) / Σ_p max(R_p, 0)`` (0 when there is no positive relevance).
    Uses the raw relevance, not the min-max normalised heat map: for an
    :class:`attnx.Explanation` the pixel relevance of input-level methods (LRP), otherwise its
    patch scores bilinearly upsampled to the mask size.
    """
    m = _masks(masks)
    B, H, W = m.shape
    r = _maps(relevance, B, (H, W), normalise=False).to(m.device).clamp(min=0).reshape(B, -1)
    inside = (r * m.reshape(B, -1)).sum(dim=1)
    total = r.sum(dim=1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


@dataclass
class ClassDiscrimination:
    """Does a class-specific map point at its own object rather than at the other one?

    ``mass_target`` / ``mass_other`` ``(B,)``: share of the positive relevance on each object
    (per pixel of the object when ``area_normalized``); ``score`` ``(B,)`` in [-1, 1]:
    ``(mass_target - mass_other) / (mass_target + mass_other)`` (0 when both are 0);
    ``correct`` ``(B,)`` bool: ``mass_target > mass_other``.
    """

    mass_target: torch.Tensor
    mass_other: torch.Tensor
    score: torch.Tensor
    correct: torch.Tensor


def class_discrimination(
    relevance: RelevanceLike, mask_target: torch.Tensor, mask_other: torch.Tensor, *, area_normalized: bool = False
) -> ClassDiscrimination:
    """Class discrimination on scenes with two objects: ``relevance`` explains the class of the
    object in ``mask_target``; a class-specific method should put its relevance there and not
    on the object in ``mask_other``. Masses are :func:`relevance_mass` on each mask; with
    ``area_normalized=True`` each is divided by its object's share of the image (so a large
    object does not win by size alone).
    """
    a, b = _masks(mask_target, "mask_target"), _masks(mask_other, "mask_other")
    if a.shape != b.shape:
        raise AttnxValueError(f"mask_target {tuple(a.shape)} and mask_other {tuple(b.shape)} differ in shape")
    ma, mb = relevance_mass(relevance, a).double(), relevance_mass(relevance, b).double()
    if area_normalized:
        n = a.shape[1] * a.shape[2]
        fa, fb = a.flatten(1).sum(1).double() / n, b.flatten(1).sum(1).double() / n
        ma = torch.where(fa > 0, ma / fa.clamp(min=1e-300), torch.zeros_like(ma))
        mb = torch.where(fb > 0, mb / fb.clamp(min=1e-300), torch.zeros_like(mb))
    s = ma + mb
    score = torch.where(s > 0, (ma - mb) / s.clamp(min=1e-300), torch.zeros_like(s))
    return ClassDiscrimination(ma, mb, score, ma > mb)
