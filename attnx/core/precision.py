"""The precision a half-precision model is explained in: its own, or float32.

``precision=`` of :class:`attnx.Explainer` / :func:`attnx.explain`:

* ``"model"`` -- the model computes in its own dtype (bfloat16 / float16) with its own weights: no
  second copy of them. What the pass recorded (attention probabilities, their gradients, the
  relevance) is then turned to float32, so every method's own arithmetic (products of layers,
  sums, normalisations) runs in float32;
* ``"float32"`` -- the model computes in float32 (:func:`attnx.core.runtime.float32_execution`):
  each op casts the half-precision weights it reads and lets the cast go, so no float32 copy of
  the model is held (the exact float32 result of the rounded weights);
* ``"auto"`` (default) -- the model's own precision for the methods whose maps stayed within the
  tolerance :data:`TOLERANCE` of float32 on the measured models, float32 for the others
  (:data:`OWN_PRECISION`).

Models without half-precision weights or inputs run as they are whatever the choice. The measured
deviations are in ``docs/large_models.md`` (``benchmarks/precision_deviation.py``).
"""
from __future__ import annotations

import contextlib
from dataclasses import fields, replace
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import AttnxValueError
from .batch import Batch
from .runtime import HALF_DTYPES, float32_execution, no_autocast
from .trace_types import Trace

__all__ = [
    "OWN_PRECISION", "PRECISIONS", "TOLERANCE", "check_precision", "compute_dtype",
    "explained_in", "in_float32",
]

PRECISIONS = ("auto", "float32", "model")

#: what "within tolerance" means, per sample against the float32 map of the same (rounded) weights:
#: Spearman rank correlation at least 0.99 and relative L2 distance at most 0.1
TOLERANCE = {"spearman": 0.99, "relative_l2": 0.1}

#: the methods (``"<method>:<preset>"`` for those with a preset option) a model of each dtype
#: computes in its own precision under ``"auto"``: those whose maps stayed within :data:`TOLERANCE`
#: on every measured model (docs/large_models.md). A pass without a method (``Explainer.trace``, the
#: readout check) runs in the model's own precision when it records no relevance (as the attention
#: methods do), else in float32.
OWN_PRECISION: dict[torch.dtype, frozenset[str]] = {
    # outside in bfloat16: transformer_attribution (Spearman 0.65 on the vision model), partial_lrp
    # (relative L2 0.17 on the text model), gradient_x_input (0.974 / 0.13 on SmolLM2), attn_gradcam
    # (Spearman 0.988 on the text model), raw_attention (0.990 on SmolLM2)
    torch.bfloat16: frozenset({"rollout", "grad_rollout", "generic", "legrad", "lrp:attnlrp", "lrp:cplrp"}),
    # transformer_attribution and partial_lrp overflow in float16 (non-finite maps)
    torch.float16: frozenset({"raw_attention", "rollout", "grad_rollout", "generic", "attn_gradcam", "legrad",
                              "gradient_x_input", "lrp:attnlrp", "lrp:cplrp"}),
}


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; else a clear error."""
    if precision not in PRECISIONS:
        raise AttnxValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision


def half_dtype(model: nn.Module, batch: Batch) -> torch.dtype | None:
    """The half-precision dtype the model computes in (its first floating parameter's, else an input's)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype if t.dtype in HALF_DTYPES else None
    inputs = [*batch.args, *batch.kwargs.values()]
    return next((v.dtype for v in inputs if isinstance(v, torch.Tensor) and v.dtype in HALF_DTYPES), None)


def compute_dtype(
    model: nn.Module, batch: Batch, precision: str, relevance: bool, method: str | None = None
) -> torch.dtype | None:
    """The half-precision dtype to compute ``model`` in for ``method`` (a pass recording relevance
    when ``relevance``), or ``None`` for float32 (or a model without half precision)."""
    dtype = half_dtype(model, batch)
    if dtype is None or precision == "float32":
        return None
    if precision == "model":
        return dtype
    if method is None:
        return None if relevance else dtype
    return dtype if method in OWN_PRECISION.get(dtype, ()) else None


@contextlib.contextmanager
def explained_in(
    model: nn.Module, batch: Batch, precision: str, relevance: bool, method: str | None = None
) -> Iterator[Batch]:
    """Run ``model`` on ``batch`` in the precision ``precision`` chooses; yields the batch to run.

    In the model's own precision, floating inputs are cast to its dtype (the user's tensors are not
    touched) and autocast is off; else :func:`attnx.core.runtime.float32_execution`.
    """
    dtype = compute_dtype(model, batch, check_precision(precision), relevance, method)
    if dtype is None:
        with float32_execution(model, batch) as batch:
            yield batch
        return

    def cast(v: Any) -> Any:
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    with no_autocast(tuple({t.device.type for t in model.parameters()})):
        kwargs = {k: cast(v) for k, v in batch.kwargs.items()}
        yield replace(batch, args=tuple(cast(a) for a in batch.args), kwargs=kwargs)


def in_float32(trace: Trace) -> Trace:
    """``trace`` with its half-precision tensors (and lists of them) in float32: the methods'
    arithmetic on a pass computed in the model's own precision runs in float32."""

    def up(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dtype in HALF_DTYPES:
            return v.float()
        if isinstance(v, list):
            return [up(t) for t in v]
        return v

    for f in fields(trace):
        if f.name not in ("batch", "output", "model_forward"):
            setattr(trace, f.name, up(getattr(trace, f.name)))
    return trace
