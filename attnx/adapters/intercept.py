"""The fallback adapter for models nobody wrote an adapter for: it intercepts attention.

Any model whose attention runs through ``F.scaled_dot_product_attention`` or
``nn.MultiheadAttention``, or is written out as a softmax over the keys whose output is
multiplied with the values (``attn.softmax(-1) @ v``, ``torch.bmm``, ``torch.einsum``), is
explained by observing those calls (see :mod:`attnx.adapters.kernels`). The token layout comes
from a family adapter when one matches, else from the inputs: image grids from the token count
the attention sees, text from the attention mask.

The readout (the rows the head reads) is the family adapter's; else the pooling a timm ViT-like
model inside the wrapper declares (:class:`attnx.adapters.pooling.TimmPooling`); else an
attention-pool probe seen as the last attention call (one query set over the tokens of the
layers before it); else it is left undeclared and measured before use (:mod:`attnx.core.readout`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..core.batch import Batch, check_image_batch, check_text_inputs
from ..core.layer_fold import KernelCallsMissed
from ..core.layout import Layout, infer_image_layout
from ..core.model_output import logits_of
from ..core.recorder import AttentionRecorder
from .base import Adapter
from .kernels import AttentionInterceptor, KernelInterceptor, TokenWatcher
from .pooling import TimmPooling, probe_weights


def wrapped_input_embeddings(model: nn.Module) -> nn.Module | None:
    """The token embeddings of ``model``, or of the first Hugging Face model inside it (a user's
    wrapper module around a text model)."""
    for m in model.modules():
        get = getattr(m, "get_input_embeddings", None)
        if callable(get):
            try:
                found = get()
            except (NotImplementedError, AttributeError):
                continue
            # token embeddings only: a vision model's "input embeddings" are its patch embedding,
            # whose output has no prefix tokens; image relevance is taken at the pixels
            if isinstance(found, nn.Embedding):
                return found
    return None


class InterceptAdapter(Adapter):
    """Fallback adapter for any model whose attention goes through SDPA, ``nn.MultiheadAttention``
    or a written-out softmax over the keys multiplied with the values.

    Parameters
    ----------
    model:
        The model.
    layout_from:
        An adapter of the model's family that knows its token layout; without one, the layout
        is inferred (image grids from the token count, text from the attention mask).
    blocks_from:
        Without ``layout_from``: the adapter of the one known model inside a wrapper (a user's
        module around a timm or Hugging Face backbone), which names its blocks, value and
        feed-forward projections for the methods that read them; the layout, readout and
        per-layer readouts stay the wrapper's own (:meth:`layer_readout` runs the wrapper again).
    """

    name = "intercept"
    expects = "an image batch tensor (B, C, H, W) or the dict a Hugging Face tokenizer returns"

    def __init__(self, model: nn.Module, layout_from: Adapter | None = None, blocks_from: Adapter | None = None) -> None:
        super().__init__(model)
        self.family = layout_from
        self.blocks_from = layout_from or blocks_from
        #: the pooling a timm ViT-like model (maybe inside a wrapper) declares, if any
        self.pooling = TimmPooling.find(model)
        #: the head-averaged attention of an attention-pool probe seen in the last forward
        self.probe: torch.Tensor | None = None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True

    def prepare(self, inputs: Any) -> Batch:
        if self.family is not None:
            return self.family.prepare(inputs)
        if isinstance(inputs, Mapping):
            kwargs = check_text_inputs(inputs)
            ids = kwargs["input_ids"]
            mask = kwargs.get("attention_mask")
            layout = Layout(ids.shape[1], 0, 0, valid=None if mask is None else mask.bool())
            return Batch((), kwargs, ids.shape[0], layout, ids.device)
        x = check_image_batch(inputs, None)
        return Batch((x,), {}, x.shape[0], None, x.device)  # layout inferred after the forward

    def resolve_layout(self, batch: Batch, num_tokens: int) -> Layout:
        if batch.layout is None:
            prefix = None if self.pooling is None else self.pooling.prefix_tokens
            batch.layout = infer_image_layout(batch.args[0], num_tokens, prefix)
            if self.pooling is not None:
                self.pooling.apply(batch.layout)
        layout = super().resolve_layout(batch, num_tokens)
        if self.pooling is not None and layout.grid is not None:
            return self.pooling.complete(layout)
        if self.probe is not None and not layout.readout_declared and self.probe.shape[-1] == num_tokens:
            layout.readout, layout.readout_name, layout.readout_declared = self.probe, "probe attention (attention-pool head)", True
        return layout

    def patch_layout(self, batch: Batch, grid: tuple[int, int]) -> Layout:
        """The layout of an image model whose attention was not seen, from its patch embedding."""
        if batch.layout is None:
            batch.layout = Layout.for_image(batch.args[0], grid, prefix_tokens=0, readout=None, readout_declared=False)
        return batch.layout

    def input_embeddings(self) -> nn.Module | None:
        if self.family is not None:
            return self.family.input_embeddings()
        return wrapped_input_embeddings(self.model)

    def append_continuation(self, batch: Batch, continuation: list[list[int]]) -> tuple[Batch, Any]:
        if self.family is not None:
            return self.family.append_continuation(batch, continuation)
        return super().append_continuation(batch, continuation)

    def block_inputs(self, batch: Batch) -> list:
        """The family adapter's blocks, or those of the known model inside a wrapper (the same
        modules, whichever kernels are intercepted)."""
        if self.blocks_from is not None:
            return self.blocks_from.block_inputs(batch)
        return super().block_inputs(batch)

    def layer_readout(self, batch: Batch, pooling: str = "model") -> Any:
        """The family adapter's per-layer readouts (the same blocks and head); in a wrapper, the
        wrapper's own forward run again from each layer (:meth:`Adapter.layer_readout`)."""
        if self.family is not None:
            return self.family.layer_readout(batch, pooling)
        return super().layer_readout(batch, pooling)

    def value_projections(self, batch: Batch) -> list:
        if self.blocks_from is not None:
            return self.blocks_from.value_projections(batch)
        return super().value_projections(batch)

    def mlp_branches(self, batch: Batch) -> list:
        if self.blocks_from is not None:
            return self.blocks_from.mlp_branches(batch)
        return super().mlp_branches(batch)

    def observe(self, recorder: AttentionRecorder) -> contextlib.AbstractContextManager:
        return self._intercepted(AttentionInterceptor(recorder))

    def observe_kernels(self, recorder: AttentionRecorder) -> contextlib.AbstractContextManager | None:
        """SDPA calls left to the kernel for a pass that folds the layers (:class:`KernelInterceptor`),
        unless the head is an attention pool (its probe's probabilities are read in the forward)."""
        if self.pooling is not None and self.pooling.attn_pool is not None:
            return None
        return self._intercepted(KernelInterceptor(recorder))

    @contextlib.contextmanager
    def _intercepted(self, mode: AttentionInterceptor) -> Iterator[None]:
        capture = contextlib.nullcontext() if self.pooling is None else self.pooling.capture()
        self.probe = None
        with mode, capture:
            yield

    def forward_done(self, recorder: AttentionRecorder) -> None:
        if recorder.kernel_calls:
            # every call one square (N, N) layer of the same N: a pooling probe (few queries) is read
            # in the forward, so such a model is explained with its attention written out
            if len({tuple(p.shape[-2:]) for p in recorder.probs}) != 1 or recorder.probs[0].shape[-2] != recorder.probs[0].shape[-1]:
                raise KernelCallsMissed("kernel calls of several shapes")
            return
        # a pooling probe is the head's, not a layer: off the layers before the layout and the backward
        self.probe = take_probe(recorder)

    @contextlib.contextmanager
    def watch_tokens(self, recorder: AttentionRecorder, images: torch.Tensor | None = None) -> Iterator[None]:
        size = None if images is None or images.dim() != 4 else tuple(images.shape[-2:])
        with TokenWatcher(recorder, size):
            yield

    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        if self.family is not None:
            return self.family.call(batch)
        out = self.model(*batch.args, **batch.kwargs)
        return out, logits_of(out)


def take_probe(recorder: AttentionRecorder) -> torch.Tensor | None:
    """Remove an attention-pool probe from ``recorder`` and return its :func:`probe_weights`.

    A probe is one last attention call whose few queries attend over (some of) the ``N`` tokens
    of the self-attention layers before it (``(B, H, Q, M)`` with ``Q < M <= N`` after
    ``(B, H, N, N)`` layers): a pooling head, not a layer of the token stack.
    """
    probs = recorder.probs
    if len(probs) < 2:
        return None
    last, before = probs[-1], probs[-2]
    n = before.shape[-1]
    if before.shape[-2] != n or last.shape[-1] > n or last.shape[-2] >= last.shape[-1]:
        return None
    if len(probs) > 2 and probs[-3].shape[-2] != probs[-3].shape[-1]:
        return None  # several non-square calls: not one pooling probe
    recorder.probs.pop()
    recorder.grad_wrt.pop()
    recorder.token_counts.pop()
    return probe_weights(last)
