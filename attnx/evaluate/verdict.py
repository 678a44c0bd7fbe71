"""The verdict: read from the league tables, per task, which method wins each column and by how much.

For every column of a task's CSV (``league_<task>.csv``: ``method``, then each column's ``key`` and
``key_se``), the winner is the best contender by the column's direction (for a correlation whose
best value is 0, the one nearest 0). Contenders are every row except ``random`` and the sanity
rows (``method@...``), which are references. The winner's lead over the runner-up is the
difference ``d`` with ``se = sqrt(se_winner² + se_runner-up²)`` (the tables give each method's
standard error, not the paired one, so this is conservative); ``|d| < 2 se`` is "not separable".
Each column also says whether any method beats ``transformer_attribution`` (by 2 se or more).
Timing columns depend on the machine and are left out, and so is the completeness error (it checks
a method's own claim of conservation, not its faithfulness).

The recommendation per model kind follows from the tables: the method that is in the top group
(the winner and the methods not separable from it) of the most columns, with the count for
``transformer_attribution`` beside it.

``attnx evaluate`` writes ``verdict.md`` beside the tables after every run, and with ``--readme``
replaces the README's block between :data:`START` and :data:`END` (:func:`replace_block`).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import AttnxValueError

__all__ = ["END", "REFERENCE", "START", "TASKS", "ColumnSpec", "read_table", "replace_block", "verdict_markdown",
           "write_verdict"]

START = "<!-- verdict:start -->"
END = "<!-- verdict:end -->"
#: the method every column is compared with
REFERENCE = "transformer_attribution"
#: references, never winners
NOT_CONTENDERS = ("random",)
#: columns the verdict does not judge: the completeness error checks a method's own claim of
#: conservation (only the methods that claim it have a value), not its faithfulness
NOT_JUDGED = ("completeness",)
#: the tasks, in the verdict's order, with the kind of model each one evaluates
TASKS = {
    "vision": "ViT image classifiers",
    "text": "BERT-family text classifiers",
    "clip": "CLIP-style dual encoders (image tower)",
    "dinov2": "self-supervised ViT embeddings (image similarity)",
    "llm": "decoder language models",
}


@dataclass(frozen=True)
class ColumnSpec:
    """What the verdict needs of a column: its label and direction."""

    key: str
    label: str
    higher_is_better: bool
    best_at_zero: bool = False
    timing: bool = False


def column_specs(task: str) -> dict[str, ColumnSpec]:
    """The columns of ``task``'s league, from their declarations."""
    if task == "llm":
        from .llm_league import COLUMNS as LLM

        return {k: ColumnSpec(k, label, hi, timing=k == "ms") for k, label, hi, _ in LLM}
    if task == "clip":
        from .clip_league import COLUMNS as cols
    elif task == "dinov2":
        from .similarity_league import COLUMNS as cols
    else:
        from .columns import catalogue

        cols = [c for c, _ in catalogue()]
        from .columns import saco_column

        cols.append(saco_column())
    return {c.key: ColumnSpec(c.key, c.label, c.higher_is_better, c.best_at_zero, c.timing) for c in cols}


