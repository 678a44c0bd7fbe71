"""Factual recall, measured per prompt: which prompts a language model answers, where the subject is,
how a map ranks the subject, and how the answer's log-probability falls as tokens are removed.

The pieces of the ``llm`` league (:mod:`attnx.evaluate.llm_league`), each a plain function on
tensors so that the tests can check it against a hand computation:

* :func:`encode`: prompts tokenised and **left-padded** (the generation convention), with the
  subject's token positions (tokens whose characters overlap the subject's);
* :func:`answered`: which prompts the model answers correctly (greedy continuation starts with the
  tokens of one of the accepted answers), and the answer's first token (the explained target);
* :func:`subject_rank`: the rank of the subject among the prompt's tokens under a relevance map;
* :func:`removal_curves`: the answer's log-probability as the most / least relevant tokens are
  deleted from the prompt.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import numpy as np
import torch

from ..data.facts import FactPrompt
from ..errors import AttnxValueError

__all__ = ["FRACTIONS", "answered", "chance_rank", "curves_from", "encode", "measure_rows", "pad_id", "removal_curves",
           "removal_rows", "subject_rank"]

#: fractions of the removable tokens removed at each point of a curve
FRACTIONS = tuple(i / 10 for i in range(11))


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise AttnxValueError("the tokenizer has neither a pad nor an end-of-sequence token to pad prompts with")
    return int(pad)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token lists padded on the left to the longest."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[b, T - len(r):] = 1
    return ids, mask


def encode(tokenizer: Any, prompts: Sequence[FactPrompt]) -> dict[str, torch.Tensor]:
    """Prompts as a left-padded batch with their subjects' token positions.

    Returns
    -------
    dict
        ``input_ids`` and ``attention_mask`` ``(B, T)`` (what the model and the explainer take),
        ``subject`` ``(B, T)`` bool: the tokens whose character span overlaps the subject's, and
        ``first`` ``(B,)``: the position of each prompt's first real token.
    """
    rows, subject_rows = [], []
    for p in prompts:
        enc = tokenizer(p.text, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        spans = enc["offset_mapping"]
        subject = [e > s and s < p.subject_end and e > p.subject_start for s, e in spans]
        if not any(subject):
            raise AttnxValueError(f"no token of {p.text!r} covers its subject {p.subject!r}")
        rows.append(ids)
        subject_rows.append(subject)
    ids, mask = left_pad(rows, pad_id(tokenizer))
    T = ids.shape[1]
    subject = torch.zeros_like(mask, dtype=torch.bool)
    for b, s in enumerate(subject_rows):
        subject[b, T - len(s):] = torch.tensor(s, dtype=torch.bool)
    first = torch.tensor([T - len(r) for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "subject": subject, "first": first}


def answer_tokens(tokenizer: Any, prompt: FactPrompt, answer: str) -> list[int]:
    """The tokens ``" " + answer`` adds after the prompt (as the model would produce them)."""
    head = list(tokenizer(prompt.text)["input_ids"])
    full = list(tokenizer(prompt.text + " " + answer)["input_ids"])
    if full[:len(head)] == head and len(full) > len(head):
        return full[len(head):]
    return list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def answered(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[FactPrompt], batch: dict[str, torch.Tensor],
             max_new_tokens: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Which prompts the model answers correctly, greedily.

    A prompt is answered when the model's greedy continuation starts with the first
    ``min(len(answer), max_new_tokens)`` tokens of one of its accepted answers.

    Returns
    -------
    (correct, target)
        ``(B,)`` bool, and ``(B,)`` the answer's first token (the model's greedy next token; ``-1``
        where the prompt is not answered).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if hasattr(model, "generate"):  # greedy with the key/value cache: each prompt is read once
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad_id(tokenizer), use_cache=True)
        generated = out[:, ids.shape[1]:]
    else:  # plain greedy decoding, the prompt re-read each step
        generated = ids.new_zeros((ids.shape[0], 0))
        past_ids, past_mask = ids, mask
        extra = _keeps_last_logits(model)
        for _ in range(max_new_tokens):
            position = (past_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=past_ids, attention_mask=past_mask, position_ids=position, **extra).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            generated = torch.cat([generated, nxt], 1)
            past_ids = torch.cat([past_ids, nxt], 1)
            past_mask = torch.cat([past_mask, torch.ones_like(nxt)], 1)
    correct = torch.zeros(len(prompts), dtype=torch.bool)
    for b, p in enumerate(prompts):
        for answer in p.answers:
            want = answer_tokens(tokenizer, p, answer)[:max_new_tokens]
            if want and generated[b, :len(want)].tolist() == want:
                correct[b] = True
                break
    target = torch.where(correct, generated[:, 0], torch.full_like(generated[:, 0], -1))
    return correct, target


def subject_rank(scores: torch.Tensor, subject: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The rank of the subject among the candidate tokens: 1 + the number of other candidates whose
    relevance is at least the subject's best token's.

    Ties count against the subject (a constant map ranks it last), so a map earns rank 1 only by
    giving a subject token strictly more relevance than every other candidate.

    Parameters
    ----------
    scores:
        ``(B, T)`` relevance per token.
    subject, candidates:
        ``(B, T)`` bool: the subject's tokens, and the tokens ranked (the subject's among them).
    """
    if bool((subject & ~candidates).any()):
        raise AttnxValueError("every subject token must be a candidate token")
    s = scores.double()
    best = s.masked_fill(~subject, -math.inf).amax(-1, keepdim=True)
    above = ((s >= best) & candidates & ~subject).sum(-1)
    return 1 + above


