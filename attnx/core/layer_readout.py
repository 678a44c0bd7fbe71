"""Per-layer readouts: the model's target read from an intermediate layer's tokens.

LeGrad (Bousselham et al. 2024) scores layer ``l`` by ``s^l``, the explained target computed from
layer ``l``'s output tokens through the model's own final norm, pooling and head, and takes the
gradient of ``s^l`` at that layer's attention ``A^l`` only. The adapter says which modules are the
blocks (their outputs are recorded by forward hooks) and how its head reads any layer's tokens
(:meth:`attnx.adapters.base.Adapter.layer_readout`, a :class:`LayerReadout`); this module records
the outputs and runs the short backwards: for each layer from the top down, ``∂s^l/∂A^l`` by
``torch.autograd.grad`` from that layer's readout to its attention, folded (or kept) and released
before the next layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .block_tokens import hooks_removed_on_exit
from .checkpointing import outside_function_modes, recomputing
from .layer_fold import AttentionLayer, KernelCallsMissed, LayerFold, LayerFolder, row_norms
from .layout import Layout, Readout
from .recorder import AttentionRecorder
from .targets import ResolvedTarget, Target, is_callable_target

__all__ = ["LayerReadout", "POOLINGS", "layer_gradients", "recorded_layer_outputs", "rerun_readout"]

#: the poolings a per-layer readout may use: the model's own; the mean of every token (class
#: token included) before the head's norm, as the LeGrad authors read OpenCLIP image towers
POOLINGS = ("model", "mean")

#: reads a block's ``(B, N, D)`` output tokens from the ``(args, kwargs, output)`` of its call
OutputReader = Callable[[tuple, dict, Any], Any]


@dataclass(frozen=True)
class LayerReadout:
    """How an adapter reads its model's output from any layer's tokens.

    Attributes
    ----------
    blocks:
        One ``(block, reader)`` per recorded attention layer, in forward order: the block whose
        output is layer ``l``'s tokens, and a reader of those ``(B, N, D)`` tokens from the
        ``(args, kwargs, output)`` of its call.
    head:
        ``head(tokens)`` -> ``(output, logits)`` as :meth:`~attnx.adapters.base.Adapter.call`
        returns them, computed from layer tokens ``(B, N, D)`` by the model's own final norm,
        pooling and head (a language model's logits may cover the last positions only).
    own:
        Whether ``head`` on the last layer's tokens is the model's own output (checked by the
        pass); ``False`` for another pooling than the model's.
    reruns:
        Whether ``head`` runs the model's whole forward again (:func:`rerun_readout`).
    """

    blocks: Sequence[tuple[nn.Module, OutputReader]]
    head: Callable[[torch.Tensor], tuple[Any, torch.Tensor]]
    own: bool = True
    reruns: bool = False


def rerun_readout(call: Callable[[Any], tuple[Any, torch.Tensor]], batch: Any,
                  blocks: Sequence[tuple[nn.Module, OutputReader]]) -> LayerReadout:
    """Per-layer readouts of a model whose blocks are known but whose head is not: ``head(tokens)``
    runs the model's own forward ``call(batch)`` again with the last block's output tokens
    replaced by ``tokens``, so whatever follows the blocks (final norm, pooling, a user's
    wrapper around the backbone) reads layer ``l``. Exact by construction; costs one forward per
    layer read (LeGrad's default reads two)."""
    last, read = blocks[-1]

    def head(tokens: torch.Tensor) -> tuple[Any, torch.Tensor]:
        def substitute(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return with_tokens(module, output, tokens, read(args, kwargs, output))

        with hooks_removed_on_exit([last.register_forward_hook(substitute, with_kwargs=True)]):
            return call(batch)

    return LayerReadout(blocks, head, reruns=True)


def with_tokens(block: nn.Module, output: Any, tokens: torch.Tensor, read: Any) -> Any:
    """``output`` of ``block`` with its tokens ``read`` (the output itself, or the first element of
    the tuple it returns) replaced by ``tokens``."""
    if read is output:
        return tokens
    if isinstance(output, (tuple, list)) and output and read is output[0]:
        return type(output)((tokens, *output[1:]))
    raise UnsupportedModelError(
        f"block {type(block).__name__} returns its tokens inside a {type(output).__name__}; its output cannot be "
        "replaced by another layer's tokens, so per-layer readouts do not apply"
    )


@contextlib.contextmanager
def recorded_layer_outputs(blocks: Sequence[tuple[nn.Module, OutputReader]], recorder: AttentionRecorder) -> Iterator[None]:
    """Record the output tokens of every block in ``blocks`` in ``recorder.layer_outputs``."""

    def hook(read: OutputReader) -> Callable:
        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if recomputing() or recorder.paused:
                return
            tokens = read(args, kwargs, output)
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
                raise UnsupportedModelError(
                    f"block {type(module).__name__} returned no (B, N, D) tokens; its layer's output cannot be read"
                )
            recorder.layer_outputs.append(tokens)
        return forward_hook

    with hooks_removed_on_exit(block.register_forward_hook(hook(read), with_kwargs=True) for block, read in blocks):
        yield


def layer_gradients(
    recorder: AttentionRecorder,
    readouts: LayerReadout,
    target: Target,
    resolved: ResolvedTarget,
    layout: Layout,
    resolve: Callable[[Target, Any, torch.Tensor, Layout, int], ResolvedTarget],
    first: int,
    fold: LayerFold | None,
    readout: Readout | None,
    tolerance: float,
) -> tuple[list[Any], torch.Tensor | None]:
    """``∂s^l/∂A^l`` of every layer from ``first`` on, each layer's own readout ``s^l`` differentiated
    at its own attention only, from the top layer down; each layer is folded by ``fold`` (or kept
    whole without one) and its attention, gradient and tokens released before the next.

    ``target`` is read at each layer as it was at the model's output: the explained classes of
    ``resolved`` (a layer's own argmax is not the model's prediction), a callable on the layer's
    output. Returns the per-layer results (``None`` below ``first``) and :func:`row_norms` of the
    last layer's gradient (``None`` for another pooling than the model's: its rows are not the head's,
    and the readout is then measured on the model's own target). Raises :class:`UnsupportedModelError` when the adapter's head on the
    last layer's tokens is not the model's output (beyond ``tolerance``)."""
    n = len(recorder.probs)
    if len(recorder.layer_outputs) != n:
        raise UnsupportedModelError(
            f"{len(recorder.layer_outputs)} block outputs were seen for {n} attention layers; the layers' "
            "readouts cannot be paired with their attentions"
        )
    B = resolved.scores.shape[0]
    as_read = target if is_callable_target(target) or resolved.classes is None else resolved.classes
    kept: list[Any] = [None] * n
    last_rows = None
    calls = recorder.kernel_calls
    folder = None
    if calls:  # the attention left to the model's kernel (only for a fold): each call's backward folds its layer
        folder = LayerFolder(fold, readout, first, n)
        for call in calls:
            call.input_gradients = False  # each backward ends at its own layer's attention
    for i in range(n - 1, first - 1, -1):
        with recorder.pausing():
            output, logits = readouts.head(recorder.layer_outputs[i])
        with outside_function_modes():  # the target's own ops are not the model's
            at = resolve(as_read, output, logits, layout, B)
            scores = at.scores
            if i == n - 1 and readouts.own:
                difference = float((at.logits.detach() - resolved.logits.detach()).abs().max())
                if difference > tolerance:
                    raise UnsupportedModelError(
                        f"the adapter's readout of the last layer differs from the model's output by {difference:.2g}; "
                        "its per-layer readouts would not be its head's"
                    )
            wrt = recorder.grad_wrt[i]
            if folder is not None:
                calls[i].folder = folder
                try:
                    if scores.requires_grad:
                        torch.autograd.grad(scores.sum(), wrt, allow_unused=True)
                finally:
                    calls[i].folder = None
                if not calls[i].folded:  # off the layer's readout: its A is not kept to fold it with a zero gradient
                    raise KernelCallsMissed(f"layer {i}'s readout does not reach its attention")
                kept[i] = folder.folded[i]
                if i == n - 1 and readouts.own:
                    last_rows = folder.last_rows
                del output, logits, at, scores
                recorder.grad_wrt[i] = recorder.layer_outputs[i] = recorder.probs[i] = None
                continue
            if scores.requires_grad and wrt.requires_grad:
                (g,) = torch.autograd.grad(scores.sum(), wrt, allow_unused=True)
            else:
                g = None
        probs = recorder.probs[i]
        g = torch.zeros_like(probs) if g is None else g.detach().reshape(probs.shape)
        if i == n - 1 and readouts.own:  # another pooling reads other rows than the model's head
            last_rows = row_norms(g)
        kept[i] = g if fold is None else fold(AttentionLayer(i, n, probs.detach(), g, readout))
        del output, logits, at, scores, g, probs
        recorder.grad_wrt[i] = recorder.layer_outputs[i] = None  # released; A too once folded
        if fold is not None:
            recorder.probs[i] = None
    return kept, last_rows
