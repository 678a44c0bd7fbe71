"""The adapter protocol: everything attnx's core asks of one architecture family.

An adapter must answer four questions about a model (the abstract methods of ``Adapter``):

1. ``matches(model)`` -- is this model mine?
2. ``prepare(inputs)`` -- the validated :class:`~attnx.core.batch.Batch` with its token layout
   (prefix tokens, patch grid, padding).
3. ``observe(recorder)`` -- the reversible switches that make the post-softmax attention
   probabilities of every layer observable during a forward, as tensors inside the autograd
   graph (undone on exit, also on exceptions); see :mod:`attnx.adapters.switches`.
4. ``call(batch)`` -- run the model and return its raw output and the logits ``(B, C)`` (or
   ``(B, T, V)`` of a language model).

Everything else the core reads has a default here, which an adapter overrides where its family
differs: ``name``, ``expects``, ``is_lm``, ``outputs_embedding``, ``input_embeddings``,
``watch_tokens``, ``patch_layout``, ``resolve_layout``, ``target_readout``, ``block_inputs``,
``value_projections``, ``mlp_branches``, ``layer_readout`` and ``append_continuation``. The core reads nothing
else of an adapter.

Adapters hold architecture knowledge only; the core types they fill (``Layout``, ``Batch``,
``AttentionRecorder``) live in the attnx core, and they never do explanation math.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from ..core.batch import Batch
from ..core.layer_readout import LayerReadout, rerun_readout
from ..core.layout import Layout
from ..core.recorder import AttentionRecorder
from ..errors import AttnxTypeError, UnsupportedModelError

__all__ = ["Adapter", "block_output", "hidden_states_argument", "mha_value_projection", "missing_methods", "refuse_pooling"]


def hidden_states_argument(args: tuple, kwargs: dict) -> Any:
    """A block's input tokens: its first positional argument, else its ``hidden_states`` keyword."""
    return args[0] if args else kwargs.get("hidden_states")


def block_output(args: tuple, kwargs: dict, output: Any) -> Any:
    """A block's output tokens: its output, or the first element of the tuple it returns."""
    return output[0] if isinstance(output, (tuple, list)) else output


def refuse_pooling(adapter: "Adapter", pooling: str) -> None:
    """Raise unless ``pooling`` is the model's own (the adapters that read no other pooling)."""
    if pooling != "model":
        raise UnsupportedModelError(
            f"adapter {adapter.name!r} reads the layers of {type(adapter.model).__name__} through its own pooling only, "
            f"not pooling={pooling!r} (the LeGrad authors' readout of OpenCLIP, CLIP and timm ViT image towers)"
        )


