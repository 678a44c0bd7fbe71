"""The interactive page of an explained answer (:mod:`attnx.core.generation`).

The prompt and the answer as tokens; pointing at an answer token colours the context before it by
its relevance for that token (clicking keeps it), per method, with the sinks' share read out and
the sinks left out of the colour scale unless asked. The page is self-contained (see
:mod:`attnx.report.page`): token text is inserted as text, never as markup.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import AttnxValueError
from .page import colormap_tables, document, fragment

if TYPE_CHECKING:
    from attnx.core.generation import GenerationExplanation

__all__ = ["answer_html", "write_answer_page"]

#: the diverging colour map of the PNG view (:mod:`attnx.viz.generation`)
COLORMAP = "RdBu_r"


def _finite(values) -> list:
    """JSON numbers, with NaN (context the model had not seen) as null."""
    return [None if not math.isfinite(v) else float(f"{v:.7g}") for v in values]


def _check_same_answer(explanations: Sequence["GenerationExplanation"]) -> None:
    if not explanations:
        raise AttnxValueError("no explanation to show: give one GenerationExplanation per method")
    first = explanations[0]
    for g in explanations[1:]:
        if g.token_ids.tolist() != first.token_ids.tolist() or g.prompt_length != first.prompt_length:
            raise AttnxValueError("the explanations on one answer page must be of the same prompt and answer "
                                  "(explain_generation(..., continuation=first.generated_ids))")
    names = [g.method for g in explanations]
    if len(set(names)) != len(names):
        raise AttnxValueError(f"one explanation per method on an answer page, got {names}")


def answer_data(explanations: Sequence["GenerationExplanation"], include_sinks: bool = False,
                title: str | None = None, subtitle: str | None = None, initial: int | None = None) -> dict:
    """The JSON the page's script reads."""
    _check_same_answer(explanations)
    first = explanations[0]
    T0, G = first.prompt_length, first.num_generated
    sinks = set(first.sinks)
    entries = {}
    for g in explanations:
        entries[g.method] = {
            "rows": [_finite(row.tolist()) for row in g.matrix],
            "sink_share": [float(f"{v:.4g}") for v in g.sink_share.tolist()],
            "span": None if g.span_scores is None else _finite(g.span_scores.tolist()),
            "span_log_probability": g.span_log_probability,
        }
    return {
        "kind": "answer", "title": title or f"attnx: {first.answer!r}",
        "subtitle": subtitle if subtitle is not None else f"{T0} prompt tokens, {G} answer tokens",
        "tokens": first.tokens, "prompt_length": T0, "answer": first.answer,
        "sinks": [j in sinks for j in range(len(first.tokens))],
        "probabilities": [float(f"{p:.4g}") for p in first.probabilities.tolist()],
        "methods": [g.method for g in explanations], "entries": entries, "include_sinks": bool(include_sinks),
        "colormap": colormap_tables((COLORMAP,))[COLORMAP], "initial": 0 if initial is None else int(initial),
    }


def answer_html(explanations: Sequence["GenerationExplanation"], include_sinks: bool = False,
                title: str | None = None, subtitle: str | None = None, initial: int | None = None) -> str:
    """The answer view as an HTML fragment (for a notebook cell or :func:`attnx.report.report_page`).

    Parameters
    ----------
    explanations:
        One :class:`~attnx.core.generation.GenerationExplanation` per method, of the same prompt and
        answer.
    include_sinks:
        Start with the first and special tokens in the colour scale (a box on the page toggles it).
    title, subtitle:
        The view's heading (default: the answer; the token counts).
    initial:
        The answer token selected when the page opens (default the first).
    """
    data = answer_data(explanations, include_sinks, title, subtitle, initial)
    if not 0 <= data["initial"] < explanations[0].num_generated:
        raise AttnxValueError(f"initial must be an answer token index in 0..{explanations[0].num_generated - 1}")
    return fragment("answer", data, "answer.js", style="answer.css")


def write_answer_page(path: str | Path, explanations: Sequence["GenerationExplanation"], *,
                      page_title: str | None = None, **kwargs) -> Path:
    """Write :func:`answer_html` as a whole page (``<title>``: ``page_title``, default the answer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = answer_html(explanations, **kwargs)
    title = page_title or f"attnx answer: {explanations[0].answer.strip()}"
    path.write_text(document(title, body), encoding="utf-8")
    return path
