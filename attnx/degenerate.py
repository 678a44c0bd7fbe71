"""Never a silent degenerate map: constant, all-zero or non-finite relevance is reported.

A map that gives every real content token the same value (all zero included) shows nothing; one
with NaN or infinite values cannot be drawn. :func:`check_map` runs on every explanation the
explainer builds: it warns with :class:`~attnx.errors.DegenerateMapWarning` for constant maps and
raises :class:`~attnx.errors.NonFiniteMapError` for non-finite ones, naming the method, the
samples and the likely cause.
"""
from __future__ import annotations

import warnings

import torch

from .errors import DegenerateMapWarning, NonFiniteMapError
from .layout import Layout

__all__ = ["check_map", "constant_samples", "nonfinite_samples"]

#: a map is constant when max - min <= TINY_ULPS * eps(dtype) * max |value| over its content
TINY_ULPS = 8


def content_of(scores: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """``(B, P)`` bool mask of the real content tokens among the columns of ``scores``."""
    B, P = scores.shape
    mask = torch.ones(B, P, dtype=torch.bool, device=scores.device)
    if layout is not None and layout.valid is not None and P == layout.num_tokens - layout.prefix_tokens:
        mask &= layout.valid[:, layout.prefix_tokens :].to(device=scores.device, dtype=torch.bool)
    return mask


def nonfinite_samples(values: torch.Tensor, mask: torch.Tensor | None = None) -> list[int]:
    """Samples with a NaN or infinite value among ``values`` (B, ...) where ``mask`` holds."""
    bad = ~torch.isfinite(values.flatten(1))
    if mask is not None:
        bad &= mask.flatten(1)
    return torch.nonzero(bad.any(1)).flatten().tolist()


def constant_samples(values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """``(constant, all_zero)``: samples whose values where ``mask`` holds (at least two) have
    ``max - min <= TINY_ULPS * eps * max |value|``; the all-zero ones are listed apart."""
    flat = values.flatten(1)
    dtype = flat.dtype if flat.is_floating_point() else torch.float32
    flat = flat.to(torch.float64)
    mask = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.flatten(1)
    big = torch.finfo(torch.float64).max
    hi = torch.where(mask, flat, torch.full_like(flat, -big)).amax(1)
    lo = torch.where(mask, flat, torch.full_like(flat, big)).amin(1)
    scale = torch.where(mask, flat.abs(), torch.zeros_like(flat)).amax(1)
    flat_map = (mask.sum(1) >= 2) & (hi - lo <= TINY_ULPS * torch.finfo(dtype).eps * scale)
    constant = torch.nonzero(flat_map).flatten().tolist()
    zero = [b for b in constant if scale[b] == 0]
    return [b for b in constant if b not in zero], zero


def likely_cause(trace, samples: list[int], zero: bool) -> str:
    """The most likely reason the maps of ``samples`` are constant (from what the pass recorded)."""
    causes = []
    coverage = getattr(trace, "coverage", None)
    if coverage is not None and coverage.uncovered:
        causes.append(f"uncovered op(s) {sorted(coverage.uncovered)} ran as plain gradient x input")
    lrp = getattr(trace, "input_relevance", None) is not None or getattr(trace, "attention_relevance", None) is not None
    if zero and lrp and trace.targets is not None:
        y = trace.logits.gather(1, trace.targets[:, None].to(trace.logits.device))[:, 0]
        if all(y[b] == 0 for b in samples):
            causes.append("target logit zero (LRP relevance is proportional to it)")
    attentions = getattr(trace, "attentions", None)
    readout = trace.layout.readout if trace.layout is not None else None
    if isinstance(readout, torch.Tensor):  # one token per sample, or a weighting of rows (not one token)
        readout = readout.tolist() if readout.dim() == 1 else None
    if attentions and readout is not None:
        at = (lambda b: readout) if isinstance(readout, int) else (lambda b: readout[b])  # noqa: E731
        alone = all(bool((a[b, :, at(b), at(b)] >= 1 - 1e-6).all()) for a in attentions for b in samples)
        if alone:
            causes.append(
                f"readout row sees only itself (token {readout} attends only to itself in every layer: "
                "a causal decoder read at its first token?)"
            )
    if trace.logits.dtype in (torch.float16, torch.bfloat16):
        causes.append(f"{trace.logits.dtype} under/overflow (run the model in float32)")
    if causes:
        return "; ".join(causes)
    real = content_of(torch.zeros(trace.logits.shape[0], trace.layout.num_content), trace.layout).sum(1)
    if all(real[b] <= 2 for b in samples):
        return "only two real content tokens (e.g. the bert form of transformer_attribution sets the readout to its row minimum)"
    if zero:
        return (
            "no positive contribution: methods that keep the positive part only (attn_gradcam's ReLU, "
            "transformer_attribution's (grad A * R^A)+) found none"
        )
    return "the method gives every content token the same relevance on this input"


def nonfinite_cause(trace) -> str:
    if not torch.isfinite(trace.logits).all():
        return "the model's logits are not finite"
    if trace.logits.dtype in (torch.float16, torch.bfloat16):
        return f"fp16 overflow ({trace.logits.dtype} model: run it in float32)"
    return "a division by (near) zero in the method or a rule"


def check_map(scores: torch.Tensor, pixels: torch.Tensor | None, trace, method: str) -> None:
    """Raise for non-finite maps, warn for constant ones (see the module docstring).

    Parameters
    ----------
    scores:
        ``(B, P)`` content scores of the explanation.
    pixels:
        ``(B, H, W)`` pixel relevance drawn as the heat map, or ``None``.
    trace:
        The :class:`~attnx.trace.Trace` the method ran on.
    method:
        The method's name, for the messages.
    """
    mask = content_of(scores, trace.layout)
    bad = sorted(set(nonfinite_samples(scores, mask)) | set([] if pixels is None else nonfinite_samples(pixels)))
    if bad:
        raise NonFiniteMapError(
            f"method {method!r} gave sample(s) {bad} non-finite relevance (NaN or inf); likely cause: "
            f"{nonfinite_cause(trace)}"
        )
    constant, zero = constant_samples(scores, mask)
    if pixels is not None:  # the heat map is drawn from the pixels: it is degenerate when they are
        p_constant, p_zero = constant_samples(pixels)
        constant, zero = sorted(set(constant) & set(p_constant)), sorted(set(zero) & set(p_zero))
    for kind, samples in (("an all-zero", zero), ("a constant", constant)):
        if samples:
            warnings.warn(
                f"method {method!r} gave sample(s) {samples} {kind} map: it shows nothing. Likely cause: "
                f"{likely_cause(trace, samples, kind == 'an all-zero')}",
                DegenerateMapWarning,
                stacklevel=4,
            )
