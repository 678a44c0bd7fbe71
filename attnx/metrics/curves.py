"""Faithfulness curves on images: the model's output as the input is progressively removed.

:func:`perturbation_curve`
    The positive / negative perturbation test (Chefer et al., CVPR 2021): accuracy (or another
    measure) as the most / least relevant pixels or patches are removed.
:func:`deletion_curve` and :func:`insertion_curve`
    The deletion and insertion metrics (Petsiuk et al., RISE, BMVC 2018), the latter starting
    from :func:`gaussian_blur`, RISE's blurred substrate.

Each returns a :class:`Curve`: one row of values per sample, one column per point, with its area
under the curve (:meth:`Curve.auc`). The relevance is an :class:`attnx.Explanation` (of any
method) or a plain tensor; the model is called as :mod:`attnx.metrics.measures` describes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.explanation import Explanation
from ..errors import AttnxTypeError, AttnxValueError
from .common import RelevanceLike, check_finite, infer_grid, ranks_descending
from .measures import (
    Measure,
    apply_measure,
    class_vector,
    forward_chunked,
    measure_name,
    resolve_target,
    run_points,
)

__all__ = ["Curve", "perturbation_curve", "deletion_curve", "insertion_curve", "gaussian_blur"]


@dataclass
class Curve:
    """The model's response as the input is progressively perturbed.

    Attributes
    ----------
    fractions:
        ``(K,)`` x-axis: fraction of the content (pixels, patches or tokens) removed or
        inserted at each point, starting with the unperturbed point.
    values:
        ``(B, K)`` the measure for each sample at each point.
    measure:
        Name of the measure (``"accuracy"``, ``"probability"``, ... or the callable's name).
    protocol:
        What was done, e.g. ``"perturbation:positive:pixel"`` or ``"insertion:patch"``.
    """

    fractions: torch.Tensor
    values: torch.Tensor
    measure: str
    protocol: str = ""

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """``(K,)`` the curve averaged over the samples."""
        return self.values.mean(dim=0)

    def auc(self, *, normalize: bool = False, end_value: float | None = None) -> torch.Tensor:
        """``(B,)`` area under each sample's curve by the trapezoid rule over :attr:`fractions`.

        Parameters
        ----------
        normalize:
            Divide by the length of the x-range, giving the mean height of the curve (for the
            deletion / insertion curves, whose x-axis already spans [0, 1], this changes
            nothing).
        end_value:
            Append the point ``(1.0, end_value)`` before integrating (for example ``0.0``: "with
            everything removed the model is never right"), for curves that stop short of 1.
        """
        x = self.fractions.to(device=self.values.device, dtype=self.values.dtype)
        v = self.values
        if end_value is not None and float(x[-1]) < 1.0:
            x = torch.cat([x, x.new_ones(1)])
            v = torch.cat([v, v.new_full((v.shape[0], 1), float(end_value))], dim=1)
        if x.numel() < 2:
            return v.new_zeros(v.shape[0])
        area = ((v[:, 1:] + v[:, :-1]) / 2 * (x[1:] - x[:-1])).sum(dim=1)
        if normalize:
            area = area / (x[-1] - x[0])
        return area

    def mean_auc(self, **kwargs: Any) -> float:
        """Mean of :meth:`auc` over the samples (= the area under :attr:`mean`)."""
        return float(self.auc(**kwargs).mean())

    @staticmethod
    def cat(curves: Sequence["Curve"]) -> "Curve":
        """Concatenate the curves of several batches (same fractions, measure and protocol)."""
        curves = list(curves)
        if not curves:
            raise AttnxValueError("Curve.cat needs at least one curve")
        first = curves[0]
        for c in curves[1:]:
            if c.fractions.shape != first.fractions.shape or not torch.allclose(
                c.fractions.cpu().double(), first.fractions.cpu().double()
            ):
                raise AttnxValueError("cannot concatenate curves with different fractions")
            if (c.measure, c.protocol) != (first.measure, first.protocol):
                raise AttnxValueError(
                    f"cannot concatenate a {c.protocol!r}/{c.measure!r} curve with a {first.protocol!r}/{first.measure!r} one"
                )
        values = torch.cat([c.values.to(first.values.device) for c in curves], dim=0)
        return Curve(first.fractions, values, first.measure, first.protocol)

    def __repr__(self) -> str:
        return (
            f"Curve({self.protocol or 'curve'}, measure={self.measure!r}, samples={len(self)}, "
            f"points={self.fractions.numel()}, mean_auc={self.mean_auc():.4f})"
        )


def check_images(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise AttnxTypeError(
            f"expected an image batch tensor (B, C, H, W), got {type(inputs).__name__}; for models that take "
            "other arguments pass model=lambda x: ... and the pixel tensor"
        )
    if inputs.dim() != 4 or not inputs.is_floating_point():
        raise AttnxValueError(f"expected a floating image batch (B, C, H, W), got shape {tuple(inputs.shape)} and dtype {inputs.dtype}")
    return inputs


def image_relevance(relevance: RelevanceLike, B: int, H: int, W: int, granularity: str, grid: tuple[int, int] | None):
    """The relevance as ``(B, n)`` with its grid: ``None`` for pixels (n = H*W), ``(h, w)`` for patches."""
    if granularity not in ("pixel", "patch"):
        raise AttnxValueError(f"granularity must be 'pixel' or 'patch', got {granularity!r}")
    if isinstance(relevance, Explanation):
        if relevance.grid is None:
            raise AttnxValueError("this explanation is of text; use token_deletion_curve for text models")
        if len(relevance) != B:
            raise AttnxValueError(f"the explanation has {len(relevance)} samples but the input batch has {B}")
        if granularity == "pixel":
            maps = relevance.heatmap(size=(H, W))
        else:
            maps = relevance.patch_map()
    elif isinstance(relevance, torch.Tensor):
        maps = relevance.detach()
        if maps.dim() == 4:  # (B, C, H, W) input relevance: summed over the channels
            maps = maps.sum(dim=1)
        if maps.dim() == 2:  # (B, P) patch scores
            g = tuple(grid) if grid is not None else infer_grid(maps.shape[1], H, W)
            if g[0] * g[1] != maps.shape[1]:
                raise AttnxValueError(f"grid {g} does not hold the {maps.shape[1]} patch scores")
            maps = maps.reshape(maps.shape[0], *g)
        if maps.dim() != 3:
            raise AttnxValueError(
                f"expected relevance of shape (B, H, W), (B, h, w), (B, P) or (B, C, H, W), got {tuple(relevance.shape)}"
            )
        if maps.shape[0] != B:
            raise AttnxValueError(f"the relevance has {maps.shape[0]} samples but the input batch has {B}")
        if not maps.is_floating_point():
            maps = maps.float()
        if granularity == "pixel" and tuple(maps.shape[-2:]) != (H, W):
            maps = F.interpolate(maps[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    else:
        raise AttnxTypeError(f"relevance must be an attnx Explanation or a tensor, got {type(relevance).__name__}")
    check_finite(maps, "relevance")
    if granularity == "pixel":
        return maps.reshape(B, H * W), None
    h, w = maps.shape[-2:]
    if H % h or W % w:
        raise AttnxValueError(f"a {h}x{w} patch grid does not tile a {H}x{W} image")
    return maps.reshape(B, h * w), (h, w)


def _channel_vector(v: Any, C: int, like: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(C)
    if t.numel() != C:
        raise AttnxValueError(f"{name} must have one value per channel ({C}), got {t.numel()}")
    return t.view(1, C, 1, 1)


def gaussian_blur(x: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Blur each channel of ``x`` ``(B, C, H, W)`` with a normalised Gaussian kernel.

    The defaults and the zero padding follow RISE's insertion substrate (kernel 11, σ = 5).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise AttnxValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    C = x.shape[1]
    r = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - kernel_size // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(C, 1, kernel_size, kernel_size)
    return F.conv2d(x, k, padding=kernel_size // 2, groups=C)


def fill_values(baseline: Any, x: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """The value each removed pixel takes, broadcast to ``x``'s shape."""
    B, C, H, W = x.shape
    if (mean is None) != (std is None):
        raise AttnxValueError("pass both mean and std (the input normalisation) or neither")
    if isinstance(baseline, str):
        if baseline == "mean":
            fill = x.mean(dim=(2, 3), keepdim=True)
        elif baseline == "blur":
            fill = gaussian_blur(x)
        else:
            raise AttnxValueError(f"unknown baseline {baseline!r}: use a number, 'mean', 'blur', a tensor or a callable")
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if mean is not None:  # a value in pixel space, mapped through the input normalisation
            m, s = _channel_vector(mean, C, x, "mean"), _channel_vector(std, C, x, "std")
            if (s == 0).any():
                raise AttnxValueError("std must be non-zero")
            fill = (float(baseline) - m) / s
        else:
            fill = x.new_full((1, 1, 1, 1), float(baseline))
    elif isinstance(baseline, torch.Tensor):
        fill = baseline.detach().to(device=x.device, dtype=x.dtype)
        if fill.dim() == 1 and fill.numel() == C:
            fill = fill.view(1, C, 1, 1)
    elif callable(baseline):
        with torch.no_grad():
            fill = baseline(x)
        if not isinstance(fill, torch.Tensor):
            raise AttnxTypeError(f"a baseline callable must return a tensor, got {type(fill).__name__}")
        fill = fill.detach().to(device=x.device, dtype=x.dtype)
    else:
        raise AttnxTypeError(f"baseline must be a number, 'mean', 'blur', a tensor or a callable, got {baseline!r}")
    try:
        if torch.broadcast_shapes(fill.shape, x.shape) != x.shape:
            raise RuntimeError
    except RuntimeError:
        raise AttnxValueError(
            f"a baseline of shape {tuple(fill.shape)} does not broadcast to the input {tuple(x.shape)} "
            "(expected (C,), (C, H, W), (B, C, H, W) or a scalar)"
        ) from None
    return fill.expand_as(x)


def _image_curve(
    model, inputs, relevance, target, labels, *, counts, fractions, insert, descending, granularity, baseline,
    mean, std, measure, grid, batch_size, protocol,
) -> Curve:
    x = check_images(inputs)
    B, C, H, W = x.shape
    name = measure_name(measure)
    key, g = image_relevance(relevance, B, H, W, granularity, grid)
    key = key.to(x.device)
    rank = ranks_descending(key if descending else -key)  # (B, n): rank 0 goes first
    fill = fill_values(baseline, x, mean, std)
    base_logits = forward_chunked(model, B, batch_size, lambda i: x[i.to(x.device)])
    tgt = resolve_target(target, relevance, base_logits)
    lab = None if labels is None else class_vector(labels, B, base_logits.shape[1], base_logits.device, "labels")
    base = apply_measure(measure, base_logits, tgt, lab)
    n = rank.shape[1]
    counts = torch.as_tensor(counts, dtype=torch.long, device=x.device)[:, None].expand(-1, B)  # (K, B)
    identity = counts == (n if insert else 0)  # the input itself: reuse the unperturbed value

    def build(k_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
        k_idx, b_idx = k_idx.to(x.device), b_idx.to(x.device)
        m = b_idx.numel()
        switched = rank[b_idx] < counts[k_idx, b_idx][:, None]  # (m, n)
        if g is None:
            switched = switched.view(m, 1, H, W)
        else:
            switched = switched.view(m, 1, *g).repeat_interleave(H // g[0], 2).repeat_interleave(W // g[1], 3)
        xs, fs = x[b_idx], fill[b_idx]
        return torch.where(switched, xs, fs) if insert else torch.where(switched, fs, xs)

    values = run_points(model, build, ~identity, base, measure, tgt, lab, batch_size)
    fr = torch.as_tensor(fractions, dtype=torch.float64)
    return Curve(fr, values, name, protocol)


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fr = [float(f) for f in fractions]
    if not fr or any(not (0 < f <= 1) for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
        raise AttnxValueError(f"fractions must be increasing values in (0, 1], got {list(fractions)}")
    return fr


def perturbation_curve(
    model: Callable,
    inputs: torch.Tensor,
    relevance: RelevanceLike,
    target: Any = None,
    *,
    mode: str = "positive",
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    granularity: str = "pixel",
    baseline: Any = 0.0,
    mean: Any = None,
    std: Any = None,
    measure: Measure = "accuracy",
    labels: Any = None,
    grid: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> Curve:
    """Positive / negative perturbation test (Chefer, Gur & Wolf, CVPR 2021, Sec. 4).

    For each fraction ``f`` the ``int(f * n)`` most relevant (``mode="positive"``) or least
    relevant (``mode="negative"``) of the ``n`` pixels (or patches) are set to ``baseline`` in
    every channel, and the model is run on the result. A faithful map makes the positive curve
    drop fast (low AUC) and the negative curve stay high (high AUC).

    Protocol, as in the reference evaluation (``baselines/ViT/pertubation_eval_from_hdf5.py``):
    the pixel map is the explanation bilinearly upsampled to the image size (the reference
    explains the predicted class); each step removes the top ``int(f * H * W)`` pixels of the
    unperturbed image, so the removed sets are nested; the measure is top-1 accuracy against the ground-truth labels
    (``labels=``) -- or against ``target`` when no labels are given; the removed pixels are set
    to 0 in [0, 1] pixel space *before* normalisation: pass ``baseline=0.0, mean=..., std=...``
    (the reference uses ``mean = std = (0.5, 0.5, 0.5)``, so removed pixels become -1). The
    curve includes the unperturbed point (fraction 0), which the reference records separately
    as the model's accuracy. Ties in the relevance are broken by position (row-major order).

    Parameters
    ----------
    model:
        Any callable ``model(x) -> logits``; called as given, under ``torch.no_grad()``.
    inputs:
        ``(B, C, H, W)`` the (normalised) images the model takes.
    relevance:
        An :class:`attnx.Explanation` (pixels: ``heatmap(size=(H, W))``; patches: ``scores`` on
        its ``grid``) or a tensor: ``(B, H, W)`` pixel map, ``(B, h, w)`` patch map, ``(B, P)``
        patch scores (grid from ``grid=`` or inferred from the image shape) or ``(B, C, H, W)``
        input relevance (summed over channels). Maps smaller than the image are bilinearly
        upsampled for ``granularity="pixel"``.
    target:
        The class whose measure is tracked: ``None`` (the explanation's targets, else the
        model's prediction on the unperturbed input), an int or ``B`` ints.
    mode:
        ``"positive"`` (most relevant first) or ``"negative"`` (least relevant first).
    fractions:
        Increasing fractions in (0, 1] of the pixels / patches to remove.
    granularity:
        ``"pixel"`` or ``"patch"`` (whole patches of the explanation's grid are removed).
    baseline:
        The value of removed pixels: a number (in input space; in pixel space when ``mean`` and
        ``std`` are given), ``"mean"`` (each image's per-channel mean), ``"blur"`` (a Gaussian
        blur of the image), a tensor broadcastable to ``(B, C, H, W)`` (e.g. ``(C,)``), or a
        callable ``x -> tensor``.
    mean, std:
        The per-channel normalisation of ``inputs`` (``x = (pixel - mean) / std``), used to map a
        numeric ``baseline`` from pixel space.
    measure:
        ``"accuracy"`` (argmax == label, or == target without labels), ``"probability"``
        (softmax probability of the target), ``"sigmoid"`` (sigmoid of the target logit, for
        multi-label models), ``"present"`` (target logit > 0), ``"logit"``, or a callable
        ``(logits, target) -> (B,)``.
    labels:
        ``B`` ground-truth classes for ``measure="accuracy"``.
    grid:
        ``(h, w)`` of ``(B, P)`` patch scores given as a tensor.
    batch_size:
        At most this many perturbed images per model call (default: ``B``).

    Returns
    -------
    Curve
        ``fractions = (0, *fractions)``, ``values`` ``(B, K+1)``. ``curve.auc()`` integrates by
        the trapezoid rule over exactly these points: with the default fractions over
        ``x ∈ [0, 0.9]`` with ``dx = 0.1`` (so a curve constant at 1 has AUC 0.9). The reference
        repository stores the per-step hits and prints their means without integrating them;
        ``auc(end_value=0.0)`` adds the point (1, 0) as some evaluation scripts do, and
        ``auc(normalize=True)`` divides by the x-range.
    """
    if mode not in ("positive", "negative"):
        raise AttnxValueError(f"mode must be 'positive' (most relevant removed first) or 'negative', got {mode!r}")
    fr = _check_fractions(fractions)
    x = check_images(inputs)
    n = x.shape[-2] * x.shape[-1]
    if granularity == "patch":
        _, g = image_relevance(relevance, x.shape[0], x.shape[-2], x.shape[-1], "patch", grid)
        n = g[0] * g[1]
    counts = [0] + [int(n * f) for f in fr]
    return _image_curve(
        model, x, relevance, target, labels, counts=counts, fractions=[0.0] + fr, insert=False,
        descending=mode == "positive", granularity=granularity, baseline=baseline, mean=mean, std=std,
        measure=measure, grid=grid, batch_size=batch_size, protocol=f"perturbation:{mode}:{granularity}",
    )


def _step_counts(n: int, steps: int | None, step_size: int | None, default_step: int) -> tuple[list[int], list[float]]:
    if steps is not None and step_size is not None:
        raise AttnxValueError("pass steps or step_size, not both")
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            raise AttnxValueError(f"steps must be a positive int, got {steps!r}")
        counts = [(i * n) // steps for i in range(steps + 1)]
        return counts, [i / steps for i in range(steps + 1)]
    size = default_step if step_size is None else step_size
    if not isinstance(size, int) or size < 1:
        raise AttnxValueError(f"step_size must be a positive int, got {step_size!r}")
    total = -(-n // size)
    return [min(i * size, n) for i in range(total + 1)], [i / total for i in range(total + 1)]


def _causal_curve(model, inputs, relevance, target, *, insert, steps, step_size, granularity, baseline, mean, std,
                  measure, labels, grid, batch_size) -> Curve:
    x = check_images(inputs)
    B, C, H, W = x.shape
    if granularity == "pixel":
        n, default = H * W, W
    else:
        _, g = image_relevance(relevance, B, H, W, "patch", grid)
        n, default = g[0] * g[1], 1
    counts, fractions = _step_counts(n, steps, step_size, default)
    return _image_curve(
        model, x, relevance, target, labels, counts=counts, fractions=fractions, insert=insert, descending=True,
        granularity=granularity, baseline=baseline, mean=mean, std=std, measure=measure, grid=grid,
        batch_size=batch_size, protocol=f"{'insertion' if insert else 'deletion'}:{granularity}",
    )


def deletion_curve(
    model: Callable,
    inputs: torch.Tensor,
    relevance: RelevanceLike,
    target: Any = None,
    *,
    steps: int | None = None,
    step_size: int | None = None,
    granularity: str = "pixel",
    baseline: Any = 0.0,
    mean: Any = None,
    std: Any = None,
    measure: Measure = "probability",
    labels: Any = None,
    grid: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> Curve:
    """Deletion metric (Petsiuk, Das & Saenko, "RISE", BMVC 2018): remove the most relevant pixels
    (or patches) first, replacing them by ``baseline``; a faithful map makes the target's
    probability fall fast (low AUC).

    Point ``i`` of the curve has the ``i * step_size`` most relevant elements replaced (all of
    them at the last point). By default ``step_size`` is one image row of pixels (RISE uses 224
    pixels per step on 224x224 images) or one patch; ``steps=n`` instead gives ``n`` equal
    steps (``floor(i * N / n)`` elements at point ``i``). The x-axis is ``i / n_steps``, so
    ``curve.auc()`` is RISE's normalised area ``(Σ v - (v_0 + v_n) / 2) / n_steps`` in [0, 1].
    The default baseline 0.0 is zero in the model's input space, RISE's deletion substrate;
    the measure defaults to the softmax probability of ``target`` (the explanation's targets,
    else the prediction on the unperturbed image). ``baseline``, ``mean``/``std``, ``measure``,
    ``labels``, ``grid``, ``granularity`` and ``batch_size`` are as in :func:`perturbation_curve`.
    """
    return _causal_curve(model, inputs, relevance, target, insert=False, steps=steps, step_size=step_size,
                         granularity=granularity, baseline=baseline, mean=mean, std=std, measure=measure,
                         labels=labels, grid=grid, batch_size=batch_size)


def insertion_curve(
    model: Callable,
    inputs: torch.Tensor,
    relevance: RelevanceLike,
    target: Any = None,
    *,
    steps: int | None = None,
    step_size: int | None = None,
    granularity: str = "pixel",
    baseline: Any = "blur",
    mean: Any = None,
    std: Any = None,
    measure: Measure = "probability",
    labels: Any = None,
    grid: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> Curve:
    """Insertion metric (Petsiuk et al., RISE): start from ``baseline`` (by default RISE's
    substrate, the image blurred with a Gaussian of size 11 and σ = 5, see :func:`gaussian_blur`)
    and put the image's pixels (or patches) back, most relevant first; a faithful map makes the
    target's probability rise fast (high AUC). Steps, x-axis and AUC as in :func:`deletion_curve`.
    """
    return _causal_curve(model, inputs, relevance, target, insert=True, steps=steps, step_size=step_size,
                         granularity=granularity, baseline=baseline, mean=mean, std=std, measure=measure,
                         labels=labels, grid=grid, batch_size=batch_size)
