"""Gradient checkpointing kept on while explaining: the layers recompute, attnx records once.

A user who switched on gradient checkpointing (Hugging Face ``gradient_checkpointing_enable()``,
timm ``set_grad_checkpointing()``) cannot afford every layer's activations. Hugging Face layers
checkpoint in training mode only, and a re-entrant checkpoint runs the first forward without a
graph (so no gradient reaches the attention probabilities). For the call, attnx therefore runs the
same layers through its own non-re-entrant :func:`torch.utils.checkpoint.checkpoint`, in eval mode:
the forward keeps only each layer's inputs (and what the method itself holds: the probabilities it
reads), and the backward recomputes a layer when it reaches it.

The recomputation runs under the same switches, hooks and LRP rules as the first forward (so it
computes the same tensors, as the checkpoint requires), with :func:`recomputing` true: attention
recorders and other one-per-forward bookkeeping skip it, so every attention is recorded, and
every rule applied to the relevance, once.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed", "outside_function_modes", "recomputing"]

_state = threading.local()


def recomputing() -> bool:
    """Whether the current thread is recomputing a checkpointed layer inside a backward."""
    return getattr(_state, "depth", 0) > 0


def _function_modes() -> list[Any]:
    """The thread's torch-function modes (the LRP engine, the intercepting adapter), outermost first."""
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]


@contextlib.contextmanager
def outside_function_modes() -> Iterator[None]:
    """Run a backward without the forward's torch-function modes: the ops of the rules' own
    backwards must not be intercepted as forward ops. A recomputation puts them back."""
    modes = []
    try:
        while torch._C._len_torch_function_stack():
            modes.append(torch._C._pop_torch_function_stack())
        yield
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


class _Recomputation:
    """Around a recomputation (re-entered by every backward on a retained graph): the forward's
    torch-function modes back on, and :func:`recomputing` true."""

    def __init__(self, modes: list[Any]) -> None:
        self.modes = modes
        self.outside: list[contextlib.AbstractContextManager] = []

    def __enter__(self) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1
        outside = outside_function_modes()
        outside.__enter__()
        self.outside.append(outside)
        for mode in self.modes:
            torch._C._push_on_torch_function_stack(mode)

    def __exit__(self, *exc: Any) -> None:
        for _ in self.modes:
            torch._C._pop_torch_function_stack()
        self.outside.pop().__exit__(*exc)
        _state.depth -= 1


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``checkpoint``'s ``context_fn``, called in the forward: nothing around the forward; around the
    recomputation, the forward's torch-function modes and :func:`recomputing`."""
    return contextlib.nullcontext(), _Recomputation(_function_modes())


def _checkpointed_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


@contextlib.contextmanager
def checkpointed(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Run each of ``layers``' ``forward`` under a non-re-entrant checkpoint for the call.

    The module hooks stay outside the checkpoint (as in Hugging Face's own checkpointing): the
    ``forward`` attribute is wrapped, not the call. Each module's own ``forward`` attribute (e.g.
    one ``accelerate`` set) is put back on exit.
    """
    saved: list[tuple[nn.Module, bool, Any]] = []
    try:
        for m in layers:
            own = "forward" in m.__dict__
            saved.append((m, own, m.__dict__.get("forward")))
            m.forward = functools.partial(_checkpointed_forward, m.forward)
        yield
    finally:
        for m, own, forward in reversed(saved):
            if own:
                m.forward = forward
            else:
                del m.forward
