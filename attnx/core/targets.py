"""Turn the ``target`` argument into one scalar per sample, the ``y_t`` every method explains.

The forms of a target:

* ``None``: the predicted class; for a language model, the token it predicts next (the argmax of
  the logits at the explained position, the last real token);
* an ``int``, a sequence or a tensor of ``B`` ints: a class (or token id) per sample;
* a ``str`` (language models): the first token of the text, tokenised by the explainer's
  tokenizer (``attnx.Explainer(model, tokenizer=tok)``); a list of strings gives one per sample;
* a :class:`Continuation` (causal language models): a span explained teacher-forced, the summed
  log-probability of its tokens after the prompt;
* a callable ``f(output) -> (B,)`` on the raw model output (e.g. a logit difference).

For a class or token target, ``y_t`` is the pre-softmax logit. Sequence logits ``(B, T, V)``
are read at the explained position of each sample.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch

from ..errors import AttnxTypeError, AttnxValueError

__all__ = [
    "BoundContinuation",
    "Continuation",
    "ResolvedTarget",
    "Target",
    "first_token",
    "prepare_target",
    "resolve_targets",
]


@dataclass(frozen=True)
class Continuation:
    """A continuation of the prompt, explained teacher-forced: the target is
    ``Σ_k log p(c_k | prompt, c_<k)``, the summed log-probability of its tokens.

    The continuation is appended to each prompt, the model runs once on the whole sequence, and
    one backward gives the gradients; the scores cover the prompt tokens.

    Parameters
    ----------
    tokens:
        The continuation: a text (the same for every sample) or one text per sample, tokenised
        without special tokens; or token ids: a list of ints (the same for every sample), one
        list per sample, or a ``(K,)`` / ``(B, K)`` tensor.
    tokenizer:
        Tokenises a text continuation; default: the explainer's tokenizer.

    Examples
    --------
    >>> e = attnx.Explainer(lm, tokenizer=tok)(batch, method="grad_rollout",
    ...                                         target=Continuation(" Paris, of course"))
    """

    tokens: Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]], torch.Tensor]
    tokenizer: Any = None

    def token_ids(self, batch_size: int, tokenizer: Any = None) -> list[list[int]]:
        """The continuation of each of ``batch_size`` samples as lists of token ids."""
        t = self.tokens
        if isinstance(t, str) or (isinstance(t, (list, tuple)) and t and all(isinstance(x, str) for x in t)):
            tok = self.tokenizer if self.tokenizer is not None else tokenizer
            if tok is None:
                raise AttnxValueError(
                    "a text continuation needs a tokenizer: Continuation(text, tokenizer=tok) or "
                    "attnx.Explainer(model, tokenizer=tok)"
                )
            texts = [t] * batch_size if isinstance(t, str) else list(t)
            ids = [list(tok(s, add_special_tokens=False)["input_ids"]) for s in texts]
        elif isinstance(t, torch.Tensor):
            if t.is_floating_point() or t.dim() not in (1, 2):
                raise AttnxValueError(f"continuation ids must be a (K,) or (B, K) integer tensor, got {t.dtype} {tuple(t.shape)}")
            ids = [t.tolist()] * batch_size if t.dim() == 1 else [row.tolist() for row in t]
        elif isinstance(t, (list, tuple)) and t and all(isinstance(x, int) and not isinstance(x, bool) for x in t):
            ids = [list(t)] * batch_size
        elif isinstance(t, (list, tuple)) and t and all(isinstance(x, (list, tuple)) for x in t):
            ids = [list(x) for x in t]
        else:
            raise AttnxTypeError(
                "a continuation is a text, one text per sample, a list of token ids, one list per sample "
                f"or an integer tensor; got {t!r}"
            )
        if len(ids) != batch_size:
            raise AttnxValueError(f"got {len(ids)} continuations for a batch of {batch_size} samples")
        for i, row in enumerate(ids):
            if not row:
                raise AttnxValueError(f"the continuation of sample {i} has no tokens")
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in row):
                raise AttnxTypeError(f"continuation token ids must be ints, got {row!r}")
        return ids


@dataclass(frozen=True)
class BoundContinuation:
    """A continuation appended to a batch by its adapter.

    Attributes
    ----------
    positions:
        ``(B, K)`` long: the position whose logits predict each continuation token (the token
        before it).
    ids:
        ``(B, K)`` long: the continuation tokens.
    mask:
        ``(B, K)`` bool: real continuation tokens (continuations of different lengths are padded).
    """

    positions: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor

    def log_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B,)`` summed log-softmax of sequence ``logits`` ``(B, T, V)`` at the continuation."""
        B = logits.shape[0]
        rows = torch.arange(B, device=logits.device)[:, None]
        at = logits[rows, self.positions.to(logits.device)]  # (B, K, V)
        logp = at.log_softmax(dim=-1).gather(-1, self.ids.to(logits.device).clamp(min=0)[..., None]).squeeze(-1)
        return (logp * self.mask.to(device=logp.device, dtype=logp.dtype)).sum(dim=1)


