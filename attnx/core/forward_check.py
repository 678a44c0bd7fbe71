"""The explained forward is the model's forward: checked, not assumed.

Making attention observable changes how a model runs: a Hugging Face model is switched to its
``eager`` kernel, timm attention to its explicit path, SDPA calls are written out. Those paths are
meant to compute the same function, but need not: Falcon's eager path with attention outputs
attends to future tokens, and a kernel a user registered with ``AttentionInterface`` is not
eager's. An explanation of another function than the model's is a silent wrong answer.

The check compares the logits of the explained pass, at the explained positions, with those of
one plain forward of the model (no switches, hooks or modes of attnx; eval mode; under
``torch.no_grad()``; in the same dtype as the explained pass). They must agree to
:func:`tolerance`. Its cost is one forward without gradients. The :class:`~attnx.Explainer` runs it
on the first call for each adapter and input signature (:func:`input_signature`) and remembers
the result; ``check_forward="always"`` runs it on every call, ``"never"`` turns it off.

The same plain forward shows whether the model's output is an embedding rather than class logits
(:func:`last_parametrised_leaf`): the last module with weights to run is a normalisation layer.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..adapters.switches import no_new_forward_hooks, plain_execution
from ..errors import AttnxValueError
from .batch import Batch

__all__ = [
    "CHECK_MODES",
    "ModelForward",
    "NORMALISATIONS",
    "input_signature",
    "model_forward",
    "tolerance",
]

#: when the check runs: on the first call per adapter and input signature, on every call, or never
CHECK_MODES = ("once", "always", "never")

#: layers whose output is a normalised embedding, not logits, when they are the last to run
NORMALISATIONS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


def check_mode(mode: Any) -> str:
    """``mode`` validated against :data:`CHECK_MODES` (``True`` / ``False`` mean once / never)."""
    if mode is True:
        return "once"
    if mode is False:
        return "never"
    if mode not in CHECK_MODES:
        raise AttnxValueError(f"check_forward must be one of {list(CHECK_MODES)} (or True / False), got {mode!r}")
    return mode


def input_signature(batch: Batch) -> tuple:
    """What decides which path a model takes, without the sizes: the names, dtypes and number of
    dimensions of the input tensors, and whether some tokens are padding (masked attention)."""

    def describe(v: Any) -> Any:
        return (str(v.dtype), v.dim()) if isinstance(v, torch.Tensor) else type(v).__name__

    mask = batch.kwargs.get("attention_mask")
    padded = isinstance(mask, torch.Tensor) and bool((mask == 0).any())
    return (
        tuple(describe(a) for a in batch.args),
        tuple(sorted((k, describe(v)) for k, v in batch.kwargs.items())),
        padded,
    )


def tolerance(reference: torch.Tensor) -> float:
    """How far the explained logits may be from the model's: rounding of a reordered sum
    (``1e-4`` of the logits' scale in float32; ``1e-6`` in float64, where Hugging Face's eager
    kernels still take the softmax in float32; 8 units of rounding of the logits' scale in
    float16 / bfloat16, where a model computed in its own precision rounds every layer's sums)."""
    scale = 1.0 + float(reference.detach().abs().amax()) if reference.numel() else 1.0
    if reference.dtype in (torch.float16, torch.bfloat16):
        return 8 * torch.finfo(reference.dtype).eps * scale
    return (1e-6 if reference.dtype == torch.float64 else 1e-4) * scale


def is_leaf_with_weights(module: nn.Module) -> bool:
    return not any(True for _ in module.children()) and any(True for _ in module.parameters(recurse=False))


@contextlib.contextmanager
def last_parametrised_leaf(model: nn.Module, seen: list) -> Iterator[None]:
    """Note in ``seen`` (one element) the last leaf module with weights whose forward finished."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        seen[:] = [module]

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_leaf_with_weights(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class ModelForward:
    """What one plain forward of the model gave.

    Attributes
    ----------
    logits:
        ``(B, C)`` the model's own logits at the explained positions.
    last_layer:
        The last module with weights that ran (``None`` if none did).
    pooled_output:
        Whether the output has a ``pooler_output`` and no ``logits``.
    """

    def __init__(self, logits: torch.Tensor, last_layer: nn.Module | None, pooled_output: bool = False) -> None:
        self.logits = logits
        self.last_layer = last_layer
        self.pooled_output = pooled_output

    @property
    def is_embedding(self) -> bool:
        """Whether the output is an embedding: the last layer with weights is a normalisation, or
        the output has a ``pooler_output`` and no logits (a Hugging Face backbone)."""
        return self.pooled_output or isinstance(self.last_layer, NORMALISATIONS)

    def difference(self, explained: torch.Tensor) -> float:
        """The largest absolute difference between ``explained`` and the model's logits."""
        if explained.shape != self.logits.shape:
            return float("inf")
        return float((explained.detach().to(self.logits) - self.logits).abs().amax()) if explained.numel() else 0.0

    def agrees(self, explained: torch.Tensor) -> bool:
        """Whether ``explained`` equals the model's logits to :func:`tolerance`."""
        return self.difference(explained) <= tolerance(self.logits)


def model_forward(adapter: Any, batch: Batch, read: Any) -> ModelForward:
    """One plain forward of ``adapter.model`` on ``batch`` (no gradients, none of attnx's
    switches), its logits read by ``read(output, logits) -> (B, C)`` at the explained positions.
    Call it where the explained pass ran (same dtype and device context, in eval mode)."""
    model = adapter.model
    seen: list = []
    with torch.no_grad(), no_new_forward_hooks(model), plain_execution(model):
        with last_parametrised_leaf(model, seen):
            output, logits = adapter.call(batch)
        at = read(output, logits)
    pooled = getattr(output, "logits", None) is None and isinstance(getattr(output, "pooler_output", None), torch.Tensor)
    return ModelForward(at.detach(), seen[0] if seen else None, pooled)
