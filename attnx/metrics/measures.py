"""Running the model and reading a measure off its output: what the faithfulness curves share.

The curves (:mod:`attnx.metrics.curves` for images, :func:`attnx.metrics.token_deletion_curve` for
text) call the model exactly as it is given (under ``torch.no_grad()``; no mode, flag or hook is
changed). ``model`` may be any callable: an image model is called as ``model(x)``, a text model as
``model(**batch)``; the logits are the output itself, its ``.logits`` or its first element. Wrap
models that need other arguments in a lambda, e.g.
``lambda x: hf_vit(pixel_values=x, interpolate_pos_encoding=True)``.

At each point of a curve the curve records a measure of the logits for the followed class: one of
:data:`MEASURES` or any callable ``(logits, target) -> (B,)``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch

from ..core.explanation import Explanation
from ..core.model_output import logits_of
from ..errors import AttnxTypeError, AttnxValueError

__all__ = [
    "MEASURES",
    "Measure",
    "apply_measure",
    "class_vector",
    "forward_chunked",
    "measure_name",
    "resolve_target",
    "run_points",
]

#: a preset measure's name or a callable ``(logits, target) -> (B,)``
Measure = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

#: the preset measures of the curves (any callable ``(logits, target) -> (B,)`` works too)
MEASURES = ("accuracy", "probability", "sigmoid", "present", "logit")


def _forward(model: Callable, inputs: Any) -> torch.Tensor:
    """``(B, C)`` logits of ``model`` on ``inputs``, without gradients; the model is not touched."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    logits = logits_of(out, embeddings=False).detach()
    if logits.dim() != 2:
        raise AttnxValueError(f"expected the model to return logits of shape (B, C), got {tuple(logits.shape)}")
    return logits


def forward_chunked(model: Callable, batch: int, batch_size: int | None, select: Callable) -> torch.Tensor:
    """Logits of the unperturbed inputs, at most ``batch_size`` samples per call."""
    step = batch if not batch_size else int(batch_size)
    if step < 1:
        raise AttnxValueError(f"batch_size must be a positive int, got {batch_size!r}")
    parts = [_forward(model, select(torch.arange(s, min(s + step, batch)))) for s in range(0, batch, step)]
    return torch.cat(parts, dim=0)


def class_vector(value: Any, batch: int, num_classes: int, device: torch.device, name: str) -> torch.Tensor:
    """``value`` (an int, ``B`` ints or a tensor) as a ``(B,)`` long tensor of valid classes."""
    if isinstance(value, (bool, float)) or (callable(value) and not isinstance(value, torch.Tensor)):
        raise AttnxTypeError(f"{name} must be an int, a sequence of ints or an integer tensor, got {value!r}")
    if isinstance(value, int):
        classes = torch.full((batch,), value, dtype=torch.long, device=device)
    else:
        classes = torch.as_tensor(value, device=device)
        if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
            raise AttnxTypeError(f"{name} must hold integer classes, got dtype {classes.dtype}")
        classes = classes.long().reshape(-1)
        if classes.numel() == 1 and batch > 1:
            classes = classes.expand(batch)
        if classes.numel() != batch:
            raise AttnxValueError(f"got {classes.numel()} {name} values for a batch of {batch} samples")
    bad = (classes < 0) | (classes >= num_classes)
    if bad.any():
        raise AttnxValueError(
            f"{name} class {classes[bad][0].item()} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return classes


def resolve_target(target: Any, relevance: Any, logits: torch.Tensor) -> torch.Tensor:
    """The class each curve follows: ``target``, else the explanation's, else the prediction."""
    B, C = logits.shape
    if target is None and isinstance(relevance, Explanation) and relevance.targets is not None:
        target = relevance.targets
    if target is None:
        return logits.argmax(dim=1)
    return class_vector(target, B, C, logits.device, "target")


def measure_name(measure: Measure) -> str:
    """The name a curve records for ``measure`` (a preset's own, else the callable's ``__name__``)."""
    if isinstance(measure, str):
        if measure not in MEASURES:
            raise AttnxValueError(f"unknown measure {measure!r}; choose one of {list(MEASURES)} or pass a callable (logits, target) -> (B,)")
        return measure
    if callable(measure):
        return getattr(measure, "__name__", type(measure).__name__)
    raise AttnxTypeError(f"measure must be one of {list(MEASURES)} or a callable (logits, target) -> (B,), got {measure!r}")


def apply_measure(measure: Measure, logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``(B,)`` value of ``measure`` on ``logits`` for the classes ``target``."""
    lf = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if callable(measure) and not isinstance(measure, str):
        v = measure(logits, target)
        if not isinstance(v, torch.Tensor) or v.shape != (logits.shape[0],):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise AttnxValueError(f"a measure must return a tensor of shape ({logits.shape[0]},), one value per sample; got {got}")
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


def run_points(
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
        raise AttnxValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for s in range(0, jobs.numel(), step):
        j = jobs[s : s + step]
        k_idx, b_idx = j // B, j % B
        logits = _forward(model, build(k_idx, b_idx))
        b_dev = b_idx.to(target.device)
        v = apply_measure(measure, logits, target[b_dev], None if labels is None else labels[b_dev])
        values.view(-1)[j.to(values.device)] = v.to(values.dtype)
    return values.T.contiguous()
