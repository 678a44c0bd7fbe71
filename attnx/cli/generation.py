"""``attnx explain --text PROMPT --generate N [--chat]``: a language model's answer, explained.

The model answers (greedy, at most N tokens), every answer token is explained against the context
before it (:func:`attnx.explain_generation`) with each ``--method``, and the result is written as
an interactive page (``--out FILE.html``, the default) or a heat-map picture (``--out FILE.png``);
the terminal shows the answer and, per method, the context tokens each answer token relies on most.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable

from ..errors import AttnxValueError
from ..viz.terminal import say
from .paths import HTML_SUFFIXES, PICTURE_SUFFIXES, check_out, out_path

if TYPE_CHECKING:  # the model code loads only when an answer is explained (``attnx --help`` stays fast)
    from ..core.generation import GenerationExplanation

__all__ = ["explain_answer", "DEFAULT_NEW_TOKENS"]

DEFAULT_NEW_TOKENS = 16


def summary(g: "GenerationExplanation", count: int = 3) -> list[str]:
    """Lines for the terminal: per answer token, the ``count`` most relevant context tokens (sinks
    left out) and the sinks' share."""
    from ..viz.generation import shown_token

    lines = [f"[{g.method}] first and special tokens hold {100 * float(g.sink_share.mean()):.0f} % of |relevance| "
             f"on average (left out below; ' (answer)': an earlier answer token)"]
    for k, token in enumerate(g.generated_tokens):
        top = ", ".join(f"{shown_token(t)}{' (answer)' if j >= g.prompt_length else ''} {v:+.3g}"
                        for j, t, v in g.top(k, count))
        lines.append(f"  {shown_token(token):>14} p={float(g.probabilities[k]):.2f}  <- {top}")
    return lines


def explain_answer(args: argparse.Namespace, load: Callable[[], Any], methods: list[str], options: dict[str, dict]) -> int:
    """Run the command on parsed ``attnx explain`` arguments (``--text``, ``--generate``,
    ``--chat``, ``--include-sinks``, ``--out``): ``load()`` gives the zoo model (called once the
    arguments are checked), ``methods`` and each method's parsed ``options``."""
    if len(args.text) != 1:
        raise AttnxValueError("--generate explains the answer to one --text prompt")
    if args.target or args.continuation:
        raise AttnxValueError("--generate explains the model's own answer; --target and --continuation do not apply")
    if args.generate is not None and args.generate < 1:
        raise AttnxValueError(f"--generate takes a number of tokens (at least 1), got {args.generate}")
    check_out(args.out, HTML_SUFFIXES + PICTURE_SUFFIXES, "explained answers")
    loaded = load()
    if not loaded.info.get("language_model"):
        raise AttnxValueError(f"--generate needs a causal language model (--model smollm2 or a *ForCausalLM), "
                              f"not {args.model or 'the embedded classifier'}")
    from ..core.generation import explain_generation
    from ..report.answer import write_answer_page
    from ..viz.generation import generation_figure

    path = out_path(args.out, "attnx_answer.html", "_answer.html")
    new_tokens = args.generate or DEFAULT_NEW_TOKENS
    explained: list["GenerationExplanation"] = []
    for m in methods:
        given = {"continuation": explained[0].generated_ids} if explained else {}
        explained.append(explain_generation(loaded.model, loaded.tokenizer, args.text[0], max_new_tokens=new_tokens,
                                            method=m, chat=args.chat, **given, **options[m]))
    first = explained[0]
    name = str(loaded.info.get("name") or args.model or "the language model")
    if path.suffix.lower() in PICTURE_SUFFIXES:
        import matplotlib.pyplot as plt

        fig = generation_figure(explained, include_sinks=args.include_sinks,
                                title=f"{name}: {args.text[0]!r} -> {first.answer!r}")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    else:
        write_answer_page(path, explained, include_sinks=args.include_sinks, title=f"attnx: {name}",
                          subtitle=f"{args.text[0]!r} -> {first.answer!r}")
    say(f"answer: {first.answer!r}")
    for g in explained:
        for line in summary(g):
            say(line)
    say(f"wrote {path}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``attnx explain`` flags of this command."""
    g = parser.add_argument_group("language models: explain the model's answer (--text PROMPT --generate N)")
    g.add_argument("--generate", type=int, default=None, metavar="N",
                   help=f"answer the --text prompt (greedy, at most N tokens; {DEFAULT_NEW_TOKENS} with --chat alone) "
                   "and explain every answer token against the context before it")
    g.add_argument("--chat", action="store_true", help="put --text through the model's chat template as the user's message")
    g.add_argument("--include-sinks", action="store_true",
                   help="put the first and special tokens in the colour scale (default: left out, their share reported)")


def wanted(args: argparse.Namespace) -> bool:
    """Whether ``attnx explain`` arguments ask for an explained answer."""
    return bool(getattr(args, "text", None)) and (getattr(args, "generate", None) is not None or getattr(args, "chat", False))

