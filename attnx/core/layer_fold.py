"""Layer folds: what a method keeps of each layer, taken as the backward reaches it.

A method that reads a small function of each layer's attention ``A`` and its gradient
``dy_t/dA`` (the head-fused ``E_h[(∇A ⊙ A)⁺]`` of generic attention explainability, one readout
row of GradCAM) declares it as a fold when it is registered (``register_method(fold=...)``). The
attention pass (:mod:`attnx.core.attention_pass`) then applies it by a tensor hook on each
recorded attention as the backward reaches that layer, and releases the layer's ``A`` and
gradient: the trace holds ``Trace.folded`` (what the fold returned, per layer) instead of every
layer's ``(B, H, N, N)`` attention and gradient. The same fold applied to a full trace
(:func:`kept_layers`) gives the same tensors, so a method reads either kind of trace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import AttnxError
from .layout import Readout

__all__ = [
    "AttentionLayer", "KernelCallsMissed", "LayerFold", "fold_backward", "fold_kernel_backward", "forward_folder", "heads_fused",
    "LayerFolder", "kept_layers", "layer_index", "row_norms",
    "joined_by", "row_separable",
]


class KernelCallsMissed(Exception):
    """The forward left fewer (or more) attention calls to the fused kernel than the model has
    layers, or the backward did not reach a layer read: the pass is run again with the
    probabilities written out."""


@dataclass(frozen=True)
class AttentionLayer:
    """One layer as a fold sees it.

    Attributes
    ----------
    index, num_layers:
        The layer's place in forward order and the number of recorded layers (``0`` in a pass
        without a backward, which folds each layer in the forward before the number is known).
    attention:
        ``A`` ``(B, H, N, N)``, detached.
    gradient:
        ``dy_t/dA`` (same shape), or ``None`` below the lowest layer the backward reaches and in a
        pass without a backward.
    readout:
        The readout rows, when the model declares them before the pass (they are checked against
        the last layer's gradient afterwards); ``None`` when they are measured after the pass:
        a fold that reads rows then keeps whole matrices.
    """

    index: int
    num_layers: int
    attention: torch.Tensor
    gradient: torch.Tensor | None
    readout: Readout | None
    #: the query rows ``attention`` and ``gradient`` hold (a tile, :mod:`attnx.adapters.fused_kernel`);
    #: ``None``: all of them
    rows: slice | None = None


@dataclass(frozen=True)
class LayerFold:
    """A method's per-layer fold under its options: ``rule(layer, **options)`` -> what is kept
    of that :class:`AttentionLayer` (a tensor, a tuple of tensors, or ``None``: nothing)."""

    rule: Callable[..., Any]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, layer: AttentionLayer) -> Any:
        return self.rule(layer, **self.options)


def layer_index(option: Any, num_layers: int) -> int | None:
    """The layer an ``int`` option names (negative counts from the end), ``None`` when it names
    none (the method reports the bad option itself)."""
    if not isinstance(option, int) or isinstance(option, bool) or not -num_layers <= option < num_layers:
        return None
    return option % num_layers


def row_norms(gradient: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``(B, N)`` float64: the size of each row of ``dy_t/dA_L`` summed over heads and keys, from
    which :mod:`attnx.core.readout` tells the rows the head reads. One head and ``rows`` query
    rows at a time: the float64 temporaries are ``(B, rows, N)``, not a copy of the gradient."""
    g = gradient.detach()
    B, H, N = g.shape[0], g.shape[1], g.shape[2]
    norms = torch.zeros(B, N, dtype=torch.float64, device=g.device)
    for h in range(H):
        for start in range(0, N, rows):
            norms[:, start:start + rows] += g[:, h, start:start + rows].abs().to(torch.float64).sum(dim=-1)
    return norms


def kept_layers(trace: Any, fold: LayerFold, readout: Readout) -> list[Any]:
    """What ``fold`` keeps of every layer of ``trace``: ``trace.folded`` when the pass folded the
    layers, else the fold applied here to the full ``trace.attentions`` and ``trace.gradients``."""
    if trace.folded is not None:
        return trace.folded
    A, G = trace.attentions, trace.gradients
    grads = G if G is not None else [None] * len(A)
    return [fold(AttentionLayer(i, len(A), a, g, readout)) for i, (a, g) in enumerate(zip(A, grads))]


def num_layers(trace: Any) -> int:
    """The number of attention layers of ``trace``, folded or not."""
    return len(trace.folded if trace.folded is not None else trace.attentions)


def same_readout(used: Readout | None, readout: Readout) -> None:
    """Raise when a fold read other rows than the method's settled ``readout`` (cannot happen for a
    readout that was declared and confirmed; checked so that it is never silent)."""
    if used is not None and not torch.equal(used.weights.to(readout.weights.device), readout.weights):
        raise AttnxError("the layers were folded at other readout rows than the method reads; explain with a full trace")


def fold_backward(
    recorder: Any, score: torch.Tensor, fold: LayerFold, readout: Readout | None, first: int = 0
) -> tuple[list[Any], torch.Tensor | None]:
    """The backward of ``score`` to the recorded attentions from layer ``first`` on, folding each
    layer as its gradient arrives and releasing its ``A`` from ``recorder``.

    Returns
    -------
    folded:
        What ``fold`` kept of each layer (``None`` below ``first``).
    last_rows:
        :func:`row_norms` of the last layer's gradient (for the readout check), or ``None`` when
        the pass has no layer.
    """
    n = len(recorder.probs)
    folded: list[Any] = [None] * n
    state: dict[str, Any] = {"last_rows": None}
    needed = [i for i in range(first, n) if recorder.grad_wrt[i].requires_grad]
    if not needed:
        raise RuntimeError(
            "the recorded attention probabilities are not part of an autograd graph; "
            "was the forward run under torch.no_grad() or torch.inference_mode()?"
        )

    def take(i: int, gradient: torch.Tensor | None) -> None:
        probs = recorder.probs[i]
        g = torch.zeros_like(probs) if gradient is None else gradient.detach().reshape(probs.shape)
        folded[i] = fold(AttentionLayer(i, n, probs.detach(), g, readout))
        if i == n - 1:
            state["last_rows"] = row_norms(g)
        recorder.probs[i] = recorder.grad_wrt[i] = None  # released: the graph frees its own copy

    def hook_for(i: int) -> Callable[[torch.Tensor], None]:
        return lambda gradient: take(i, gradient)

    handles = [recorder.grad_wrt[i].register_hook(hook_for(i)) for i in needed]
    try:
        # the backward runs to the layers no other needed layer's backward passes through (the
        # lowest one of a stack); the hooks see every needed layer on the way
        sinks = [recorder.grad_wrt[i] for i in lowest(recorder, needed)]
        torch.autograd.grad(score, sinks, allow_unused=True)
        del sinks
    finally:
        for h in handles:
            h.remove()
    for i in range(first, n):
        if recorder.probs[i] is not None:  # not on the score's graph: its gradient is zero
            take(i, None)
    return folded, state["last_rows"]


def row_separable(rule: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a fold rule whose result on the query rows ``rows`` of a layer (``A`` and ``dy_t/dA``
    ``(B, H, rows, N)``) is the rows ``rows`` (axis ``-2``) of its result on the whole layer, so
    that a layer may be folded in tiles of query rows (:mod:`attnx.adapters.fused_kernel`)."""
    return joined_by(join_rows)(rule)


def heads_fused(rule: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a fold rule that keeps each layer's attention with its heads fused, ``(B, N, N)``: a
    trace of its folds still tells what each row attends to (``Trace.folded_heads``)."""
    rule.heads_fused = True
    return rule


def joined_by(join: Callable[[list], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a fold rule that may see a layer in tiles of query rows (``AttentionLayer.rows``):
    ``join(pieces)`` makes its result on the whole layer from its results on consecutive tiles."""

    def mark(rule: Callable[..., Any]) -> Callable[..., Any]:
        rule.join_rows = join
        return rule

    return mark


class LayerFolder:
    """The folds of :func:`fold_kernel_backward`: each call's backward hands its layer over in
    pieces of query rows when the fold declares how to join them (:func:`joined_by`), else whole."""

    def __init__(self, fold: LayerFold, readout: Readout | None, first: int, n: int) -> None:
        self.fold, self.readout, self.first, self.n = fold, readout, first, n
        self.join = getattr(fold.rule, "join_rows", None)
        self.folded: list[Any] = [None] * n  # grows in a forward fold (n = 0: not known yet)
        self.pieces: dict[int, list[tuple[Any, torch.Tensor | None]]] = {}
        self.last_rows: torch.Tensor | None = None

    def tiled(self, index: int) -> bool:
        return self.join is not None

    def piece(self, index: int, rows: slice, probs: torch.Tensor, gradient: torch.Tensor) -> None:
        if index < self.first:
            return
        # a fold without a join sees the whole layer, in one piece
        kept = self.fold(AttentionLayer(index, self.n, probs.detach(), None if gradient is None else gradient.detach(),
                                        self.readout, None if self.join is None else rows))
        norms = row_norms(gradient) if index == self.n - 1 and gradient is not None else None
        self.pieces.setdefault(index, []).append((kept, norms))

    def done(self, index: int) -> None:
        pieces = self.pieces.pop(index, [])
        if not pieces:
            return
        kept = [k for k, _ in pieces]
        self.folded.extend([None] * (index + 1 - len(self.folded)))
        self.folded[index] = kept[0] if self.join is None else self.join(kept)
        if index == self.n - 1:
            self.last_rows = torch.cat([r for _, r in pieces], dim=1)


def forward_folder(fold: LayerFold) -> LayerFolder:
    """The folder of a pass without a backward (:mod:`attnx.adapters.fused_kernel` computes each
    kernel call's ``A`` in the forward and hands it over): the layers' number is not known while
    they are folded, so the fold sees ``num_layers = 0`` and no gradient."""
    return LayerFolder(fold, None, 0, 0)


def join_rows(pieces: list[Any]) -> Any:
    """The pieces a row-separable fold kept of consecutive query-row tiles, joined along the rows."""
    first = pieces[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(join_rows(list(parts)) for parts in zip(*pieces))
    return torch.cat(pieces, dim=-2)


def fold_kernel_backward(
    recorder: Any, score: torch.Tensor, fold: LayerFold, readout: Readout | None, first: int = 0
) -> tuple[list[Any], torch.Tensor | None]:
    """:func:`fold_backward` for attention left to the model's fused kernel
    (``recorder.kernel_calls``, :mod:`attnx.adapters.fused_kernel`): each call's backward
    recomputes its layer's ``A`` and ``dy_t/dA`` (in query-row tiles for a :func:`row_separable`
    fold) and folds them here; the backward asks for the calls' scalar probes from layer
    ``first`` on, so it stops below the lowest layer read."""
    calls = recorder.kernel_calls
    n = len(calls)
    folder = LayerFolder(fold, readout, first, n)
    for call in calls:
        call.folder, call.input_gradients = folder, call.index > first
    probes = [recorder.grad_wrt[i] for i in range(first, n)]
    try:
        torch.autograd.grad(score, probes, allow_unused=True)
    finally:
        for call in calls:
            call.folder = None
    del probes
    for i in range(n):
        recorder.probs[i] = recorder.grad_wrt[i] = None
    if not all(calls[i].folded for i in range(first, n)):
        # a layer off the score's graph: its A is not kept to fold it with a zero gradient
        raise KernelCallsMissed(f"the backward reached {sum(c.folded for c in calls[first:])} of {n - first} layers")
    return folder.folded, folder.last_rows


def lowest(recorder: Any, needed: list[int]) -> list[int]:
    """The needed layers whose attention's backward reaches no other needed layer's attention."""
    nodes = {recorder.grad_wrt[i].grad_fn: i for i in needed if recorder.grad_wrt[i].grad_fn is not None}
    reaches: dict[Any, bool] = {}

    def reaches_needed(start: Any) -> bool:
        # iterative depth-first search with memo over the autograd graph below ``start``
        stack = [(start, iter(f for f, _ in start.next_functions if f is not None))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                reaches.setdefault(node, False)
                continue
            if child in nodes or reaches.get(child):
                for n, _ in stack:
                    reaches[n] = True
                return True
            if child not in reaches:
                stack.append((child, iter(f for f, _ in child.next_functions if f is not None)))
        return reaches[start]

    out = []
    for i in needed:
        node = recorder.grad_wrt[i].grad_fn
        if node is None or not reaches_needed(node):
            out.append(i)
    return out
