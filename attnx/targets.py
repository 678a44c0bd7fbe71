"""Turn the ``target`` argument into one scalar per sample: ``y_t``, the pre-softmax logit."""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
from .errors import AttnxTypeError, AttnxValueError

Target = Union[None, int, Sequence[int], torch.Tensor, Callable[[Any], torch.Tensor]]

__all__ = ["Target", "resolve_targets"]


def resolve_targets(
    target: Target, output: Any, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resolve ``target`` for a batch.

    Parameters
    ----------
    target:
        ``None`` (the predicted class of each sample), an ``int`` (the same class for every
        sample), a sequence or tensor of ``B`` ints (one class per sample), or a callable taking
        the model output and returning ``B`` scalars to explain.
    output:
        The raw model output, passed to a callable target.
    logits:
        ``(B, C)`` logits.

    Returns
    -------
    scores, classes:
        ``scores`` is ``(B,)`` and part of the autograd graph; ``classes`` is ``(B,)`` long, or
        ``None`` for a callable target.
    """
    if logits.dim() != 2:
        raise AttnxValueError(f"expected logits of shape (B, C), got {tuple(logits.shape)}")
    B, C = logits.shape
    if callable(target) and not isinstance(target, torch.Tensor):
        scores = target(output)
        if not isinstance(scores, torch.Tensor) or scores.shape != (B,):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise AttnxValueError(f"a callable target must return a tensor of shape ({B},), one scalar per sample; got {got}")
        return scores, None
    if target is None:
        classes = logits.detach().argmax(dim=1)
    else:
        if isinstance(target, bool) or isinstance(target, float):
            raise AttnxTypeError(f"target must be an int, a sequence of ints, a tensor or a callable, got {target!r}")
        if isinstance(target, int):
            classes = torch.full((B,), target, dtype=torch.long, device=logits.device)
        else:
            classes = torch.as_tensor(target, device=logits.device)
            if classes.is_floating_point() or classes.dtype == torch.bool:
                raise AttnxTypeError(f"target classes must be integers, got dtype {classes.dtype}")
            classes = classes.long().reshape(-1)
            if classes.numel() == 1 and B > 1:
                classes = classes.expand(B)
            if classes.numel() != B:
                raise AttnxValueError(f"got {classes.numel()} targets for a batch of {B} samples")
        bad = (classes < 0) | (classes >= C)
        if bad.any():
            raise AttnxValueError(f"target class {classes[bad][0].item()} is out of range: the model has {C} classes (0..{C - 1})")
    scores = logits.gather(1, classes[:, None]).squeeze(1)
    return scores, classes