def read_table(path: str | Path) -> dict[str, dict[str, tuple[float, float]]]:
    """``{method: {key: (value, se)}}`` from a league CSV (``se`` NaN where there is no ``key_se``)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for r in rows:
        keys = [k for k in r if k != "method" and not k.endswith("_se")]
        out[r["method"]] = {k: (_number(r[k]), _number(r.get(k + "_se"))) for k in keys}
    return out


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _score(spec: ColumnSpec, value: float) -> float:
    """Larger is better."""
    if spec.best_at_zero:
        return -abs(value)
    return value if spec.higher_is_better else -value


def _fmt(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"


def _diff(a: tuple[float, float], b: tuple[float, float], spec: ColumnSpec) -> tuple[float, float]:
    """How much ``a`` is better than ``b`` (in the column's direction) and its standard error."""
    return _score(spec, a[0]) - _score(spec, b[0]), math.sqrt(a[1] ** 2 + b[1] ** 2)


def _separable(d: float, se: float) -> bool | None:
    """``|d| >= 2 se``; ``None`` without a standard error."""
    return None if not math.isfinite(se) else abs(d) >= 2 * se


@dataclass(frozen=True)
class ColumnVerdict:
    spec: ColumnSpec
    winner: str
    value: tuple[float, float]
    runner_up: str | None
    lead: tuple[float, float] | None
    top: tuple[str, ...]
    versus_reference: str


def judge_column(spec: ColumnSpec, table: Mapping[str, Mapping[str, tuple[float, float]]]) -> ColumnVerdict | None:
    """The verdict on one column (``None`` when no contender has a value)."""
    cells = {m: r[spec.key] for m, r in table.items()
             if spec.key in r and math.isfinite(r[spec.key][0]) and m not in NOT_CONTENDERS and "@" not in m}
    if not cells:
        return None
    ranked = sorted(cells, key=lambda m: _score(spec, cells[m][0]), reverse=True)
    winner = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    lead = _diff(cells[winner], cells[runner], spec) if runner else None
    top = tuple(m for m in ranked if m == winner or _separable(*_diff(cells[winner], cells[m], spec)) is False)
    if REFERENCE not in cells:
        versus = f"{REFERENCE} has no value"
    elif winner == REFERENCE:
        versus = f"no method beats {REFERENCE}"
    else:
        d, se = _diff(cells[winner], cells[REFERENCE], spec)
        sep = _separable(d, se)
        if sep is None:
            versus = f"{winner} ahead of {REFERENCE} by {_fmt(d)} (no standard error: separability not assessed)"
        elif sep:
            versus = f"{winner} beats {REFERENCE} by {_fmt(d)} ± {_fmt(se)}"
        else:
            versus = f"no method beats {REFERENCE} by 2 SE ({winner} ahead by {_fmt(d)} ± {_fmt(se)})"
    return ColumnVerdict(spec, winner, cells[winner], runner, lead, top, versus)


def _lead_text(v: ColumnVerdict) -> str:
    if v.runner_up is None or v.lead is None:
        return "the only contender"
    d, se = v.lead
    sep = _separable(d, se)
    if sep is None:
        return f"{_fmt(d)} ahead of {v.runner_up} (no standard error)"
    if sep:
        return f"{_fmt(d)} ± {_fmt(se)} ahead of {v.runner_up}"
    others = [m for m in v.top if m != v.winner]
    return f"not separable from {', '.join(others)} (lead {_fmt(d)} ± {_fmt(se)} over {v.runner_up})"


def task_verdict(task: str, table: Mapping[str, Mapping[str, tuple[float, float]]]) -> tuple[list[str], str]:
    """Markdown lines of one task's verdict (a table of its columns) and its recommendation."""
    specs = column_specs(task)
    verdicts = []
    for key in next(iter(table.values()), {}):
        spec = specs.get(key)
        if spec is None or spec.timing or key in NOT_JUDGED:
            continue
        v = judge_column(spec, table)
        if v is not None:
            verdicts.append(v)
    lines = ["| column | winner | value | lead | against transformer_attribution |", "|---|---|---:|---|---|"]
    for v in verdicts:
        value = _fmt(v.value[0]) + (f" ± {_fmt(v.value[1])}" if math.isfinite(v.value[1]) else "")
        arrow = "≈0" if v.spec.best_at_zero else ("↑" if v.spec.higher_is_better else "↓")
        lines.append(f"| {v.spec.label} {arrow} | {v.winner} | {value} | {_lead_text(v)} | {v.versus_reference} |")
    counts: dict[str, int] = {}
    for v in verdicts:
        for m in v.top:
            counts[m] = counts.get(m, 0) + 1
    n = len(verdicts)
    if not counts:
        return lines, f"no column to judge in league_{task}.csv"
    best = max(counts.values())
    leaders = sorted(m for m, c in counts.items() if c == best)
    ta = counts.get(REFERENCE, 0)
    has_se = any(math.isfinite(se) for r in table.values() for _, se in r.values())
    if has_se:
        rec = (f"**{' or '.join(leaders)}**: in the top group (best, or within 2 SE of the best) on {best} of {n} columns; "
               f"{REFERENCE}: {ta} of {n}.")
    else:
        rec = (f"**{' or '.join(leaders)}**: best on {best} of {n} columns; {REFERENCE}: {ta} of {n} (this table has no "
               "standard errors yet: separability is not judged until it is regenerated).")
    if REFERENCE in leaders:
        rec += f" No method does better than {REFERENCE} overall here."
    failed = [m for m, r in table.items() if all(not math.isfinite(x[0]) for x in r.values())]
    if failed:
        rec += f" Not applicable here (failed on this model): {', '.join(failed)}."
    return lines, rec


def verdict_markdown(folder: str | Path, tasks: Sequence[str] = tuple(TASKS)) -> str:
    """The verdict of the league CSVs in ``folder`` (the tasks that have one), as markdown."""
    folder = Path(folder)
    found = [t for t in tasks if (folder / f"league_{t}.csv").is_file()]
    if not found:
        raise AttnxValueError(f"no league table (league_<task>.csv) in {folder}: run attnx evaluate first")
    recs, sections = [], []
    for t in found:
        lines, rec = task_verdict(t, read_table(folder / f"league_{t}.csv"))
        recs.append(f"- {TASKS[t]} (`{t}`): {rec}")
        sections += ["", f"**{t}** ({TASKS[t]}; `league_{t}.csv`)", "", *lines]
    head = ["Generated by `attnx evaluate` from the league tables (docs/league/league_<task>.csv); "
            "a lead counts when it is at least 2 standard errors (SE of the difference: sqrt(SE₁² + SE₂²)). "
            "`random` and the sanity rows are references, not contenders; timing columns are left out.",
            "", "**Recommendations per model kind**", "", *recs]
    return "\n".join(head + sections) + "\n"


def replace_block(text: str, block: str, start: str = START, end: str = END) -> str:
    """``text`` with everything between the lines ``start`` and ``end`` replaced by ``block``
    (the marker lines kept). Raises if the markers are missing, repeated or out of order."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == start]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise AttnxValueError(f"expected one line {start!r} followed by one line {end!r}; found {len(starts)} and {len(ends)}")
    body = block.rstrip("\n").split("\n")
    return "\n".join(lines[: starts[0] + 1] + body + lines[ends[0]:])


def block_of(text: str, start: str = START, end: str = END) -> str | None:
    """What lies between the marker lines (``None`` without them)."""
    lines = text.split("\n")
    try:
        i = next(k for k, line in enumerate(lines) if line.strip() == start)
        j = next(k for k, line in enumerate(lines) if line.strip() == end and k > i)
    except StopIteration:
        return None
    return "\n".join(lines[i + 1:j]) + "\n"


def write_verdict(folder: str | Path, readme: str | Path | None = None) -> Path:
    """Write ``verdict.md`` in ``folder`` from its league CSVs; with ``readme``, replace that
    file's verdict block too. Returns the path of ``verdict.md``."""
    body = verdict_markdown(folder)
    path = Path(folder) / "verdict.md"
    path.write_text("# The verdict of the league\n\n" + body, encoding="utf-8")
    if readme is not None:
        readme = Path(readme)
        readme.write_text(replace_block(readme.read_text(encoding="utf-8"), body), encoding="utf-8")
    return path
