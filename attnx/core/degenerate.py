"""Never a silent degenerate map: constant, all-zero or non-finite relevance is reported.

A map that gives every real content token the same value (all zero included) shows nothing; one
with NaN or infinite values cannot be drawn. :func:`check_map` runs on every explanation the
explainer builds: it warns with :class:`~attnx.errors.DegenerateMapWarning` for constant maps and
raises :class:`~attnx.errors.NonFiniteMapError` for non-finite ones, naming the method, the
samples and the likely cause. An LRP pass under a conserving preset whose input relevance sums to
orders of magnitude more than the relevance put on the logits (a blow-up) warns too.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import DegenerateMapWarning, NonFiniteMapError
from .layout import Layout

__all__ = ["BLOWUP", "blown_up_samples", "check_map", "check_relevance", "constant_samples", "nonfinite_samples"]

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
    if attentions is None and getattr(trace, "folded_heads", False):  # (B, N, N): the heads' fusion
        attentions = [a for a in trace.folded if a is not None]
    readout = trace.layout.readout if trace.layout is not None else None
    if isinstance(readout, torch.Tensor):  # one token per sample, or a weighting of rows (not one token)
        readout = readout.tolist() if readout.dim() == 1 else None
    if attentions and readout is not None:
        at = (lambda b: readout) if isinstance(readout, int) else (lambda b: readout[b])  # noqa: E731
        alone = all(bool((a[b, ..., at(b), at(b)] >= 1 - 1e-6).all()) for a in attentions for b in samples)
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


#: an input relevance summing to more than this many times the relevance seeded at the logits
#: (under a conserving preset) has blown up
BLOWUP = 100.0


def blown_up_samples(trace) -> tuple[list[int], list[int]]:
    """``(non_finite, blown_up)``: samples whose input relevance is not finite, or (under a
    conserving preset) sums to more than :data:`BLOWUP` times the relevance put on the logits
    (or the size it can take: ``trace.relevance_scale``) away from it."""
    relevance = getattr(trace, "input_relevance", None)
    if relevance is None:
        return [], []
    total = relevance.detach().flatten(1).to(torch.float64).sum(1)
    bad = nonfinite_samples(relevance)
    seeded = getattr(trace, "seeded_relevance", None)
    if not getattr(trace, "conserving", False) or seeded is None:
        return bad, []
    seeded = seeded.detach().to(device=total.device, dtype=torch.float64)
    scale = seeded.abs()
    if getattr(trace, "relevance_scale", None) is not None:
        scale = torch.maximum(scale, trace.relevance_scale.detach().to(device=total.device, dtype=torch.float64))
    scale = scale.clamp(min=torch.finfo(relevance.dtype).tiny)
    far = (total - seeded).abs() > BLOWUP * scale
    return bad, [b for b in torch.nonzero(far).flatten().tolist() if b not in bad]


def check_relevance(trace, method: str, first_sample: int = 0) -> None:
    """Raise for non-finite input relevance; warn when a conserving preset's input relevance is
    orders of magnitude away from the relevance it started with (a rule dividing by a vanishing
    denominator). ``first_sample``: the index of the trace's first sample in the user's batch
    (a sub-batch, :mod:`attnx.core.sub_batches`), for the messages."""
    bad, far = blown_up_samples(trace)
    if bad:
        raise NonFiniteMapError(
            f"method {method!r} gave sample(s) {shifted(bad, first_sample)} non-finite input relevance (NaN or inf); likely cause: "
            f"{nonfinite_cause(trace)}"
        )
    if far:
        total = trace.input_relevance.detach().flatten(1).to(torch.float64).sum(1)
        preset = trace.coverage.preset if getattr(trace, "coverage", None) is not None else "the preset"
        pairs = ", ".join(f"{b + first_sample}: {total[b].item():.3g} vs {trace.seeded_relevance[b].item():.3g}" for b in far[:8])
        warnings.warn(
            f"method {method!r}: the input relevance of sample(s) {shifted(far, first_sample)} sums to more than {BLOWUP:g}x the relevance "
            f"put on the logits ({pairs}), although preset {preset!r} conserves relevance: the relevance blew up. "
            "Likely cause: a rule dividing by a (near) zero denominator (check e.coverage.report() for the rules "
            "that ran, and try the preset without gamma, e.g. 'attnlrp')",
            DegenerateMapWarning,
            stacklevel=5,
        )


def shifted(samples: list[int], first_sample: int) -> list[int]:
    """Sample indices of a sub-batch as indices into the user's batch."""
    return [b + first_sample for b in samples]


def check_map(scores: torch.Tensor, pixels: torch.Tensor | None, trace, method: str, first_sample: int = 0) -> None:
    """Raise for non-finite maps, warn for constant ones (see the module docstring).

    Parameters
    ----------
    scores:
        ``(B, P)`` content scores of the explanation.
    pixels:
        ``(B, H, W)`` pixel relevance drawn as the heat map, or ``None``.
    trace:
        The :class:`~attnx.core.trace.Trace` the method ran on.
    method:
        The method's name, for the messages.
    first_sample:
        The index of the trace's first sample in the user's batch, for the messages.
    """
    check_relevance(trace, method, first_sample)
    mask = content_of(scores, trace.layout)
    bad = sorted(set(nonfinite_samples(scores, mask)) | set([] if pixels is None else nonfinite_samples(pixels)))
    if bad:
        raise NonFiniteMapError(
            f"method {method!r} gave sample(s) {shifted(bad, first_sample)} non-finite relevance (NaN or inf); likely cause: "
            f"{nonfinite_cause(trace)}"
        )
    constant, zero = constant_samples(scores, mask)
    if pixels is not None:  # the heat map is drawn from the pixels: it is degenerate when they are
        p_constant, p_zero = constant_samples(pixels)
        constant, zero = sorted(set(constant) & set(p_constant)), sorted(set(zero) & set(p_zero))
    for kind, samples in (("an all-zero", zero), ("a constant", constant)):
        if samples:
            warnings.warn(
                f"method {method!r} gave sample(s) {shifted(samples, first_sample)} {kind} map: it shows nothing. Likely cause: "
                f"{likely_cause(trace, samples, kind == 'an all-zero')}",
                DegenerateMapWarning,
                stacklevel=5,
            )