def mha_value_projection(mha: nn.Module) -> tuple[nn.Module, Callable[[tuple, dict, Any], torch.Tensor], torch.Tensor] | None:
    """An ``nn.MultiheadAttention``'s values (its ``value`` input through the value third of
    ``in_proj``) and its ``out_proj`` weight; ``None`` when its projections are not packed."""
    if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim:
        return None
    D = mha.embed_dim

    def read(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        value = args[2] if len(args) > 2 else kwargs["value"]
        if not mha.batch_first:
            value = value.transpose(0, 1)
        bias = None if mha.in_proj_bias is None else mha.in_proj_bias[2 * D:]
        return torch.nn.functional.linear(value, mha.in_proj_weight[2 * D:], bias)

    return mha, read, mha.out_proj.weight


def missing_methods(cls: type) -> list[str]:
    """The abstract methods of the protocol that ``cls`` does not implement."""
    return sorted(
        name for name in dir(cls) if getattr(getattr(cls, name, None), "__isabstractmethod__", False)
    )


class Adapter:
    """Base class of the architecture adapters.

    Subclasses set ``name`` and implement ``matches``, ``prepare``, ``observe`` and ``call``;
    an adapter made without one of them is refused with :class:`attnx.errors.AttnxTypeError`.
    Register new ones with :func:`attnx.adapters.register_adapter`.

    Attributes
    ----------
    name:
        The adapter's name (``attnx.Explainer(model, adapter=name)``).
    expects:
        What users can pass as ``inputs``, in words, for error messages.
    is_lm:
        Whether the model is a causal language model: targets are tokens (no class names) and
        its logits ``(B, T, V)`` are read at the explained position.
    outputs_embedding:
        Whether the output is an embedding rather than class logits (a dual encoder's tower): with
        no target, attention-only methods read its norm and the others are refused.
    model:
        The explained module.
    """

    name: ClassVar[str] = "base"
    expects: ClassVar[str] = "inputs"
    is_lm: bool = False
    outputs_embedding: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        missing = missing_methods(type(self))
        if missing:
            raise AttnxTypeError(
                f"adapter {type(self).__name__} does not implement {', '.join(missing)} of the adapter protocol "
                "(attnx.adapters.Adapter: matches, prepare, observe and call)"
            )
        self.model = model

    # the four questions -------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this adapter's family (automatic choice)."""

    @abc.abstractmethod
    def prepare(self, inputs: Any) -> Batch:
        """Validate ``inputs`` (raising :class:`attnx.errors.AttnxValueError` /
        :class:`~attnx.errors.AttnxTypeError` naming what was expected) and describe their token layout."""

    @abc.abstractmethod
    def observe(self, recorder: AttentionRecorder) -> contextlib.AbstractContextManager:
        """A context manager making the attention probabilities observable while it is active:
        each layer's ``(B, H, N, N)`` probabilities recorded with ``recorder.record``, in the
        autograd graph; every switch undone on exit."""

    @abc.abstractmethod
    def call(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        """Run the model on ``batch``; return its raw output and the logits."""

    # defaults -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def watch_tokens(self, recorder: AttentionRecorder, images: torch.Tensor | None = None) -> Iterator[None]:
        """Note the token count of every attention call (and the grid of a patch embedding
        applied to ``images``) without changing how anything is computed.

        Only adapters whose ``prepare`` cannot know the layout (``Batch.layout is None``) need
        this; the others have nothing to watch.
        """
        yield

    #: set when a pass on the model's kernel missed a layer (:meth:`observe_kernels`): the adapter's
    #: later passes write the attention out without trying the kernel again
    kernel_calls_missed: bool = False

    def observe_kernels(self, recorder: AttentionRecorder) -> contextlib.AbstractContextManager | None:
        """A context manager leaving the attention to the model's fused kernel, each call recorded
        with ``recorder.record_kernel`` (:mod:`attnx.adapters.fused_kernel`), for a pass that
        folds the layers in the backward; ``None`` (the default) when the adapter cannot, and
        :meth:`observe` is used. Its :meth:`forward_done` raises
        :class:`~attnx.adapters.fused_kernel.KernelCallsMissed` when the calls were not one per layer."""
        return None

    def forward_done(self, recorder: AttentionRecorder) -> None:
        """Called after the explained forward, before its layout is read and before any backward
        (which may run while ``observe`` is still active): the adapter settles what it recorded
        (e.g. takes an attention-pool probe off the layers). Nothing by default."""

    def patch_layout(self, batch: Batch, grid: tuple[int, int]) -> Layout:
        """The layout of ``batch`` from the grid of a patch embedding seen by ``watch_tokens``."""
        return batch.layout

    def resolve_layout(self, batch: Batch, num_tokens: int) -> Layout:
        """The layout of ``batch``, checked against the token count the attention layers saw."""
        if batch.layout.num_tokens != num_tokens:
            raise UnsupportedModelError(
                f"adapter {self.name!r} expected {batch.layout.num_tokens} tokens but the attention "
                f"layers of {type(self.model).__name__} saw {num_tokens}"
            )
        return batch.layout

    def target_readout(self, layout: Layout, targets: torch.Tensor) -> Layout:
        """``layout`` with the readout for the explained classes ``targets`` ``(B,)``, for heads
        whose pooling weighs the token rows differently per class; by default ``layout`` itself."""
        return layout

    def input_embeddings(self) -> nn.Module | None:
        """The module whose output is the first relevance-carrying activation for integer inputs
        (token ids); ``None`` for models whose input is floating point (images)."""
        return None

    def block_inputs(self, batch: Batch) -> list[tuple[nn.Module, Callable[[tuple, dict], Any]]]:
        """The blocks whose attention ``observe`` records for ``batch``, in forward order, each with
        a reader of its input tokens ``(B, N, D)`` from the ``(args, kwargs)`` of its call
        (:func:`hidden_states_argument` for most); methods reading the token representations
        (``Needs.hidden_states``) need it."""
        raise UnsupportedModelError(
            f"adapter {self.name!r} does not name the blocks of {type(self.model).__name__}, so their token "
            "representations cannot be recorded; methods reading them (attcat, bt_t, tokentm) do not apply"
        )

    def value_projections(self, batch: Batch) -> list[tuple[nn.Module, Callable[[tuple, dict, Any], torch.Tensor], torch.Tensor]]:
        """Per block of ``block_inputs``: a module whose call shows the attention's values, a reader
        of the values ``(B, N, H·d)`` of every head from that call's ``(args, kwargs, output)``, and
        the weight ``W_O`` ``(D, H·d)`` of the attention's output projection (methods reading
        ``W_O v_j``, bt_t and tokentm, need it)."""
        raise UnsupportedModelError(
            f"adapter {self.name!r} does not name the value and output projections of {type(self.model).__name__}'s "
            "attention; methods reading them (bt_t, tokentm) do not apply"
        )

    def mlp_branches(self, batch: Batch) -> list[tuple[nn.Module, Callable[[tuple, dict], Any], nn.Module, Callable[[Any], Any]]]:
        """Per block of ``block_inputs``: the module whose call reads the feed-forward sublayer's
        input from the residual stream ``E'`` with its reader of ``(args, kwargs)``, and the module
        whose output is what that sublayer adds to it ``Ẽ'`` with its reader of that output, both
        ``(B, N, D)`` (:func:`attnx.adapters.mlp_branch.named_mlp_branches` for most); methods
        measuring the MLP's token transformation (tokentm) need it."""
        raise UnsupportedModelError(
            f"adapter {self.name!r} does not name the feed-forward sublayers of {type(self.model).__name__}'s "
            "blocks; methods reading them (tokentm) do not apply"
        )

    def layer_readout(self, batch: Batch, pooling: str = "model") -> LayerReadout:
        """How the model's output is read from any layer's tokens for ``batch``: the blocks whose
        outputs are the layers' tokens (one per attention layer, in forward order) and the model's
        own final norm, pooling and head applied to such tokens
        (:class:`attnx.core.layer_readout.LayerReadout`); ``pooling`` other than ``"model"``: another
        pooling before the head (:data:`attnx.core.layer_readout.POOLINGS`). Methods reading the
        score of each layer (LeGrad below the last layer) need it.

        By default, for an adapter that names the blocks (:meth:`block_inputs`): the model's own
        forward run again with the last block's output replaced by layer ``l``'s
        (:func:`~attnx.core.layer_readout.rerun_readout`: exact, one forward per layer read)."""
        try:
            blocks = self.block_inputs(batch)
        except UnsupportedModelError:
            blocks = []
        if not blocks:
            raise UnsupportedModelError(
                f"adapter {self.name!r} cannot read {type(self.model).__name__}'s output from its intermediate layers; "
                "methods reading per-layer readouts do not apply (legrad with start_layer=-1 reads the last layer only)"
            )
        refuse_pooling(self, pooling)
        return rerun_readout(self.call, batch, [(block, block_output) for block, _ in blocks])

    def append_continuation(self, batch: Batch, continuation: list[list[int]]) -> tuple[Batch, Any]:
        """``batch`` with each sample's continuation tokens appended after its prompt, and the
        :class:`attnx.core.targets.BoundContinuation` saying where they are (causal language models)."""
        raise AttnxTypeError(
            f"a continuation target needs a causal language model; adapter {self.name!r} "
            f"({type(self.model).__name__}) has none"
        )
