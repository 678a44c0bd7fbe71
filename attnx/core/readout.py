"""The readout: the rows of the last layer the model's head reads, with their weights, checked.

Attention methods read one row of a token-by-token matrix (or a weighting of rows): the rows
the head reads. Adapters declare them from the model's own pooling (the class token, the mean of
the patch tokens, a MAP probe's attention, ...; :mod:`attnx.adapters.pooling`). A measurement
confirms it: the gradient of the explained scalar ``y_t`` with respect to the last layer's
attention probabilities ``A_L`` is non-zero on exactly the rows the head reads (row ``i`` of
``A_L`` only changes token ``i``, and what follows the last attention is per token up to the
head's pooling). So:

* declared and measured rows disagree: :class:`ReadoutMismatchError`, never a silent wrong row;
* nothing declared (the fallback adapter on an unknown model): the readout is derived from the
  measured rows -- one row per sample, the mean of the content rows, or the mean of every real
  row (equal weights: the gradient at ``A_L`` shows which rows are read, not their weights); any
  other set of rows is refused.

What the check costs: nothing for methods that take ``dy_t/dA`` anyway (``grad_rollout``,
``generic``, ``transformer_attribution``, ``attn_gradcam``, ...): their trace's last-layer
gradient is the measurement. For image models explained by a method without gradients
(``rollout``, ``raw_attention``, ``attention_flow``), one extra forward and a backward to the last
layer only, once per :class:`~attnx.core.explainer.Explainer` and token layout (and on every call
when the readout is undeclared and one token per sample). Text layouts with a declared readout
(a classifier's class token, a language model's last token) are checked when gradients exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..adapters.base import Adapter
from ..errors import ReadoutMismatchError, UnsupportedModelError
from .layer_fold import row_norms
from .layout import Layout, Readout

__all__ = ["ReadoutUsed", "describe", "rows_read", "check_rows", "derive_readout", "settle_readout"]

#: rows whose gradient norm is below this fraction of the largest row's are not read
RELATIVE_TOLERANCE = 1e-6


def describe(layout: Layout) -> str:
    """The readout of ``layout`` in words ("class token", "mean of 196 patch tokens", ...)."""
    if layout.readout_name is not None:
        return layout.readout_name
    r = layout.readout
    if r is None:
        return f"mean of {layout.num_content} {'patch' if layout.grid is not None else 'content'} tokens"
    if isinstance(r, torch.Tensor) and r.dim() == 2:
        return "weighted rows"
    if isinstance(r, torch.Tensor) and r.numel() > 1:
        return "one token per sample" + (" (the last real token)" if layout.causal else "")
    index = int(torch.as_tensor(r).reshape(-1)[0])
    return "class token" if index == 0 and layout.prefix_tokens > 0 else f"token {index}"


@dataclass(frozen=True)
class ReadoutUsed:
    """The readout an explanation used: ``description`` in words and ``weights`` ``(B, N)``,
    the weight of each row of the last layer (rows sum to 1; prefix tokens included)."""

    description: str
    weights: torch.Tensor

    def rows(self, sample: int = 0) -> list[int]:
        """The rows a sample's readout reads (non-zero weight)."""
        return torch.nonzero(self.weights[sample]).flatten().tolist()

    def __str__(self) -> str:
        return self.description


