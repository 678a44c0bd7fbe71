"""Render a league: the markdown table, the CSV table and the figure of mean curves."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .columns import Column

__all__ = ["best_values", "curve_panels", "curve_styles", "curves_figure", "is_best", "to_csv", "to_markdown"]

#: line styles of the baselines in the curve plots: they read as references, not as contenders
BASELINE_STYLE = {"random": dict(color="0.15", linestyle=":"), "gradient_x_input": dict(color="0.5", linestyle="--")}


def to_markdown(title: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()) -> str:
    """The table as markdown: ``title`` in bold, the direction of every column, one row per method
    (``value ± standard error`` where the row has ``<key>_se``; the best value of each column in
    bold), the columns' definitions and ``notes`` (lines)."""
    best = best_values(columns, rows)
    higher = ", ".join(c.label for c in columns if c.higher_is_better)
    lower = ", ".join(c.label for c in columns if not c.higher_is_better)
    lines = [
        f"**{title}**",
        "",
        f"Higher is better (↑): {higher}. Lower is better (↓): {lower}.",
        "",
        "| method | " + " | ".join(f"{c.label} {c.arrow}" for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for r in rows:
        cells = []
        for c in columns:
            v = r[c.key]
            text = "–" if math.isnan(v) else f"{v:.{c.digits}f}"
            se = r.get(c.key + "_se", math.nan)
            if not math.isnan(v) and not math.isnan(se):
                text += f" ± {se:.{c.digits}f}"
            if is_best(c, v, best):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- {c.label}: {c.doc}" for c in columns)]
    lines += list(notes)
    return "\n".join(lines) + "\n"


def best_values(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The best value of each column by its direction (none with a single row, or only NaN)."""
    best: dict[str, float] = {}
    for c in columns:
        vals = [r[c.key] for r in rows if not math.isnan(r[c.key])]
        if vals and len(rows) > 1:
            best[c.key] = min(vals, key=abs) if c.best_at_zero else max(vals) if c.higher_is_better else min(vals)
    return best


def is_best(column: Column, value: float, best: Mapping[str, float]) -> bool:
    """Whether ``value`` shows as the column's best (ties at the shown precision count)."""
    return (column.key in best and not math.isnan(value)
            and f"{value:.{column.digits}f}" == f"{best[column.key]:.{column.digits}f}")


def curve_styles(methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{method: {"color": "#rrggbb", "dash": SVG dash array}}``: the colours and line styles of
    :func:`curves_figure`, for the HTML league."""
    from matplotlib.colors import to_hex

    dashes = {":": "1.5 3", "--": "6 4", "-.": "6 2 1.5 2"}
    out = {}
    for m, style in line_styles(methods).items():
        out[m] = {"color": to_hex(style["color"]), "dash": dashes.get(style.get("linestyle", "-"), "")}
    return out


def line_styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{method: matplotlib line style}``: a colour per method in table order (tab10, or tab20
    with dash-dotted lines once its colours repeat), the baselines' own grey styles."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: BASELINE_STYLE.get(m, dict(color=cmap(i % cmap.N), linestyle="-" if i < cmap.N else "-."))
            for i, m in enumerate(methods)}


def legend_below(fig: Any, ax: Any, count: int) -> None:
    """``ax``'s legend under the panels, in columns, and the panels laid out above it (inside a
    panel the legend of a league's 20-odd rows hides the curves)."""
    ncol = min(6, max(2, math.ceil(count / 4)))
    rows = math.ceil(count / ncol)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, min(0.5, (0.17 * rows + 0.1) / fig.get_figheight()), 1, 1))


def to_csv(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], path: str | Path | None = None) -> str:
    """The table as CSV (full precision; ``method`` then the column keys, each followed by
    ``<key>_se``, its standard error, when the rows have it); written to ``path`` if given.
    Returns the text."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = [k for c in columns for k in (c.key, c.key + "_se") if k == c.key or any(k in r for r in rows)]
    w.writerow(["method", *keys])
    for r in rows:
        w.writerow([r["method"], *(repr(float(r.get(k, math.nan))) for k in keys)])
    text = buf.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text


def curve_panels(kind: str, measures: Mapping[str, str] | None) -> list[tuple[str, str, str]]:
    """``(curve, title, y label)`` of each panel of a league's curve figure."""
    if kind == "text":
        y = "probability of the predicted class"
        return [("most", "token deletion, most relevant first (lower is better)", y),
                ("least", "token deletion, least relevant first (higher is better)", y)]
    pert = {"sigmoid": "sigmoid probability of the class", "accuracy": "top-1 accuracy"}[measures["perturbation"]]
    causal = {"sigmoid": "sigmoid probability of the class", "probability": "softmax probability of the class"}[measures["causal"]]
    return [("pos", "positive perturbation (lower is better)", pert), ("neg", "negative perturbation (higher is better)", pert),
            ("deletion", "deletion (lower is better)", causal), ("insertion", "insertion (higher is better)", causal)]


def curves_figure(title: str, panels: Sequence[tuple[str, str, str]], fractions: Mapping[str, Sequence[float]],
                  curves: Mapping[str, Mapping[str, np.ndarray]], methods: Sequence[str], path: str | Path | None = None):
    """Mean curves per method, one panel per curve, as a matplotlib figure (saved to ``path`` if given).

    Parameters
    ----------
    title:
        The figure's title.
    panels:
        ``(curve, title, y label)`` per panel (:func:`curve_panels`).
    fractions:
        The x values of each curve.
    curves:
        ``curves[method][curve]``: the mean curve; a method without curves (no samples) draws nothing.
    methods:
        The methods, in table order (their colours follow it).
    """
    from matplotlib.figure import Figure

    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6.2 * ncols, 4.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    styles = line_styles(methods)
    for ax, (name, panel_title, ylabel) in zip(axes, panels):
        x = np.asarray(fractions[name])
        for method in methods:
            if name not in curves.get(method, {}):
                continue
            ax.plot(x, curves[method][name], label=method, linewidth=1.6, **styles[method])
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("fraction removed" if name != "insertion" else "fraction inserted")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    legend_below(fig, axes[0], len(methods))
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