Target = Union[None, int, str, Sequence[int], Sequence[str], torch.Tensor, Continuation, Callable[[Any], torch.Tensor]]


@dataclass
class ResolvedTarget:
    """A target resolved on one forward.

    Attributes
    ----------
    scores:
        ``(B,)`` the explained scalars ``y_t``, part of the autograd graph.
    classes:
        ``(B,)`` long explained class or token id, or ``None`` (callable, continuation).
    logits:
        ``(B, C)`` the logits at the explained position (class logits, or the next-token
        logits of a language model: at the last real token, or the last prompt token for a
        continuation).
    explained_tokens:
        ``(B, K)`` long, for language models: the explained token(s) after the prompt (the next
        token, or the continuation; ``-1`` pads continuations of different lengths); ``None``
        for classifiers and callables.
    """

    scores: torch.Tensor
    classes: torch.Tensor | None
    logits: torch.Tensor
    explained_tokens: torch.Tensor | None = None


def is_callable_target(target: Any) -> bool:
    return callable(target) and not isinstance(target, (torch.Tensor, Continuation, BoundContinuation))


def first_token(text: str, tokenizer: Any) -> int:
    """The id of the first token of ``text`` (no special tokens added).

    Spaces matter for byte-level BPE vocabularies: ``" Paris"`` and ``"Paris"`` are different
    tokens. A text of several tokens warns: only its first token is explained (use
    :class:`Continuation` for all of them).
    """
    if tokenizer is None:
        raise AttnxValueError(
            f"a text target ({text!r}) needs a tokenizer: attnx.Explainer(model, tokenizer=tok); "
            "or give the token id"
        )
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise AttnxValueError(f"the target text {text!r} has no tokens")
    if len(ids) > 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        warnings.warn(
            f"target {text!r} is {len(ids)} tokens {pieces}; explaining its first token {pieces[0]!r} "
            "(attnx.core.targets.Continuation explains all of them)",
            stacklevel=4,
        )
    return ids[0]


def prepare_target(target: Target, tokenizer: Any = None, class_names: Sequence[str] | None = None,
                   classifier: bool = False, model: Any = None) -> Target:
    """Turn the text parts of ``target`` into ids: for a classifier a string is a class name
    (resolved through ``class_names``, the labels the model carries), for a language model the
    first token of the text; a list of strings gives one per sample; a text :class:`Continuation`
    becomes its token ids; anything else is returned as given.

    A string given to a classifier without class names (and no tokenizer) raises, saying that
    string targets need a language model or a model with labels.
    """
    if isinstance(target, str) or (isinstance(target, (list, tuple)) and target and all(isinstance(t, str) for t in target)):
        texts = [target] if isinstance(target, str) else list(target)
        if class_names or (classifier and tokenizer is None):
            from .labels import class_index

            ids = [class_index(t, class_names, model) for t in texts]
        else:
            ids = [first_token(t, tokenizer) for t in texts]
        return ids[0] if isinstance(target, str) else ids
    if isinstance(target, Continuation):
        t = target.tokens
        if isinstance(t, str) or (isinstance(t, (list, tuple)) and t and all(isinstance(x, str) for x in t)):
            n = 1 if isinstance(t, str) else len(t)
            ids = target.token_ids(n, tokenizer)
            return Continuation(ids[0] if isinstance(t, str) else ids)
    return target