def rows_read(gradient: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool: the rows of the last layer's attention ``A_L`` that the head reads, from
    ``gradient = dy_t/dA_L`` ``(B, H, N, N)``: the real rows with a non-zero gradient."""
    return rows_of_norms(row_norms(gradient), valid)


def rows_of_norms(norms: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`rows_read` from the ``(B, N)`` :func:`~attnx.core.layer_fold.row_norms` of the gradient."""
    norms = norms * valid.to(norms.device)
    top = norms.amax(dim=1, keepdim=True)
    return (norms > RELATIVE_TOLERANCE * top) & (top > 0)


def check_rows(read: torch.Tensor, readout: Readout, description: str) -> None:
    """Raise :class:`ReadoutMismatchError` when the declared readout's rows are not the rows
    ``read`` (``(B, N)`` bool, :func:`rows_read`) that the head reads."""
    declared = (readout.weights != 0).to(read.device) & readout.valid.to(read.device)
    measured = read.any(dim=1)  # a sample whose target has no gradient at all shows nothing
    bad = ((declared != read).any(dim=1) & measured).nonzero().flatten().tolist()
    if bad:
        b = bad[0]
        raise ReadoutMismatchError(
            f"the readout declared for this model ({description}: rows {_rows(declared[b])}) is not what its head "
            f"reads: the target's gradient reaches rows {_rows(read[b])} of the last layer (sample {b}); "
            "attnx refuses rather than explain a row the head does not read (pass an adapter that declares the "
            "head's pooling, see docs/readout.md)"
        )


def _rows(mask: torch.Tensor, limit: int = 8) -> str:
    rows = torch.nonzero(mask).flatten().tolist()
    return str(rows) if len(rows) <= limit else f"{rows[:limit - 1]}... ({len(rows)} rows)"


def derive_readout(read: torch.Tensor, layout: Layout) -> Layout:
    """``layout`` with the readout derived from the measured rows ``read`` ``(B, N)`` bool.

    One row per sample: that token. The content rows: their mean. Every real row: the mean of
    all. Equal weights are assumed for a mean (the gradient at ``A_L`` shows which rows are
    read, not how much); any other set of rows is refused with
    :class:`attnx.errors.UnsupportedModelError`.
    """
    B, N = read.shape
    valid = layout.valid_mask(B, read.device)
    content = layout.content_mask(B, read.device)
    counts = read.sum(dim=1)
    if (counts == 1).all():
        index = read.to(torch.int64).argmax(dim=1)
        same = bool((index == index[0]).all())
        layout.readout = int(index[0]) if same else index
        layout.readout_name = f"{describe(layout)} (measured)" if same else "one token per sample (measured)"
    elif torch.equal(read, content):
        layout.readout = None
        layout.readout_name = f"{describe(layout)} (measured rows, equal weights)"
    elif torch.equal(read, valid):
        w = valid.to(torch.float64)
        layout.readout = w / w.sum(dim=1, keepdim=True)
        layout.readout_name = f"mean of all {N} tokens (measured rows, equal weights)"
    else:
        raise UnsupportedModelError(
            f"the head of this model reads rows {_rows(read[0])} of the last layer: neither one token nor a "
            "mean of the content tokens, and no adapter declares its pooling; register an adapter that does "
            "(attnx.adapters.register_adapter, see docs/readout.md)"
        )
    layout.readout_declared = True
    return layout


def _layout_key(layout: Layout, adapter_name: str) -> tuple:
    return (adapter_name, layout.num_tokens, layout.prefix_tokens, layout.grid, describe(layout))


def settle_readout(trace: Any, adapter: Adapter, measure: Callable[[], Any], known: dict) -> tuple[Readout, ReadoutUsed]:
    """The :class:`~attnx.core.layout.Readout` a method reads on ``trace``, declared and checked, or derived.

    Parameters
    ----------
    trace:
        The method's :class:`~attnx.core.trace.Trace`.
    adapter:
        The model's adapter; ``adapter.target_readout(layout, targets)`` refines the readout for
        the explained classes.
    measure:
        Runs a pass with ``dy_t/dA`` of the last layer on the same inputs and target (used when
        ``trace`` has no gradient and a measurement is due).
    known:
        The caller's cache, by token layout: ``True`` for a declared readout already confirmed,
        the derived ``(readout, name)`` for an undeclared one that does not depend on the input.
    """
    layout = trace.layout
    B, device = trace.logits.shape[0], trace.logits.device
    if trace.targets is not None:
        layout = adapter.target_readout(layout, trace.targets)
    key = _layout_key(layout, adapter.name)
    gradient = trace.gradients[-1] if trace.gradients and trace.gradients[-1] is not None else None
    norms = None if gradient is None else row_norms(gradient)
    if norms is None and getattr(trace, "last_rows", None) is not None:  # a folding pass kept the norms only
        norms = trace.last_rows
    if norms is None and not layout.readout_declared and key in known:
        layout.readout, layout.readout_name = known[key]
        layout.readout_declared = True
    due = not layout.readout_declared or (layout.grid is not None and key not in known)
    if norms is None and due:
        norms = row_norms(measure().gradients[-1])
    if norms is not None:
        read = rows_of_norms(norms.to(device), layout.valid_mask(B, device))
        if not layout.readout_declared:
            layout = derive_readout(read, layout)
            if layout.readout is None or isinstance(layout.readout, int):
                known[key] = (layout.readout, layout.readout_name)
        else:
            check_rows(read, Readout(layout, B, device), describe(layout))
            known[key] = True
    readout = Readout(layout, B, device)
    return readout, ReadoutUsed(describe(layout), readout.weights.detach().clone())
