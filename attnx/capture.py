"""One forward under an adapter: attention probabilities per layer, logits, and dy_t/dA."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .adapters import Adapter, AttentionRecorder, Batch, Layout, UnsupportedModelError, adapter_names
from .targets import Target, resolve_targets

__all__ = ["Captured", "capture", "evaluation_mode"]


@dataclass
class Captured:
    """What one explained forward pass produced.

    Attributes
    ----------
    attentions:
        Post-softmax attention of every layer in forward order, each ``(B, H, N, N)``.
    gradients:
        ``∂y_t/∂A`` for each layer (same shapes), or ``None`` when not requested.
    logits:
        ``(B, C)`` logits, detached.
    targets:
        ``(B,)`` explained class per sample, or ``None`` for a callable target.
    layout:
        The token layout of the batch.
    output:
        The raw model output (detached where it is a tensor).
    """

    attentions: list[torch.Tensor]
    gradients: list[torch.Tensor] | None
    logits: torch.Tensor
    targets: torch.Tensor | None
    layout: Layout
    output: Any = None


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each module's own ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def tracked_embeddings(module: nn.Module | None) -> Iterator[None]:
    """Make the output of ``module`` require grad (so a frozen model still has a graph)."""
    if module is None:
        yield
        return

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
            return output.detach().requires_grad_(True)
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def with_tracked_inputs(batch: Batch) -> Batch:
    """A copy of ``batch`` whose floating point inputs are leaves that require grad."""

    def track(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().requires_grad_(True)
        return v

    return Batch(
        args=tuple(track(a) for a in batch.args),
        kwargs={k: track(v) for k, v in batch.kwargs.items()},
        batch_size=batch.batch_size,
        layout=batch.layout,
        device=batch.device,
        extra=batch.extra,
    )


def check_attentions(adapter: Adapter, recorder: AttentionRecorder, batch_size: int) -> int:
    """Check the recorded attentions form one (B, H, N, N) stack; return N."""
    if len(recorder) == 0:
        raise UnsupportedModelError(
            f"no attention was observed in {type(adapter.model).__name__} with adapter "
            f"{adapter.name!r}; attnx has adapters {adapter_names()} (the 'generic' one intercepts "
            "F.scaled_dot_product_attention and F.multi_head_attention_forward). Register an "
            "adapter for this model with attnx.adapters.register_adapter."
        )
    shapes = {tuple(a.shape[-2:]) for a in recorder.probs}
    batches = {a.shape[0] for a in recorder.probs}
    if len(shapes) != 1 or batches != {batch_size} or any(s[0] != s[1] for s in shapes):
        raise UnsupportedModelError(
            f"the attention layers of {type(adapter.model).__name__} are not one stack of global "
            f"self-attentions over {batch_size} samples (token shapes {sorted(shapes)}, leading "
            f"sizes {sorted(batches)}); attention methods need global self-attention (windowed or "
            "hierarchical models such as Swin are not supported by them)"
        )
    return shapes.pop()[0]


def capture(adapter: Adapter, batch: Batch, target: Target = None, gradients: bool = False) -> Captured:
    """Run one forward of ``adapter.model`` on ``batch`` recording attentions (and ``∂y_t/∂A``).

    The model is put in eval mode for the call and restored afterwards; gradients are taken with
    ``torch.autograd.grad`` so no ``.grad`` is left on parameters.
    """
    recorder = AttentionRecorder()
    model = adapter.model
    grad_mode = torch.enable_grad() if gradients else torch.no_grad()
    if gradients:
        batch = with_tracked_inputs(batch)
    with evaluation_mode(model), grad_mode:
        with tracked_embeddings(adapter.input_embeddings() if gradients else None), adapter.observe(recorder):
            output, logits = adapter.call(batch)
        num_tokens = check_attentions(adapter, recorder, batch.batch_size)
        layout = adapter.resolve_layout(batch, num_tokens)
        scores, classes = resolve_targets(target, output, logits)
        grads = recorder.gradients(scores.sum()) if gradients else None
    detached = output.detach() if isinstance(output, torch.Tensor) else None  # keep no graph alive
    return Captured(
        attentions=[a.detach() for a in recorder.probs],
        gradients=None if grads is None else [g.detach() for g in grads],
        logits=logits.detach(),
        targets=classes,
        layout=layout,
        output=detached,
    )
