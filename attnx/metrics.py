"""Evaluating explanations: faithfulness, localisation, text rationales and a sanity check.

Every function takes the relevance as an :class:`attnx.Explanation` (of any method) or as a
plain tensor, works on batches, on any device and dtype, and calls the model exactly as it is
given (under ``torch.no_grad()``; no mode, flag or hook is changed). ``model`` may be any
callable: an image model is called as ``model(x)``, a text model as ``model(**batch)``; the
logits are the output itself, its ``.logits`` or its first element. Wrap models that need other
arguments in a lambda, e.g. ``lambda x: hf_vit(pixel_values=x, interpolate_pos_encoding=True)``.

Faithfulness (the model's output as its input is progressively removed)
    :func:`perturbation_curve` (Chefer et al., CVPR 2021, positive / negative perturbation),
    :func:`deletion_curve` and :func:`insertion_curve` (Petsiuk et al., RISE, BMVC 2018),
    :func:`token_deletion_curve` (text). They return a :class:`Curve`.
Localisation against ground-truth masks
    :func:`segmentation_scores` / :class:`SegmentationMeter` (the ImageNet-segmentation protocol
    of Chefer et al.), :func:`average_precision`, :func:`pointing_game` (Zhang et al., 2016),
    :func:`relevance_mass` (Arras et al., 2022), :func:`class_discrimination`.
Text rationales
    :func:`rationale_f1` (token-level F1 of the top-k tokens, as in ERASER, DeYoung et al. 2020).
Sanity check
    :func:`parameter_randomisation` (Adebayo et al., NeurIPS 2018), with :func:`spearman` and
    :func:`pearson` correlations computed in torch.

Example
-------
>>> e = attnx.explain(model, images, method="transformer_attribution")
>>> pos = attnx.metrics.perturbation_curve(model, images, e, mode="positive", labels=labels)
>>> pos.mean, pos.auc().mean()        # accuracy after removing 0, 10, ..., 90 % of the pixels
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .explanation import Explanation
from .layout import normalize_per_sample

__all__ = [
    "Curve",
    "perturbation_curve",
    "deletion_curve",
    "insertion_curve",
    "gaussian_blur",
    "token_deletion_curve",
    "rationale_f1",
    "RationaleScores",
    "SegmentationScores",
    "SegmentationMeter",
    "segmentation_scores",
    "average_precision",
    "pointing_game",
    "relevance_mass",
    "class_discrimination",
    "ClassDiscrimination",
    "parameter_randomisation",
    "Randomisation",
    "spearman",
    "pearson",
    "MEASURES",
]

Relevance = Union[Explanation, torch.Tensor]
Measure = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

#: the preset measures of the curves (any callable ``(logits, target) -> (B,)`` works too)
MEASURES = ("accuracy", "probability", "sigmoid", "present", "logit")

#: keys a Hugging Face tokenizer may return that the model does not accept
_TOKENIZER_ONLY_KEYS = (
    "special_tokens_mask", "offset_mapping", "length", "overflow_to_sample_mapping", "num_truncated_tokens",
    "overflowing_tokens",
)

# np.spacing(1): the stabiliser of the segmentation ratios in the reference evaluation
_SPACING = 2.220446049250313e-16


# =============================================================================================
# curves
# =============================================================================================
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
            raise ValueError("Curve.cat needs at least one curve")
        first = curves[0]
        for c in curves[1:]:
            if c.fractions.shape != first.fractions.shape or not torch.allclose(
                c.fractions.cpu().double(), first.fractions.cpu().double()
            ):
                raise ValueError("cannot concatenate curves with different fractions")
            if (c.measure, c.protocol) != (first.measure, first.protocol):
                raise ValueError(
                    f"cannot concatenate a {c.protocol!r}/{c.measure!r} curve with a {first.protocol!r}/{first.measure!r} one"
                )
        values = torch.cat([c.values.to(first.values.device) for c in curves], dim=0)
        return Curve(first.fractions, values, first.measure, first.protocol)

    def __repr__(self) -> str:
        return (
            f"Curve({self.protocol or 'curve'}, measure={self.measure!r}, samples={len(self)}, "
            f"points={self.fractions.numel()}, mean_auc={self.mean_auc():.4f})"
        )


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def _logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}")


def _forward(model: Callable, inputs: Any) -> torch.Tensor:
    """``(B, C)`` logits of ``model`` on ``inputs``, without gradients; the model is not touched."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    logits = _logits_of(out).detach()
    if logits.dim() != 2:
        raise ValueError(f"expected the model to return logits of shape (B, C), got {tuple(logits.shape)}")
    return logits


def _forward_chunked(model: Callable, batch: int, batch_size: int | None, select: Callable) -> torch.Tensor:
    """Logits of the unperturbed inputs, at most ``batch_size`` samples per call."""
    step = batch if not batch_size else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    parts = [_forward(model, select(torch.arange(s, min(s + step, batch)))) for s in range(0, batch, step)]
    return torch.cat(parts, dim=0)


