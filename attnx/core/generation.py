"""Explaining what a language model generates: every generated token against the context before it.

:func:`explain_generation` generates an answer (greedily, or takes a given continuation), then
explains each generated token ``g_k`` as the next token after ``prompt + g_<k`` (its pre-softmax
logit, the default target of a language model). The rows of a :class:`GenerationExplanation`'s
``matrix`` are those explanations side by side: ``matrix[k, j]`` is the relevance of context
position ``j`` for generated token ``k`` (NaN for ``j`` at or after ``k``'s own position, which
the model does not see when it predicts it).

The ``G`` explanations run as one batch (``batch_size`` at a time): sample ``k`` is the prefix
``prompt + g_<k``, left-padded, with target ``g_k``; attnx's batches are explained sample by
sample exactly (a sample's result equals explaining it alone), so each row equals explaining that
token alone. The answer as a whole is explained too (``span``): the summed log-probability of the
generated tokens after the prompt, one target (:class:`attnx.core.targets.Continuation`).

Attention sinks: a decoder puts most of its attention, and many methods most of their
relevance, on the first token (and on the chat template's special tokens), whatever the prompt
(see ``docs/language_models.md`` for measurements). :attr:`GenerationExplanation.sink_share` gives
that share per generated token, and the views leave those positions out of their colour scale
unless asked (``include_sinks=True``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import nn

from ..errors import AttnxTypeError, AttnxValueError
from .explainer import Explainer
from .targets import Continuation

__all__ = ["GenerationExplanation", "Prompt", "explain_generation", "generate", "prompt_ids"]

#: a text, chat messages (``[{"role": "user", "content": ...}, ...]``) or token ids
Prompt = Union[str, Sequence[dict], Sequence[int], torch.Tensor]


@dataclass
class GenerationExplanation:
    """Relevance of the context for every generated token of one answer, for one method.

    Attributes
    ----------
    method, options:
        The method and the options it ran with.
    token_ids:
        ``(T0 + G,)`` the prompt's ``T0`` tokens followed by the ``G`` generated ones.
    tokens:
        Each token decoded alone (``" Paris"``), or ``"#id"`` without a tokenizer.
    prompt_length:
        ``T0``.
    matrix:
        ``(G, T0 + G - 1)``: ``matrix[k, j]`` relevance of context position ``j`` for generated
        token ``k`` (at position ``T0 + k``); NaN for ``j >= T0 + k``.
    target_scores:
        ``(G,)`` the explained scalars: each generated token's logit.
    probabilities:
        ``(G,)`` each generated token's probability given its context.
    sinks:
        Context positions treated as attention sinks: the first token and the tokenizer's special
        tokens (``<|im_start|>``, ...).
    span_scores:
        ``(T0,)`` relevance of the prompt tokens for the whole answer (its summed
        log-probability), ``span_log_probability`` that log-probability; ``None`` when not asked.
    """

    method: str
    options: dict
    token_ids: torch.Tensor
    tokens: list[str]
    prompt_length: int
    matrix: torch.Tensor
    target_scores: torch.Tensor
    probabilities: torch.Tensor
    sinks: list[int]
    span_scores: torch.Tensor | None = None
    span_log_probability: float | None = None

    @property
    def num_generated(self) -> int:
        return self.matrix.shape[0]

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_length:].tolist()

    @property
    def generated_tokens(self) -> list[str]:
        return self.tokens[self.prompt_length:]

    @property
    def context_tokens(self) -> list[str]:
        """The tokens of the matrix's columns: the prompt and every generated token but the last."""
        return self.tokens[: self.matrix.shape[1]]

    @property
    def answer(self) -> str:
        return "".join(self.generated_tokens)

    def sink_mask(self) -> torch.Tensor:
        """``(T0 + G - 1,)`` bool: the sink columns."""
        mask = torch.zeros(self.matrix.shape[1], dtype=torch.bool)
        mask[[s for s in self.sinks if s < len(mask)]] = True
        return mask

    @property
    def sink_share(self) -> torch.Tensor:
        """``(G,)`` share of each row's absolute relevance on the sinks (first and special tokens)."""
        return share(self.matrix, self.sink_mask())

    @property
    def first_token_share(self) -> torch.Tensor:
        """``(G,)`` share of each row's absolute relevance on the first token."""
        mask = torch.zeros(self.matrix.shape[1], dtype=torch.bool)
        mask[0] = True
        return share(self.matrix, mask)

    def scaled(self, include_sinks: bool = False) -> torch.Tensor:
        """The matrix with each row divided by its largest absolute value over the columns in the
        colour scale (the sinks left out unless ``include_sinks``): values in ``[-1, 1]`` there,
        possibly beyond on the sinks; NaN stays NaN."""
        m = self.matrix.detach().double().cpu()
        keep = torch.ones(m.shape[1], dtype=torch.bool) if include_sinks else ~self.sink_mask()
        scale = m[:, keep].abs().nan_to_num(0.0).amax(dim=1, keepdim=True) if keep.any() else torch.zeros(len(m), 1)
        return m / torch.where(scale > 0, scale, torch.ones_like(scale))

    def top(self, k: int, count: int = 5, include_sinks: bool = False) -> list[tuple[int, str, float]]:
        """The ``count`` context tokens most relevant for generated token ``k`` as ``(position,
        token, value)``, highest first, sinks left out unless ``include_sinks``."""
        row = self.matrix[k].detach().double().cpu()
        valid = ~torch.isnan(row)
        if not include_sinks:
            valid &= ~self.sink_mask()
        order = [j for j in row.argsort(descending=True).tolist() if valid[j]][:count]
        return [(j, self.tokens[j], float(row[j])) for j in order]

    def figure(self, include_sinks: bool = False, **kwargs: Any) -> Any:
        """A matplotlib heat map of the matrix (see :func:`attnx.viz.generation.generation_figure`)."""
        from ..viz.generation import generation_figure

        return generation_figure([self], include_sinks=include_sinks, **kwargs)

    def _repr_html_(self) -> str:
        from ..report.answer import answer_html

        return answer_html([self])

    def __repr__(self) -> str:
        return (f"GenerationExplanation(method={self.method!r}, prompt_tokens={self.prompt_length}, "
                f"generated={self.generated_tokens!r})")


