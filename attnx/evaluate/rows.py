"""League rows: a method's name, or ``method(option=value, ...)`` for a method with some options set.

A row is its own line of a league table (``gradient_x_input(libragrad=true)`` beside
``gradient_x_input``); its options are parsed by the method's declaration
(:class:`attnx.Option`: ``true`` / ``false`` for a bool, numbers, choices), so a mistake is
refused before any model loads. ``attnx evaluate --methods`` and ``benchmarks/bench.py --methods``
take comma lists of rows (:func:`split_rows` keeps the commas inside parentheses).
"""
from __future__ import annotations

from typing import Any

import attnx

from ..errors import AttnxValueError

__all__ = ["parse_row", "split_rows"]


def split_rows(text: str) -> list[str]:
    """A comma list of method rows, commas inside parentheses kept: ``"lrp, ig(n_steps=8, baseline=pad)"``
    -> ``["lrp", "ig(n_steps=8, baseline=pad)"]``."""
    rows, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            rows.append(text[start:i])
            start = i + 1
    rows.append(text[start:])
    return [r.strip() for r in rows if r.strip()]


def parse_row(name: str) -> tuple[str, dict]:
    """A method row ``"method"`` or ``"method(option=value, ...)"`` -> ``(method, options)``, each
    value parsed by the option's declaration (``gradient_x_input(libragrad=true)`` ->
    ``("gradient_x_input", {"libragrad": True})``); an unknown method or option raises, naming
    what there is."""
    text = name.strip()
    if "(" not in text:
        attnx.get_method(text)
        return text, {}
    method, _, rest = text.partition("(")
    method = method.strip()
    if not rest.endswith(")"):
        raise AttnxValueError(f"a method row with options is written method(option=value, ...), got {name!r}")
    spec = attnx.get_method(method)
    options: dict[str, Any] = {}
    for pair in [p for p in rest[:-1].split(",") if p.strip()]:
        if "=" not in pair:
            raise AttnxValueError(f"{name!r}: an option is written option=value, got {pair.strip()!r}")
        key, value = (s.strip() for s in pair.split("=", 1))
        spec.check_options({key: None})
        options[key] = spec.option(key).validate(spec.option(key).parse(value))
    return method, options