def _class_vector(value: Any, batch: int, num_classes: int, device: torch.device, name: str) -> torch.Tensor:
    """``value`` (an int, ``B`` ints or a tensor) as a ``(B,)`` long tensor of valid classes."""
    if isinstance(value, (bool, float)) or (callable(value) and not isinstance(value, torch.Tensor)):
        raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor, got {value!r}")
    if isinstance(value, int):
        classes = torch.full((batch,), value, dtype=torch.long, device=device)
    else:
        classes = torch.as_tensor(value, device=device)
        if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer classes, got dtype {classes.dtype}")
        classes = classes.long().reshape(-1)
        if classes.numel() == 1 and batch > 1:
            classes = classes.expand(batch)
        if classes.numel() != batch:
            raise ValueError(f"got {classes.numel()} {name} values for a batch of {batch} samples")
    bad = (classes < 0) | (classes >= num_classes)
    if bad.any():
        raise ValueError(
            f"{name} class {classes[bad][0].item()} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return classes


def _resolve_target(target: Any, relevance: Any, logits: torch.Tensor) -> torch.Tensor:
    """The class each curve follows: ``target``, else the explanation's, else the prediction."""
    B, C = logits.shape
    if target is None and isinstance(relevance, Explanation) and relevance.targets is not None:
        target = relevance.targets
    if target is None:
        return logits.argmax(dim=1)
    return _class_vector(target, B, C, logits.device, "target")


def _measure_name(measure: Measure) -> str:
    if isinstance(measure, str):
        if measure not in MEASURES:
            raise ValueError(f"unknown measure {measure!r}; choose one of {list(MEASURES)} or pass a callable (logits, target) -> (B,)")
        return measure
    if callable(measure):
        return getattr(measure, "__name__", type(measure).__name__)
    raise TypeError(f"measure must be one of {list(MEASURES)} or a callable (logits, target) -> (B,), got {measure!r}")


def _apply_measure(measure: Measure, logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``(B,)`` value of ``measure`` on ``logits`` for the classes ``target``."""
    lf = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if callable(measure) and not isinstance(measure, str):
        v = measure(logits, target)
        if not isinstance(v, torch.Tensor) or v.shape != (logits.shape[0],):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"a measure must return a tensor of shape ({logits.shape[0]},), one value per sample; got {got}")
        return v.detach().to(lf.dtype)
    picked = lf.gather(1, target[:, None])[:, 0]
    if measure == "accuracy":
        ref = labels if labels is not None else target
        return (lf.argmax(dim=1) == ref).to(lf.dtype)
    if measure == "probability":
        return lf.softmax(dim=1).gather(1, target[:, None])[:, 0]
    if measure == "sigmoid":
        return torch.sigmoid(picked)
    if measure == "present":
        return (picked > 0).to(lf.dtype)
    return picked  # "logit"


def _run_points(
    model: Callable,
    build: Callable[[torch.Tensor, torch.Tensor], Any],
    todo: torch.Tensor,
    base: torch.Tensor,
    measure: Measure,
    target: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int | None,
) -> torch.Tensor:
    """Evaluate every (point, sample) pair marked in ``todo`` ``(K, B)``; the others keep the value
    of the unperturbed input, ``base`` ``(B,)``. Returns ``(B, K)``."""
    K, B = todo.shape
    values = base[None, :].repeat(K, 1)
    jobs = todo.reshape(-1).nonzero().flatten().cpu()
    step = B if not batch_size else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for s in range(0, jobs.numel(), step):
        j = jobs[s : s + step]
        k_idx, b_idx = j // B, j % B
        logits = _forward(model, build(k_idx, b_idx))
        b_dev = b_idx.to(target.device)
        v = _apply_measure(measure, logits, target[b_dev], None if labels is None else labels[b_dev])
        values.view(-1)[j.to(values.device)] = v.to(values.dtype)
    return values.T.contiguous()


def _ranks_descending(key: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` position of each element when sorted by ``key`` descending; ties keep index order."""
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    return rank


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _check_images(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"expected an image batch tensor (B, C, H, W), got {type(inputs).__name__}; for models that take "
            "other arguments pass model=lambda x: ... and the pixel tensor"
        )
    if inputs.dim() != 4 or not inputs.is_floating_point():
        raise ValueError(f"expected a floating image batch (B, C, H, W), got shape {tuple(inputs.shape)} and dtype {inputs.dtype}")
    return inputs


def _infer_grid(P: int, H: int, W: int) -> tuple[int, int]:
    h = round(math.sqrt(P * H / W)) if P > 0 else 0
    if h > 0 and P % h == 0:
        w = P // h
        if H % h == 0 and W % w == 0 and H // h == W // w:
            return h, w
    raise ValueError(
        f"cannot infer the patch grid of {P} patch scores for a {H}x{W} image; pass grid=(h, w)"
    )


def _image_relevance(relevance: Relevance, B: int, H: int, W: int, granularity: str, grid: tuple[int, int] | None):
    """The relevance as ``(B, n)`` with its grid: ``None`` for pixels (n = H*W), ``(h, w)`` for patches."""
    if granularity not in ("pixel", "patch"):
        raise ValueError(f"granularity must be 'pixel' or 'patch', got {granularity!r}")
    if isinstance(relevance, Explanation):
        if relevance.grid is None:
            raise ValueError("this explanation is of text; use token_deletion_curve for text models")
        if len(relevance) != B:
            raise ValueError(f"the explanation has {len(relevance)} samples but the input batch has {B}")
        if granularity == "pixel":
            maps = relevance.heatmap(size=(H, W))
        else:
            maps = relevance.patch_map()
    elif isinstance(relevance, torch.Tensor):
        maps = relevance.detach()
        if maps.dim() == 4:  # (B, C, H, W) input relevance: summed over the channels
            maps = maps.sum(dim=1)
        if maps.dim() == 2:  # (B, P) patch scores
            g = tuple(grid) if grid is not None else _infer_grid(maps.shape[1], H, W)
            if g[0] * g[1] != maps.shape[1]:
                raise ValueError(f"grid {g} does not hold the {maps.shape[1]} patch scores")
            maps = maps.reshape(maps.shape[0], *g)
        if maps.dim() != 3:
            raise ValueError(
                f"expected relevance of shape (B, H, W), (B, h, w), (B, P) or (B, C, H, W), got {tuple(relevance.shape)}"
            )
        if maps.shape[0] != B:
            raise ValueError(f"the relevance has {maps.shape[0]} samples but the input batch has {B}")
        if not maps.is_floating_point():
            maps = maps.float()
        if granularity == "pixel" and tuple(maps.shape[-2:]) != (H, W):
            maps = F.interpolate(maps[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    else:
        raise TypeError(f"relevance must be an attnx Explanation or a tensor, got {type(relevance).__name__}")
    _check_finite(maps, "relevance")
    if granularity == "pixel":
        return maps.reshape(B, H * W), None
    h, w = maps.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"a {h}x{w} patch grid does not tile a {H}x{W} image")
    return maps.reshape(B, h * w), (h, w)


def _channel_vector(v: Any, C: int, like: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(C)
    if t.numel() != C:
        raise ValueError(f"{name} must have one value per channel ({C}), got {t.numel()}")
    return t.view(1, C, 1, 1)


def gaussian_blur(x: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Blur each channel of ``x`` ``(B, C, H, W)`` with a normalised Gaussian kernel.

    The defaults and the zero padding follow RISE's insertion substrate (kernel 11, σ = 5).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    C = x.shape[1]
    r = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - kernel_size // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(C, 1, kernel_size, kernel_size)
    return F.conv2d(x, k, padding=kernel_size // 2, groups=C)


def _fill_values(baseline: Any, x: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """The value each removed pixel takes, broadcast to ``x``'s shape."""
    B, C, H, W = x.shape
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std (the input normalisation) or neither")
    if isinstance(baseline, str):
        if baseline == "mean":
            fill = x.mean(dim=(2, 3), keepdim=True)
        elif baseline == "blur":
            fill = gaussian_blur(x)
        else:
            raise ValueError(f"unknown baseline {baseline!r}: use a number, 'mean', 'blur', a tensor or a callable")
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if mean is not None:  # a value in pixel space, mapped through the input normalisation
            m, s = _channel_vector(mean, C, x, "mean"), _channel_vector(std, C, x, "std")
            if (s == 0).any():
                raise ValueError("std must be non-zero")
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
            raise TypeError(f"a baseline callable must return a tensor, got {type(fill).__name__}")
        fill = fill.detach().to(device=x.device, dtype=x.dtype)
    else:
        raise TypeError(f"baseline must be a number, 'mean', 'blur', a tensor or a callable, got {baseline!r}")
    try:
        if torch.broadcast_shapes(fill.shape, x.shape) != x.shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"a baseline of shape {tuple(fill.shape)} does not broadcast to the input {tuple(x.shape)} "
            "(expected (C,), (C, H, W), (B, C, H, W) or a scalar)"
        ) from None
    return fill.expand_as(x)


def _image_curve(
    model, inputs, relevance, target, labels, *, counts, fractions, insert, descending, granularity, baseline,
    mean, std, measure, grid, batch_size, protocol,
) -> Curve:
    x = _check_images(inputs)
    B, C, H, W = x.shape
    name = _measure_name(measure)
    key, g = _image_relevance(relevance, B, H, W, granularity, grid)
    key = key.to(x.device)
    rank = _ranks_descending(key if descending else -key)  # (B, n): rank 0 goes first
    fill = _fill_values(baseline, x, mean, std)
    base_logits = _forward_chunked(model, B, batch_size, lambda i: x[i.to(x.device)])
    tgt = _resolve_target(target, relevance, base_logits)
    lab = None if labels is None else _class_vector(labels, B, base_logits.shape[1], base_logits.device, "labels")
    base = _apply_measure(measure, base_logits, tgt, lab)
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

    values = _run_points(model, build, ~identity, base, measure, tgt, lab, batch_size)
    fr = torch.as_tensor(fractions, dtype=torch.float64)
    return Curve(fr, values, name, protocol)


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fr = [float(f) for f in fractions]
    if not fr or any(not (0 < f <= 1) for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
        raise ValueError(f"fractions must be increasing values in (0, 1], got {list(fractions)}")
    return fr


def perturbation_curve(
    model: Callable,
    inputs: torch.Tensor,
    relevance: Relevance,
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
        raise ValueError(f"mode must be 'positive' (most relevant removed first) or 'negative', got {mode!r}")
    fr = _check_fractions(fractions)
    x = _check_images(inputs)
    n = x.shape[-2] * x.shape[-1]
    if granularity == "patch":
        _, g = _image_relevance(relevance, x.shape[0], x.shape[-2], x.shape[-1], "patch", grid)
        n = g[0] * g[1]
    counts = [0] + [int(n * f) for f in fr]
    return _image_curve(
        model, x, relevance, target, labels, counts=counts, fractions=[0.0] + fr, insert=False,
        descending=mode == "positive", granularity=granularity, baseline=baseline, mean=mean, std=std,
        measure=measure, grid=grid, batch_size=batch_size, protocol=f"perturbation:{mode}:{granularity}",
    )


def _step_counts(n: int, steps: int | None, step_size: int | None, default_step: int) -> tuple[list[int], list[float]]:
    if steps is not None and step_size is not None:
        raise ValueError("pass steps or step_size, not both")
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        counts = [(i * n) // steps for i in range(steps + 1)]
        return counts, [i / steps for i in range(steps + 1)]
    size = default_step if step_size is None else step_size
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"step_size must be a positive int, got {step_size!r}")
    total = -(-n // size)
    return [min(i * size, n) for i in range(total + 1)], [i / total for i in range(total + 1)]


def _causal_curve(model, inputs, relevance, target, *, insert, steps, step_size, granularity, baseline, mean, std,
                  measure, labels, grid, batch_size) -> Curve:
    x = _check_images(inputs)
    B, C, H, W = x.shape
    if granularity == "pixel":
        n, default = H * W, W
    else:
        _, g = _image_relevance(relevance, B, H, W, "patch", grid)
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
    relevance: Relevance,
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
    relevance: Relevance,
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


# =============================================================================================
# text
# =============================================================================================
def _text_batch(batch: Any) -> dict:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError("expected the dict a Hugging Face tokenizer returns (with 'input_ids'), got "
                        f"{type(batch).__name__}")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("expected input_ids as a (B, T) tensor (tokenize with return_tensors='pt')")
    return dict(batch)


def _special_mask(batch: dict, tokenizer: Any) -> torch.Tensor:
    ids = batch["input_ids"]
    if batch.get("special_tokens_mask") is not None:
        special = torch.as_tensor(batch["special_tokens_mask"], device=ids.device).bool()
        if special.shape != ids.shape:
            raise ValueError(f"special_tokens_mask has shape {tuple(special.shape)}, input_ids {tuple(ids.shape)}")
        return special
    if tokenizer is not None and getattr(tokenizer, "all_special_ids", None) is not None:
        return torch.isin(ids, torch.as_tensor(list(tokenizer.all_special_ids), dtype=ids.dtype, device=ids.device))
    raise ValueError(
        "cannot tell the special tokens ([CLS], [SEP], ...) from the content: tokenize with "
        "return_special_tokens_mask=True or pass tokenizer="
    )


def _text_scores(relevance: Relevance, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(relevance, Explanation):
        if relevance.grid is not None:
            raise ValueError("this explanation is of an image; use perturbation_curve / deletion_curve")
        scores = relevance.scores
    elif isinstance(relevance, torch.Tensor):
        scores = relevance
    else:
        raise TypeError(f"relevance must be an attnx Explanation or a (B, T) tensor, got {type(relevance).__name__}")
    scores = scores.detach()
    if scores.shape != ids.shape:
        raise ValueError(f"expected relevance of shape {tuple(ids.shape)} (one value per token), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.float()
    _check_finite(scores, "relevance")
    return scores.to(ids.device)


def token_deletion_curve(
    model: Callable,
    batch: Mapping[str, torch.Tensor],
    relevance: Relevance,
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
    name = _measure_name(measure)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    special = _special_mask(data, tokenizer)
    attention = data.get("attention_mask")
    attention = torch.ones_like(ids) if attention is None else torch.as_tensor(attention, device=ids.device)
    if attention.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention.shape)}, input_ids {tuple(ids.shape)}")
    content = attention.bool() & ~special
    scores = _text_scores(relevance, ids)

    replace_id = None
    if replacement in ("mask", "unk"):
        attr = f"{replacement}_token_id"
        replace_id = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if replace_id is None:
            raise ValueError(
                f"replacement={replacement!r} needs the tokenizer's {attr}: pass tokenizer= (or a token id, or replacement='pad')"
            )
    elif isinstance(replacement, int) and not isinstance(replacement, bool):
        replace_id = replacement
    elif replacement != "pad":
        raise ValueError(f"replacement must be 'mask', 'unk', 'pad' or a token id, got {replacement!r}")

    model_inputs = {k: v for k, v in data.items() if k not in _TOKENIZER_ONLY_KEYS}
    if replacement == "pad" and "attention_mask" not in model_inputs:
        model_inputs["attention_mask"] = attention

    def select(i: torch.Tensor) -> dict:
        i = i.to(ids.device)
        return {k: v[i] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v
                for k, v in model_inputs.items()}

    base_logits = _forward_chunked(model, B, batch_size, select)
    tgt = _resolve_target(target, relevance, base_logits)
    lab = None if labels is None else _class_vector(labels, B, base_logits.shape[1], base_logits.device, "labels")
    base = _apply_measure(measure, base_logits, tgt, lab)

    key = scores if most_relevant_first else -scores
    key = torch.where(content, key, torch.full_like(key, -math.inf))  # never removed: sorted last
    rank = _ranks_descending(key)
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

    values = _run_points(model, build, counts != 0, base, measure, tgt, lab, batch_size)
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
    relevance: Relevance,
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
            raise ValueError("rationale_f1 scores text explanations; this one is of an image")
        scores = relevance.scores
        if attention_mask is None and relevance.layout is not None and relevance.layout.valid is not None:
            attention_mask = relevance.layout.valid
    elif isinstance(relevance, torch.Tensor):
        scores = relevance
    else:
        raise TypeError(f"relevance must be an attnx Explanation or a (B, T) tensor, got {type(relevance).__name__}")
    scores = scores.detach()
    if scores.dim() != 2:
        raise ValueError(f"expected (B, T) token relevance, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.float()
    _check_finite(scores, "relevance")
    B, T = scores.shape
    truth = _bool_mask(rationale_mask, (B, T), "rationale_mask").to(scores.device)
    candidates = torch.ones(B, T, dtype=torch.bool, device=scores.device)
    if attention_mask is not None:
        candidates &= _bool_mask(attention_mask, (B, T), "attention_mask").to(scores.device)
    if special_tokens_mask is not None:
        candidates &= ~_bool_mask(special_tokens_mask, (B, T), "special_tokens_mask").to(scores.device)
    if isinstance(k, bool) or isinstance(k, float):
        raise TypeError(f"k must be an int or one int per sample, got {k!r}")
    kk = torch.as_tensor(k, device=scores.device)
    if kk.is_floating_point():
        raise TypeError(f"k must hold ints, got dtype {kk.dtype}")
    kk = kk.long().reshape(-1).expand(B) if kk.numel() == 1 else kk.long().reshape(-1)
    if kk.numel() != B or (kk < 0).any():
        raise ValueError(f"k must be a non-negative int or {B} of them, got {k!r}")
    key = torch.where(candidates, scores, torch.full_like(scores, -math.inf))
    rank = _ranks_descending(key)
    picked = (rank < kk[:, None]) & candidates
    hits = (picked & truth).sum(dim=1).double()
    n_pred, n_true = picked.sum(dim=1).double(), truth.sum(dim=1).double()
    precision = torch.where(n_pred > 0, hits / n_pred.clamp(min=1), torch.zeros_like(hits))
    recall = torch.where(n_true > 0, hits / n_true.clamp(min=1), torch.zeros_like(hits))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(hits))
    return RationaleScores(precision, recall, f1)


# =============================================================================================
# localisation
# =============================================================================================
def _bool_mask(mask: Any, shape: tuple, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"expected {name} of shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must be boolean (or hold only 0 and 1)")
    return mask.bool()


def _masks(masks: Any, name: str = "masks") -> torch.Tensor:
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"expected {name} as a (B, H, W) boolean tensor, got {got}")
    return _bool_mask(masks, tuple(masks.shape), name)


def _maps(maps: Relevance, B: int, size: tuple[int, int], *, normalise: bool) -> torch.Tensor:
    """``(B, H, W)`` maps at the mask size: min-max normalised heat maps, or raw relevance."""
    H, W = size
    if isinstance(maps, Explanation):
        if maps.grid is None:
            raise ValueError("this explanation is of text; localisation metrics need image maps")
        if len(maps) != B:
            raise ValueError(f"the explanation has {len(maps)} samples but the masks {B}")
        if normalise:
            return maps.heatmap(size=size)
        pixels = maps.extras.get("pixel_relevance")
        if pixels is not None:
            out = pixels.detach()
        else:
            out = maps.patch_map().detach()
    elif isinstance(maps, torch.Tensor):
        out = maps.detach()
        if out.dim() == 4:
            out = out.sum(dim=1)
        if out.dim() == 2:
            out = out.reshape(out.shape[0], *_infer_grid(out.shape[1], H, W))
        if out.dim() != 3:
            raise ValueError(f"expected maps of shape (B, H, W) (or (B, h, w), (B, P), (B, C, H, W)), got {tuple(maps.shape)}")
        if out.shape[0] != B:
            raise ValueError(f"the maps have {out.shape[0]} samples but the masks {B}")
    else:
        raise TypeError(f"maps must be an attnx Explanation or a tensor, got {type(maps).__name__}")
    if not out.is_floating_point():
        out = out.float()
    if tuple(out.shape[-2:]) != (H, W):  # patch maps are upsampled as the reference does
        out = F.interpolate(out[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    _check_finite(out, "maps")
    return normalize_per_sample(out) if normalise else out


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` average precision of each row of ``scores`` ``(B, n)`` against ``labels`` ``(B, n)``.

    ``AP = Σ_t (R_t - R_{t-1}) P_t`` over the distinct score thresholds in decreasing order
    (tied scores form one threshold), the definition of scikit-learn's
    ``average_precision_score``; 0 for a row without positives.
    """
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(f"expected scores and labels of the same (B, n) shape, got {tuple(scores.shape)} and {tuple(labels.shape)}")
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


def segmentation_scores(maps: Relevance, masks: torch.Tensor) -> SegmentationScores:
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

    def update(self, maps: Relevance, masks: torch.Tensor) -> SegmentationScores:
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


def pointing_game(maps: Relevance, masks: torch.Tensor, tolerance: float = 0) -> torch.Tensor:
    """``(B,)`` bool: is the map's maximum on the object (Zhang et al., ECCV 2016)?

    The maximum is the first maximal pixel in row-major order of the map at mask size (patch
    maps bilinearly upsampled, as ``heatmap(size)`` does); it is a hit when a mask pixel lies
    within ``tolerance`` pixels (Euclidean distance; Zhang et al. use 15) of it.
    """
    m = _masks(masks)
    B, H, W = m.shape
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    maps = _maps(maps, B, (H, W), normalise=False).to(m.device)
    idx = maps.reshape(B, -1).argmax(dim=1)
    if tolerance == 0:
        return m.reshape(B, -1).gather(1, idx[:, None])[:, 0]
    r, c = (idx // W).double(), (idx % W).double()
    rr = torch.arange(H, dtype=torch.float64, device=m.device).view(1, H, 1)
    cc = torch.arange(W, dtype=torch.float64, device=m.device).view(1, 1, W)
    near = (rr - r.view(B, 1, 1)) ** 2 + (cc - c.view(B, 1, 1)) ** 2 <= float(tolerance) ** 2
    return (near & m).flatten(1).any(dim=1)


def relevance_mass(relevance: Relevance, masks: torch.Tensor) -> torch.Tensor:
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
    relevance: Relevance, mask_target: torch.Tensor, mask_other: torch.Tensor, *, area_normalized: bool = False
) -> ClassDiscrimination:
    """Class discrimination on scenes with two objects: ``relevance`` explains the class of the
    object in ``mask_target``; a class-specific method should put its relevance there and not
    on the object in ``mask_other``. Masses are :func:`relevance_mass` on each mask; with
    ``area_normalized=True`` each is divided by its object's share of the image (so a large
    object does not win by size alone).
    """
    a, b = _masks(mask_target, "mask_target"), _masks(mask_other, "mask_other")
    if a.shape != b.shape:
        raise ValueError(f"mask_target {tuple(a.shape)} and mask_other {tuple(b.shape)} differ in shape")
    ma, mb = relevance_mass(relevance, a).double(), relevance_mass(relevance, b).double()
    if area_normalized:
        n = a.shape[1] * a.shape[2]
        fa, fb = a.flatten(1).sum(1).double() / n, b.flatten(1).sum(1).double() / n
        ma = torch.where(fa > 0, ma / fa.clamp(min=1e-300), torch.zeros_like(ma))
        mb = torch.where(fb > 0, mb / fb.clamp(min=1e-300), torch.zeros_like(mb))
    s = ma + mb
    score = torch.where(s > 0, (ma - mb) / s.clamp(min=1e-300), torch.zeros_like(s))
    return ClassDiscrimination(ma, mb, score, ma > mb)


# =============================================================================================
# correlations and the model-parameter randomisation test
# =============================================================================================
def _rows(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, Explanation):
        a = a.scores
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or an Explanation, got {type(a).__name__}")
    a = a.detach()
    if a.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension: (B, ...), got shape {tuple(a.shape)}")
    return a.reshape(a.shape[0], -1).to(torch.float64)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` ranks 1..n of each row, tied values sharing their average rank."""
    B, n = x.shape
    s, order = x.sort(dim=1, stable=True)
    start = torch.ones(B, n, dtype=torch.bool, device=x.device)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    group = start.long().cumsum(dim=1) - 1
    pos = torch.arange(n, dtype=torch.float64, device=x.device).expand(B, n)
    first = torch.full((B, n), math.inf, dtype=torch.float64, device=x.device).scatter_reduce(1, group, pos, "amin")
    last = torch.full((B, n), -math.inf, dtype=torch.float64, device=x.device).scatter_reduce(1, group, pos, "amax")
    avg = ((first + last) / 2 + 1).gather(1, group)
    return torch.empty_like(avg).scatter_(1, order, avg)


def _pair(a: Relevance, b: Relevance, mask: torch.Tensor | None):
    x, y = _rows(a, "a"), _rows(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"cannot correlate maps of shapes {tuple(x.shape)} and {tuple(y.shape)}")
    y = y.to(x.device)
    if mask is not None:
        mask = _bool_mask(mask.reshape(x.shape[0], -1) if isinstance(mask, torch.Tensor) else mask, tuple(x.shape), "mask")
        mask = mask.to(x.device)
    return x, y, mask


def _pearson_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    return (x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1))


def _per_sample(fn: Callable, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return fn(x, y)
    return torch.cat([fn(x[i : i + 1, mask[i]], y[i : i + 1, mask[i]]) for i in range(x.shape[0])])


def pearson(a: Relevance, b: Relevance, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` Pearson correlation of each sample's flattened maps (NaN when one is constant).

    ``mask`` (same shape, bool) restricts each sample to its ``True`` entries, e.g. the real
    tokens of a padded text batch.
    """
    x, y, mask = _pair(a, b, mask)
    return _per_sample(_pearson_rows, x, y, mask)


def spearman(a: Relevance, b: Relevance, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` Spearman rank correlation: Pearson correlation of the average ranks (ties share
    their mean rank, as in ``scipy.stats.spearmanr``); NaN when a map is constant. ``mask`` as
    in :func:`pearson`."""
    x, y, mask = _pair(a, b, mask)
    return _per_sample(lambda u, v: _pearson_rows(_average_ranks(u), _average_ranks(v)), x, y, mask)


@dataclass
class Randomisation:
    """Result of :func:`parameter_randomisation`.

    Attributes
    ----------
    layers:
        ``S`` names: ``"none"`` (the unchanged copy) and then what was randomised at each step.
    spearman, spearman_abs, pearson:
        ``(S, B)`` similarity of each step's map to the original map: Spearman rank correlation
        of the signed maps, of their absolute values, and Pearson correlation.
    maps:
        ``(S, B, P)`` the maps compared (an Explanation's ``scores``).
    valid:
        ``(B, P)`` bool: the entries compared (padding of a text batch excluded), or ``None``.
    order:
        ``"cascade"`` or ``"independent"``.
    """

    layers: list
    spearman: torch.Tensor
    spearman_abs: torch.Tensor
    pearson: torch.Tensor
    maps: torch.Tensor
    order: str
    valid: torch.Tensor | None = None

    def summary(self) -> list[dict]:
        """One row per step with the batch-mean correlations."""
        return [
            {"layer": name, "spearman": float(self.spearman[i].mean()), "spearman_abs": float(self.spearman_abs[i].mean()),
             "pearson": float(self.pearson[i].mean())}
            for i, name in enumerate(self.layers)
        ]


def _randomisation_steps(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Default steps, top down: the classifier head (parameters after the blocks), each block from
    the last to the first, then the embeddings (parameters before the blocks)."""
    names = [n for n, _ in model.named_parameters()]
    best, best_count = None, 0
    for cname, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(container.named_children())
        if len(kids) < 2 or len({type(c) for _, c in kids}) != 1:
            continue
        count = sum(p.numel() for p in container.parameters())
        if count > best_count:
            best, best_count = (cname, [k for k, _ in kids]), count
    if best is None:
        raise ValueError("cannot find the stack of Transformer blocks of this model; pass layers=[module names, top first]")
    cname, kids = best
    prefix = f"{cname}." if cname else ""
    blocks = [(f"{prefix}{k}", [n for n in names if n.startswith(f"{prefix}{k}.")]) for k in kids]
    in_blocks = {n for _, ps in blocks for n in ps}
    positions = [i for i, n in enumerate(names) if n in in_blocks]
    first, last = min(positions), max(positions)
    head = [n for i, n in enumerate(names) if i > last and n not in in_blocks]
    embeddings = [n for i, n in enumerate(names) if i < first and n not in in_blocks]
    steps = [("head", head)] if head else []
    steps += [b for b in reversed(blocks) if b[1]]
    if embeddings:
        steps.append(("embeddings", embeddings))
    return steps


def _named_steps(model: nn.Module, layers: Sequence[str]) -> list[tuple[str, list[str]]]:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    steps = []
    for name in layers:
        if name in modules:
            prefix = f"{name}." if name else ""
            steps.append((name, [n for n in params if n.startswith(prefix)]))
        elif name in params:
            steps.append((name, [name]))
        else:
            raise ValueError(f"{name!r} is neither a module nor a parameter of the model")
    return steps


def _redraw_(p: torch.Tensor, generator: torch.Generator) -> None:
    """Redraw ``p`` from a normal distribution with its own mean and standard deviation."""
    data = p.detach().double()
    mu = float(data.mean())
    sd = float(data.std()) if data.numel() > 1 else 0.0
    if not math.isfinite(sd) or sd == 0.0:
        sd = 0.02
    noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
    p.copy_((noise * sd + mu).to(device=p.device, dtype=p.dtype))


def parameter_randomisation(
    model: nn.Module,
    inputs: Any,
    method: str | Callable,
    target: Any = None,
    *,
    order: str = "cascade",
    layers: Sequence[str] | None = None,
    seed: int = 0,
    adapter: Any = None,
    **method_kwargs: Any,
) -> Randomisation:
    """Model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps",
    NeurIPS 2018): an explanation that depends on the model should change when its weights are
    randomised.

    Works on ``copy.deepcopy(model)``; the model passed in is never modified (its parameters,
    buffers, ``training`` flags, hooks and ``.grad`` stay as they are). The original map is the
    explanation on the copy; then, step by step, groups of parameters are re-drawn and the map
    is recomputed for the same target classes, and compared to the original map (an
    Explanation's ``scores``; for a padded text batch over the real tokens only).

    Steps (``layers=None``): the classifier head (every parameter registered after the stack
    of Transformer blocks, e.g. the final norm and the head), each block from the last to the
    first, then the embeddings (every parameter registered before the blocks). Or pass
    ``layers``: module (or parameter) names, top first. Step 0, ``"none"``, recomputes the map
    on the unchanged copy (correlation 1 for a deterministic method).

    ``order="cascade"`` randomises cumulatively from the top; ``"independent"`` randomises one
    step at a time, restoring the others. Each parameter tensor is re-drawn from a normal
    distribution with the tensor's own mean and standard deviation (0.02 when it has none), a
    scale-preserving re-initialisation drawn from a generator seeded with ``seed`` and the
    step's index (the global RNG is not used); both orders draw the same values for a step.

    Parameters
    ----------
    model:
        The model (any model attnx explains).
    inputs:
        Images ``(B, C, H, W)`` or a tokenizer's dict.
    method:
        An attnx method name (run with ``attnx.Explainer(copy, adapter)``, options from
        ``**method_kwargs``) or a callable ``(model, inputs, target) -> Explanation | tensor``.
    target:
        As in :meth:`attnx.Explainer.explain`; ``None`` explains the original model's
        prediction, and the randomised models are explained for those same classes.

    Returns
    -------
    Randomisation
        ``spearman``, ``spearman_abs`` and ``pearson`` ``(S, B)`` against the original map.
    """
    if order not in ("cascade", "independent"):
        raise ValueError(f"order must be 'cascade' or 'independent', got {order!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"parameter_randomisation needs an nn.Module to copy, got {type(model).__name__}")
    if not (isinstance(method, str) or callable(method)):
        raise TypeError(f"method must be an attnx method name or a callable, got {method!r}")
    work = copy.deepcopy(model)
    steps = _randomisation_steps(work) if layers is None else _named_steps(work, layers)
    params = dict(work.named_parameters())

    explainer = None
    if isinstance(method, str):
        from .explainer import Explainer

        explainer = Explainer(work, adapter=adapter)

    valid = None

    def run(t: Any) -> tuple[torch.Tensor, Any]:
        nonlocal valid
        out = explainer(inputs, method=method, target=t, **method_kwargs) if explainer else method(work, inputs, t)
        if isinstance(out, Explanation):
            layout = out.layout
            if out.grid is None and layout is not None and layout.valid is not None:  # padded text
                valid = layout.valid[:, layout.prefix_tokens :].to(out.scores.device)
            return _rows(out.scores, "map"), out.targets
        if isinstance(out, torch.Tensor):
            return _rows(out, "map"), None
        raise TypeError(f"the method must return an Explanation or a tensor, got {type(out).__name__}")

    reference, targets = run(target)
    fixed = targets if targets is not None else target
    maps = [run(fixed)[0]]
    names = ["none"]
    originals: dict[str, torch.Tensor] = {}
    for s, (name, pnames) in enumerate(steps):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + s)
        with torch.no_grad():
            if order == "independent":
                for n, v in originals.items():
                    params[n].copy_(v)
                originals = {n: params[n].detach().clone() for n in pnames}
            for n in pnames:
                _redraw_(params[n], gen)
        maps.append(run(fixed)[0])
        names.append(name)
    stacked = torch.stack(maps)  # (S, B, P)
    ref = reference.expand_as(stacked[0])
    sp = torch.stack([spearman(m, ref, valid) for m in stacked])
    sp_abs = torch.stack([spearman(m.abs(), ref.abs(), valid) for m in stacked])
    pe = torch.stack([pearson(m, ref, valid) for m in stacked])
    return Randomisation(names, sp, sp_abs, pe, stacked, order, valid)
