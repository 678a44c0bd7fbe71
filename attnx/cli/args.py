"""The values of the ``attnx`` command's arguments: methods and their options, class targets, counts."""
from __future__ import annotations

import argparse
from typing import Sequence

from ..errors import AttnxValueError

__all__ = ["chosen_methods", "class_targets", "league_rows", "method_options", "non_negative_int", "parse_options", "positive_int"]


def chosen_methods(arg: str) -> list[str]:
    """``--method`` / ``--methods``: a comma list of registered methods, or ``all``; an unknown
    name raises with the list of methods (before any model is loaded)."""
    import attnx

    if arg == "all":
        return attnx.list_methods()
    names = [m.strip() for m in arg.split(",") if m.strip()]
    for n in names:
        attnx.get_method(n)  # raises with the list of methods
    return names


def league_rows(arg: str) -> list[str]:
    """``attnx evaluate --methods``: a comma list of league rows, each a registered method or
    ``method(option=value, ...)`` (``gradient_x_input(libragrad=true)``: its own row), or the
    sanity row ``transformer_attribution@random_weights``; an unknown method or option raises
    (before any model is loaded)."""
    from ..evaluate.columns import SANITY_ROW
    from ..evaluate.rows import parse_row, split_rows

    rows = split_rows(arg)
    if not rows:
        raise AttnxValueError("--methods: no method given")
    for r in [r for r in rows if r != SANITY_ROW]:  # the sanity row: computed by every league
        method, options = parse_row(r)
        if options:
            import attnx

            attnx.get_method(method).resolve(options)
    return rows


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``--option key=value`` pairs as text; each method parses its own (typed) options."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise AttnxValueError(f"--option expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def method_options(methods: Sequence[str], options: dict[str, str]) -> dict[str, dict]:
    """The options of each method, parsed by its declaration: with several methods (``--method
    all``) an option goes to the methods that have it; one that no method has is an error."""
    import attnx

    specs = {m: attnx.get_method(m) for m in methods}
    if len(methods) > 1:
        unused = sorted(k for k in options if not any(k in spec.options for spec in specs.values()))
        if unused:
            raise AttnxValueError(f"no method of {', '.join(methods)} has the option(s) {unused}; see `attnx methods`")
    out = {}
    for m, spec in specs.items():
        if len(methods) == 1:
            spec.check_options(options)
        out[m] = {k: spec.option(k).parse(v) for k, v in options.items() if k in spec.options}
    return out


def class_targets(values: Sequence[str] | None, class_names: Sequence[str] | None) -> list[int] | None:
    """``--target`` values as class indices: an index, a class name, or a part of exactly one name."""
    if not values:
        return None
    out = []
    for v in values:
        if v.lstrip("-").isdigit():
            out.append(int(v))
            continue
        if class_names is None:
            raise AttnxValueError(f"target {v!r} is not a class index and the model has no class names")
        lowered = [c.lower() for c in class_names]
        if v.lower() in lowered:
            out.append(lowered.index(v.lower()))
            continue
        hits = [i for i, c in enumerate(lowered) if v.lower() in c]
        if len(hits) != 1:
            shown = ", ".join(f"{i}={c}" for i, c in enumerate(class_names[:20])) + (", ..." if len(class_names) > 20 else "")
            what = "no class name" if not hits else f"{len(hits)} class names ({', '.join(class_names[i] for i in hits[:5])})"
            raise AttnxValueError(f"target {v!r} matches {what}; give an index or a name among: {shown}")
        out.append(hits[0])
    return out


def _int_at_least(v: str, least: int, expected: str) -> int:
    """``v`` as an integer ``>= least``, else the argparse error naming what was ``expected``."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {v!r}") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {v!r}")
    return n


def positive_int(v: str) -> int:
    return _int_at_least(v, 1, "a positive integer")


def non_negative_int(v: str) -> int:
    return _int_at_least(v, 0, "an integer >= 0")
