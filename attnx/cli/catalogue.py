"""``attnx methods`` and ``attnx models``: what the command offers, listed from the registries."""
from __future__ import annotations

import argparse
from typing import Any

from ..viz.terminal import say

__all__ = ["add_parsers", "cmd_methods", "cmd_models"]


def cmd_methods(args: argparse.Namespace) -> int:
    """The registered methods with their options (``--markdown``: the README's table)."""
    import attnx

    if args.markdown:
        say(attnx.methods.methods_markdown())
        return 0
    for name in attnx.list_methods():
        m = attnx.get_method(name)
        say(f"{name:<24} {m.summary}")
        for o in m.option_specs:
            choices = f" ({'/'.join(str(c) for c in o.choices)})" if o.choices else ""
            say(f"{'':<24}   {o.describe()}{choices}: {o.doc}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """What ``--model`` accepts, and the embedded models (``--markdown``: the README's supported-models table)."""
    if args.markdown:
        from ..adapters.catalogue import adapters_markdown

        say(adapters_markdown())
        return 0
    from .. import zoo

    for k, v in zoo.MODEL_KINDS.items():
        say(f"{k:<24} {v}")
    try:
        lines = list(zoo.describe())
    except Exception as exc:  # pragma: no cover - informative only
        lines = [f"(embedded models unavailable: {exc})"]
    for line in lines:
        say(f"{'':<24} {line}")
    return 0


def add_parsers(sub: Any) -> None:
    """``attnx methods`` and ``attnx models`` on the command's sub-parsers ``sub``."""
    m = sub.add_parser("methods", help="list the explanation methods and their options")
    m.add_argument("--markdown", action="store_true", help="the README's methods table")
    m.set_defaults(func=cmd_methods)
    mo = sub.add_parser("models", help="list what --model accepts and the embedded models")
    mo.add_argument("--markdown", action="store_true", help="the README's supported-models table")
    mo.set_defaults(func=cmd_models)