def chance_rank(num_candidates: torch.Tensor, num_subject: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top-1 rate, expected reciprocal rank)`` of the subject under a uniformly random ranking of
    ``n`` candidates of which ``k`` are the subject's: rank ``r`` (the first subject token's place)
    has probability C(n - r, k - 1) / C(n, k)."""
    top1, rr = [], []
    for n, k in zip(num_candidates.tolist(), num_subject.tolist()):
        p = [math.comb(n - r, k - 1) / math.comb(n, k) for r in range(1, n - k + 2)]
        top1.append(p[0])
        rr.append(sum(pr / r for r, pr in enumerate(p, start=1)))
    return torch.tensor(top1, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64)


def _keeps_last_logits(model: torch.nn.Module) -> dict:
    """``logits_to_keep=1`` where the model's forward takes it (the head on one position, not all)."""
    try:
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    except (TypeError, ValueError):
        return {}


@torch.no_grad()
def answer_log_probs(model: torch.nn.Module, rows: Sequence[Sequence[int]], targets: Sequence[int], pad_id: int,
                     batch_size: int = 64) -> np.ndarray:
    """``log p(target | row)`` at the next position, each token list left-padded into batches."""
    out = np.zeros(len(rows))
    extra = _keeps_last_logits(model)
    for start in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[start:start + batch_size], pad_id)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, **extra).logits[:, -1].double()
        t = torch.tensor(list(targets[start:start + batch_size]), dtype=torch.long)
        out[start:start + len(t)] = logits.log_softmax(-1).gather(1, t[:, None])[:, 0].numpy()
    return out


def removal_order(scores: torch.Tensor, removable: torch.Tensor, most_relevant_first: bool) -> list[list[int]]:
    """Per sample, the removable positions in removal order (ties: the earlier position first)."""
    orders = []
    for s, r in zip(scores.double(), removable):
        pos = torch.nonzero(r).flatten().tolist()
        key = sorted(pos, key=lambda i: (-float(s[i]) if most_relevant_first else float(s[i]), i))
        orders.append(key)
    return orders


