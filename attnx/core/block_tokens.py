"""The tokens every block reads: forward pre-hooks on the blocks an adapter names.

A method that reads the token representations (``Needs.hidden_states``) gets each block's input
``h^l`` ``(B, N, D)`` -- the residual stream before the block's first norm, the output of the block
below (of the embeddings for the first) -- and ``∂y_t/∂h^l`` from the same backward as ``dy_t/dA``.
The adapter says which modules are the blocks and how to read their tokens
(:meth:`attnx.adapters.base.Adapter.block_inputs`); the hooks are removed on exit, also on errors.
A method may also read each block's values through the attention's output projection, ``W_O v_j``
(:meth:`attnx.adapters.base.Adapter.value_projections`), and what each block's feed-forward sublayer
reads from the residual stream and adds to it (:meth:`attnx.adapters.base.Adapter.mlp_branches`),
recorded detached.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .checkpointing import recomputing
from .layout import Layout
from .recorder import AttentionRecorder

__all__ = ["check_block_tokens", "hooks_removed_on_exit", "recorded_block_tokens", "recorded_mlp_branches",
           "recorded_value_outputs"]

#: reads a block's ``(B, N, D)`` input tokens from the ``(args, kwargs)`` of its call
TokenReader = Callable[[tuple, dict], Any]


@contextlib.contextmanager
def hooks_removed_on_exit(handles: Iterable[Any]) -> Iterator[None]:
    """Register the hooks whose handles ``handles`` yields and remove every one on exit; the
    handles are taken one by one, so an error while registering removes those already made."""
    with contextlib.ExitStack() as stack:
        for handle in handles:
            stack.callback(handle.remove)
        yield


@contextlib.contextmanager
def recorded_block_tokens(blocks: Sequence[tuple[nn.Module, TokenReader]], recorder: AttentionRecorder) -> Iterator[None]:
    """Record the input tokens of every block in ``blocks`` with ``recorder.record_tokens``."""

    def hook(read: TokenReader) -> Callable:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            tokens = read(args, kwargs)
            if not isinstance(tokens, torch.Tensor):
                raise UnsupportedModelError(
                    f"block {type(module).__name__} was called without its tokens as a tensor; its token "
                    "representations cannot be recorded"
                )
            recorder.record_tokens(tokens)
        return pre_hook

    with hooks_removed_on_exit(block.register_forward_pre_hook(hook(read), with_kwargs=True) for block, read in blocks):
        yield


@contextlib.contextmanager
def recorded_value_outputs(projections: Sequence[tuple[nn.Module, Callable, torch.Tensor]], recorder: AttentionRecorder) -> Iterator[None]:
    """Record ``W_O v_j`` ``(B, N, D)`` (no bias) of every block, from the output of its value module."""

    def hook(read: Callable, weight: torch.Tensor) -> Callable:
        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if recomputing() or recorder.paused:  # recorded in the forward (a recomputation or a readout run again)
                return
            values = read(args, kwargs, output).detach()
            recorder.value_outputs.append(values @ weight.detach().to(values.dtype).T)
        return forward_hook

    with hooks_removed_on_exit(module.register_forward_hook(hook(read, weight), with_kwargs=True)
                               for module, read, weight in projections):
        yield


@contextlib.contextmanager
def recorded_mlp_branches(branches: Sequence[tuple[nn.Module, Callable, nn.Module, Callable]], recorder: AttentionRecorder) -> Iterator[None]:
    """Record every block's feed-forward input ``E'`` and branch output ``Ẽ'`` ``(B, N, D)``, detached."""

    def tensor(module: nn.Module, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise UnsupportedModelError(
                f"{type(module).__name__} did not show its feed-forward tokens as a tensor; methods reading them (tokentm) do not apply"
            )
        return value.detach()

    def pre_hook(read: Callable) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not (recomputing() or recorder.paused):
                recorder.mlp_inputs.append(tensor(module, read(args, kwargs)))
        return hook

    def post_hook(read: Callable) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not (recomputing() or recorder.paused):
                recorder.mlp_outputs.append(tensor(module, read(output)))
        return hook

    with hooks_removed_on_exit(handle for into, read_in, out_of, read_out in branches
                               for handle in (into.register_forward_pre_hook(pre_hook(read_in), with_kwargs=True),
                                              out_of.register_forward_hook(post_hook(read_out)))):
        yield


def check_block_tokens(recorder: AttentionRecorder, layout: Layout, batch_size: int, model: nn.Module) -> None:
    """The recorded tokens must be one ``(B, N, D)`` tensor per attention layer, over the layout's tokens."""
    name = type(model).__name__
    if recorder.probs and len(recorder.tokens) != len(recorder.probs):
        raise UnsupportedModelError(
            f"{name}: {len(recorder.tokens)} blocks were seen for {len(recorder.probs)} attention layers; "
            "its token representations cannot be paired with its attentions"
        )
    if recorder.value_outputs and len(recorder.value_outputs) != len(recorder.tokens):
        raise UnsupportedModelError(
            f"{name}: {len(recorder.value_outputs)} value projections were seen for {len(recorder.tokens)} blocks"
        )
    for kind in (recorder.mlp_inputs, recorder.mlp_outputs):
        if kind and len(kind) != len(recorder.tokens):
            raise UnsupportedModelError(
                f"{name}: {len(kind)} feed-forward sublayers were seen for {len(recorder.tokens)} blocks; "
                "methods reading them (tokentm) do not apply"
            )
    for t in [*recorder.tokens, *recorder.value_outputs, *recorder.mlp_inputs, *recorder.mlp_outputs]:
        if tuple(t.shape[:2]) != (batch_size, layout.num_tokens):
            raise UnsupportedModelError(
                f"{name}: a block read tokens of shape {tuple(t.shape)}, expected ({batch_size}, {layout.num_tokens}, D)"
            )
