"""The attention recorder: what adapters fill during a forward, and what gradients are taken of."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import AttnxValueError
from .checkpointing import outside_function_modes, recomputing
from .layer_fold import KernelCallsMissed

__all__ = ["AttentionRecorder"]


class AttentionRecorder:
    """Collects the attention probabilities of one forward pass, in call order.

    Each entry holds the probabilities ``A`` as ``(B, H, N, N)`` and the tensor to differentiate
    the target with respect to (usually ``A`` itself; for ``nn.MultiheadAttention`` the head-flat
    ``(B*H, N, N)`` tensor that the attention product actually consumed). Adapters that only
    watch the attention kernels (to learn the token count, without exposing ``A``) call
    :meth:`saw_tokens`.

    Parameters
    ----------
    batch_size:
        The number of samples of the forward, when known: attention probabilities written out
        with the heads folded into the batch axis (``(B*H, N, N)``, as ``torch.bmm`` needs them)
        are recorded as ``(B, H, N, N)`` with it.
    """

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size
        self.probs: list[torch.Tensor] = []
        self.grad_wrt: list[torch.Tensor] = []
        self.token_counts: list[int] = []
        self.patch_grids: list[tuple[int, int]] = []
        #: the input tokens ``h^l`` ``(B, N, D)`` of every block, when the pass records them
        self.tokens: list[torch.Tensor] = []
        #: ``W_O v_j`` ``(B, N, D)`` of every block (values through the output projection), when recorded
        self.value_outputs: list[torch.Tensor] = []
        #: the tokens ``E'`` each block's feed-forward sublayer reads and what it adds ``Ẽ'``, when recorded
        self.mlp_inputs: list[torch.Tensor] = []
        self.mlp_outputs: list[torch.Tensor] = []
        #: the output tokens ``(B, N, D)`` of every block, when the pass reads per-layer readouts
        self.layer_outputs: list[torch.Tensor | None] = []
        #: the attention calls left to the model's fused kernel (:mod:`attnx.adapters.fused_kernel`),
        #: in call order; when any, ``probs`` holds zero-stride placeholders of their shapes and
        #: ``grad_wrt`` the scalar probes whose gradients make a backward reach each call
        self.kernel_calls: list = []
        #: a pass without a backward that folds its layers: each kernel call's ``A`` is computed in
        #: the forward and handed to this folder (:func:`attnx.core.layer_fold.forward_folder`)
        self.forward_folder: object | None = None
        #: while set, nothing is recorded (a head run again on a layer's tokens is not the forward)
        self.paused = False

    @contextlib.contextmanager
    def pausing(self) -> Iterator[None]:
        """Record nothing while active (a per-layer readout runs the model's head again)."""
        self.paused, before = True, self.paused
        try:
            yield
        finally:
            self.paused = before

    def record(self, probs: torch.Tensor, grad_wrt: torch.Tensor | None = None) -> None:
        if recomputing() or self.paused:  # a checkpointed layer recomputed by the backward: recorded in the forward
            return
        if probs.dim() != 4:
            raise AttnxValueError(f"attention probabilities must be (B, H, N, N), got shape {tuple(probs.shape)}")
        if self.kernel_calls:  # the pass runs again with every attention written out
            raise KernelCallsMissed("attention written out beside attention left to its kernel")
        self.probs.append(probs)
        self.grad_wrt.append(probs if grad_wrt is None else grad_wrt)
        self.token_counts.append(int(probs.shape[-1]))

    def record_kernel(self, call: object, probe: torch.Tensor, shape: tuple[int, int, int, int]) -> None:
        """Record an attention call whose probabilities ``shape`` ``(B, H, Nq, Nk)`` are recomputed
        in the backward (a :class:`~attnx.adapters.fused_kernel.KernelCall`); ``probe`` is its scalar probe."""
        if recomputing() or self.paused:
            return
        if self.probs and not self.kernel_calls:  # the pass runs again with every attention written out
            raise KernelCallsMissed("attention left to its kernel beside attention written out")
        self.kernel_calls.append(call)
        self.probs.append(probe.detach().expand(shape))
        self.grad_wrt.append(probe)
        self.token_counts.append(int(shape[-1]))

    def record_tokens(self, tokens: torch.Tensor) -> None:
        """Record the ``(B, N, D)`` tokens a block reads (its input ``h^l``)."""
        if recomputing() or self.paused:  # a checkpointed layer recomputed by the backward: recorded in the forward
            return
        if tokens.dim() != 3:
            raise AttnxValueError(f"a block's tokens must be (B, N, D), got shape {tuple(tokens.shape)}")
        self.tokens.append(tokens)

    def saw_tokens(self, num_tokens: int) -> None:
        """Note an attention call over ``num_tokens`` tokens whose probabilities stay hidden."""
        if recomputing() or self.paused:
            return
        self.token_counts.append(int(num_tokens))

    def saw_patch_grid(self, grid: tuple[int, int]) -> None:
        """Note the output grid of a patch embedding applied to the input images."""
        if self.paused:
            return
        self.patch_grids.append((int(grid[0]), int(grid[1])))

    def __len__(self) -> int:
        return len(self.probs)

    def gradients(self, score: torch.Tensor, retain_graph: bool = False, first: int = 0) -> list[torch.Tensor | None]:
        """``d score / d A`` for every recorded layer from ``first`` on, shaped like the probabilities
        (``None`` below ``first``: the backward stops there); ``retain_graph``: keep the graph for
        another backward on the same forward."""
        return self.all_gradients(score, retain_graph, first, tokens=False)[0]

    def all_gradients(
        self, score: torch.Tensor, retain_graph: bool = False, first: int = 0, attentions: bool = True, tokens: bool = True,
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """``(d score / d A, d score / d h)`` from one backward: of the attention probabilities
        (``attentions``) and of the recorded block tokens (``tokens``), each a list over the layers
        (empty when not asked for; ``None`` below ``first``)."""
        groups = [(self.probs, self.grad_wrt) if attentions else ([], []), (self.tokens, self.tokens) if tokens else ([], [])]
        needs = [[i >= first and t.requires_grad for i, t in enumerate(wrt)] for _, wrt in groups]
        if not any(any(n) for n in needs):
            raise RuntimeError(
                "the recorded attention probabilities and tokens are not part of an autograd graph; "
                "was the forward run under torch.no_grad() or torch.inference_mode()?"
            )
        wrt = [t for (_, w), n in zip(groups, needs) for t, k in zip(w, n) if k]
        with outside_function_modes():  # the backward's own ops are not the forward's
            grads = iter(torch.autograd.grad(score, wrt, allow_unused=True, retain_graph=retain_graph))
        out: tuple[list, list] = ([], [])
        for (shaped, _), n, result in zip(groups, needs, out):
            for i, (like, k) in enumerate(zip(shaped, n)):
                g = next(grads) if k else None
                result.append(None if i < first else torch.zeros_like(like) if g is None else g.reshape(like.shape))
        return out