def resolve_targets(
    target: Target, output: Any, logits: torch.Tensor, position: torch.Tensor | None = None
) -> ResolvedTarget:
    """Resolve ``target`` for a batch.

    Parameters
    ----------
    target:
        See the module docstring; strings must have been turned into ids (:func:`prepare_target`)
        and a continuation bound to the batch (:class:`BoundContinuation`).
    output:
        The raw model output, passed to a callable target.
    logits:
        ``(B, C)`` class logits, or ``(B, T, V)`` sequence logits of a language model.
    position:
        ``(B,)`` long: the explained position of each sample, for sequence logits.

    Returns
    -------
    The :class:`ResolvedTarget`.
    """
    if logits.dim() not in (2, 3):
        raise AttnxValueError(f"expected logits of shape (B, C), or (B, T, V) for a language model, got {tuple(logits.shape)}")
    B = logits.shape[0]
    sequence = logits.dim() == 3
    if isinstance(target, Continuation):
        raise AttnxTypeError("internal: a Continuation must be bound to the batch by its adapter before it is resolved")
    if isinstance(target, BoundContinuation):
        if not sequence:
            raise AttnxTypeError(f"a continuation target needs a language model with logits (B, T, V), got {tuple(logits.shape)}")
        at = logits[torch.arange(B, device=logits.device), target.positions[:, 0].to(logits.device)]
        tokens = target.ids.masked_fill(~target.mask, -1)
        return ResolvedTarget(target.log_probability(logits), None, at, tokens)
    if sequence:
        if position is None:
            raise AttnxValueError(
                f"sequence logits {tuple(logits.shape)} need the explained position of each sample; "
                "the adapter gave none"
            )
        at = logits[torch.arange(B, device=logits.device), position.to(logits.device)]  # (B, V)
    else:
        at = logits
    C = at.shape[1]
    if is_callable_target(target):
        scores = target(output)
        if not isinstance(scores, torch.Tensor) or scores.shape != (B,):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise AttnxValueError(f"a callable target must return a tensor of shape ({B},), one scalar per sample; got {got}")
        return ResolvedTarget(scores, None, at)
    what, plural = ("token", "tokens") if sequence else ("class", "classes")
    if target is None:
        classes = at.detach().argmax(dim=1)
    else:
        if isinstance(target, (bool, float)):
            raise AttnxTypeError(
                f"target must be an int, a sequence of ints, a tensor, a string (language models), a "
                f"Continuation or a callable, got {target!r}"
            )
        if isinstance(target, int):
            if not 0 <= target < C:
                total = f"a vocabulary of {C} tokens" if sequence else f"{C} classes"
                raise AttnxValueError(f"target {what} {target} is out of range: the model has {total} (0..{C - 1})")
            classes = torch.full((B,), target, dtype=torch.long, device=logits.device)
        else:
            try:
                classes = torch.as_tensor(target, device=logits.device)
            except (OverflowError, RuntimeError, TypeError, ValueError) as error:
                raise AttnxValueError(f"target {plural} must be ints in 0..{C - 1}, got {target!r} ({error})") from None
            if classes.is_floating_point() or classes.dtype == torch.bool:
                raise AttnxTypeError(f"target {plural} must be integers, got dtype {classes.dtype}")
            classes = classes.long().reshape(-1)
            if classes.numel() == 1 and B > 1:
                classes = classes.expand(B)
            if classes.numel() != B:
                raise AttnxValueError(f"got {classes.numel()} targets for a batch of {B} samples")
        bad = (classes < 0) | (classes >= C)
        if bad.any():
            total = f"a vocabulary of {C} tokens" if sequence else f"{C} classes"
            raise AttnxValueError(f"target {what} {classes[bad][0].item()} is out of range: the model has {total} (0..{C - 1})")
    scores = at.gather(1, classes[:, None]).squeeze(1)
    return ResolvedTarget(scores, classes, at, classes[:, None] if sequence else None)