def share(matrix: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``(G,)`` Σ|matrix[:, columns]| / Σ|matrix| per row (NaN ignored; 0 for an all-zero row)."""
    a = matrix.detach().double().cpu().abs().nan_to_num(0.0)
    total = a.sum(dim=1)
    part = a[:, columns].sum(dim=1)
    return torch.where(total > 0, part / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


def prompt_ids(tokenizer: Any, prompt: Prompt, chat: bool = False) -> list[int]:
    """The token ids of ``prompt``: token ids as given, chat messages (or a text with ``chat``)
    through the tokenizer's chat template with the assistant's turn opened, a text as the
    tokenizer encodes it."""
    if isinstance(prompt, torch.Tensor):
        if prompt.is_floating_point() or prompt.dim() != 1 or prompt.numel() == 0:
            raise AttnxValueError(f"prompt ids must be a non-empty (T,) integer tensor, got {prompt.dtype} {tuple(prompt.shape)}")
        return prompt.tolist()
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    messages = None
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
    elif isinstance(prompt, str):
        if not prompt.strip():
            raise AttnxValueError("the prompt is empty: give a text, chat messages or token ids")
        messages = [{"role": "user", "content": prompt}] if chat else None
    else:
        raise AttnxTypeError(f"a prompt is a text, chat messages ([{{'role': 'user', 'content': ...}}]) or token ids; got {prompt!r}")
    if tokenizer is None:
        raise AttnxValueError("a text prompt needs the model's tokenizer: explain_generation(model, tokenizer, prompt)")
    if messages is None:
        return list(tokenizer(prompt)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise AttnxValueError(f"{type(tokenizer).__name__} has no chat template: give a plain text prompt with chat=False")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def generate(model: nn.Module, ids: list[int], max_new_tokens: int, eos: Sequence[int] = ()) -> list[int]:
    """Greedy decoding with ``model.generate``; the end-of-sequence token and what follows are cut."""
    if max_new_tokens < 1:
        raise AttnxValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad if pad is not None else (eos[0] if eos else 0))
    new = out[0, len(ids):].tolist()
    stop = next((k for k, t in enumerate(new) if t in set(eos)), len(new))
    if stop == 0:
        raise AttnxValueError("the model ended its answer at once (its first token is end-of-sequence): nothing to explain")
    return new[:stop]


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _left_padded(rows: list[list[int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def explain_generation(
    model: nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    max_new_tokens: int = 16,
    method: str = "generic",
    chat: bool = False,
    continuation: str | Sequence[int] | torch.Tensor | None = None,
    span: bool = True,
    batch_size: int = 8,
    **options: Any,
) -> GenerationExplanation:
    """Generate an answer to ``prompt`` and explain every generated token against its context.

    Parameters
    ----------
    model:
        A causal language model (``*ForCausalLM``).
    tokenizer:
        Its tokenizer (``None`` only with a prompt of token ids: tokens are then shown as ids).
    prompt:
        A text, chat messages, or token ids (used as they are).
    max_new_tokens:
        Greedy decoding stops after this many tokens or at the end-of-sequence token (not
        explained).
    method, options:
        Any method of :func:`attnx.list_methods` and its options.
    chat:
        Put a text prompt through the tokenizer's chat template as the user's message (messages
        always go through it).
    continuation:
        Explain this answer instead of generating one: a text (tokenised without special tokens)
        or token ids.
    span:
        Also explain the whole answer as one target (its summed log-probability).
    batch_size:
        Generated tokens explained per pass.

    Examples
    --------
    >>> g = attnx.explain_generation(lm, tok, "What is the capital of France?", chat=True, method="lrp")
    >>> g.generated_tokens        # ['The', ' capital', ' of', ' France', ' is', ' Paris', '.']
    >>> g.matrix.shape            # (7, T0 + 6)
    >>> g.top(5)                  # the context tokens most relevant for ' Paris'
    """
    explainer = Explainer(model, tokenizer=tokenizer)
    if not explainer.adapter.is_lm:
        raise AttnxTypeError(f"explaining generation needs a causal language model; {type(model).__name__} is not one")
    if batch_size < 1:
        raise AttnxValueError(f"batch_size must be at least 1, got {batch_size}")
    context = prompt_ids(tokenizer, prompt, chat)
    if continuation is None:
        answer = generate(explainer.model, context, max_new_tokens, _eos_ids(explainer.model, tokenizer))
    else:
        answer = Continuation(continuation, tokenizer).token_ids(1, tokenizer)[0]
    full = context + answer
    T0, G = len(context), len(answer)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    device = next(explainer.model.parameters()).device
    matrix = torch.full((G, T0 + G - 1), float("nan"), dtype=torch.float64)
    scores, probs = [], []
    for start in range(0, G, batch_size):
        ks = list(range(start, min(G, start + batch_size)))
        batch = _left_padded([full[: T0 + k] for k in ks], pad, device)
        e = explainer(batch, method=method, target=[full[T0 + k] for k in ks], **options)
        width = batch["input_ids"].shape[1]
        for b, k in enumerate(ks):
            matrix[k, : T0 + k] = e.scores[b, width - (T0 + k):].detach().double().cpu()
        scores.append(e.target_scores.detach().double().cpu())
        probs.append(e.probabilities.gather(1, e.targets[:, None]).squeeze(1).detach().double().cpu())
    span_scores = span_log_probability = None
    if span:
        e = explainer(_left_padded([context], pad, device), method=method, target=Continuation([answer]), **options)
        span_scores = e.scores[0].detach().double().cpu()
        span_log_probability = float(e.target_scores[0])
    # the template's and the tokenizer's markers (an unknown-word token stands for text: not a sink)
    specials = set(getattr(tokenizer, "all_special_ids", ()) or ()) if tokenizer is not None else set()
    specials.discard(getattr(tokenizer, "unk_token_id", None))
    sinks = sorted({0} | {j for j, t in enumerate(full[:-1]) if t in specials})
    if tokenizer is not None:
        tokens = [tokenizer.decode([t]) for t in full]
    else:
        tokens = [f"#{t}" for t in full]
    return GenerationExplanation(
        method=method, options=dict(options), token_ids=torch.tensor(full), tokens=tokens, prompt_length=T0,
        matrix=matrix, target_scores=torch.cat(scores), probabilities=torch.cat(probs), sinks=sinks,
        span_scores=span_scores, span_log_probability=span_log_probability)