def removal_rows(batch: dict[str, torch.Tensor], scores: torch.Tensor, targets: torch.Tensor,
                 fractions: Sequence[float] = FRACTIONS, replacement: str | int = "delete") -> dict[str, list]:
    """The shortened prompts of :func:`removal_curves`, not yet run: ``{"most" | "least": [(b, j, key)]}``
    with ``key = (token ids, target)``, the prompt ``b`` at fraction ``fractions[j]``."""
    ids, mask, first = batch["input_ids"], batch["attention_mask"].bool(), batch["first"]
    removable = mask.clone()
    removable[torch.arange(len(ids)), first] = False
    t = targets.tolist()
    where: dict[str, list] = {}
    for name, most in (("most", True), ("least", False)):
        where[name] = []
        for b, order in enumerate(removal_order(scores, removable, most)):
            real = torch.nonzero(mask[b]).flatten().tolist()
            for j, f in enumerate(fractions):
                gone = set(order[:int(round(f * len(order)))])
                if replacement == "delete":
                    row = tuple(int(ids[b, i]) for i in real if i not in gone)
                else:
                    row = tuple(int(replacement) if i in gone else int(ids[b, i]) for i in real)
                where[name].append((b, j, (row, t[b])))
    return where


def measure_rows(model: torch.nn.Module, keys: Sequence[tuple], pad_id: int, batch_size: int = 64,
                 cache: dict | None = None) -> dict:
    """``{(token ids, target): log-probability}`` for every key not yet in ``cache`` (which is updated
    and returned): the distinct rows run once, sorted by length so that a batch holds rows of
    (nearly) the same length and padding costs little."""
    cache = {} if cache is None else cache
    todo = sorted(dict.fromkeys(k for k in keys if k not in cache), key=lambda k: len(k[0]))
    if todo:
        lp = answer_log_probs(model, [r for r, _ in todo], [tg for _, tg in todo], pad_id, batch_size)
        cache.update(zip(todo, lp.tolist()))
    return cache


def curves_from(where: dict[str, list], cache: dict, num_prompts: int, num_fractions: int) -> dict[str, np.ndarray]:
    """The ``(B, K)`` curves of :func:`removal_rows`' rows, read from measured log-probabilities."""
    out = {}
    for name, w in where.items():
        curve = np.zeros((num_prompts, num_fractions))
        for b, j, key in w:
            curve[b, j] = cache[key]
        out[name] = curve
    return out


def removal_curves(model: torch.nn.Module, batch: dict[str, torch.Tensor], scores: torch.Tensor, targets: torch.Tensor,
                   pad_id: int, fractions: Sequence[float] = FRACTIONS, replacement: str | int = "delete",
                   batch_size: int = 64, cache: dict | None = None) -> dict[str, np.ndarray]:
    """The answer's log-probability as the most (``"most"``) / least (``"least"``) relevant tokens are
    removed, at each fraction of the removable tokens (every real token but the first).

    Every shortened prompt of both curves runs in one batched forward pass (left-padded with an
    attention mask, in batches of ``batch_size``): :func:`removal_rows`, :func:`measure_rows`,
    :func:`curves_from`.

    Parameters
    ----------
    replacement:
        ``"delete"``: the tokens are taken out of the prompt (the rest closes up; no out-of-vocabulary
        filler); an int: they are replaced by that token id.
    cache:
        ``{(token ids, target): log-probability}`` shared between calls (e.g. the methods of one
        batch): a shortened prompt already measured is not run again.

    Returns
    -------
    dict
        ``"most"``, ``"least"``: ``(B, len(fractions))`` log-probabilities of ``targets``; ``k`` =
        ``round(f · n)`` of the ``n`` removable tokens are removed at fraction ``f``.
    """
    where = removal_rows(batch, scores, targets, fractions, replacement)
    cache = measure_rows(model, [key for w in where.values() for _, _, key in w], pad_id, batch_size, cache)
    return curves_from(where, cache, len(batch["input_ids"]), len(fractions))
