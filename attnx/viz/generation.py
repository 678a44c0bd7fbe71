"""The picture of an explained answer: generated tokens (rows) by context tokens (columns).

Each row is scaled by its own largest absolute value over the columns in the colour scale, on a
diverging colour map centred at zero (red: for the generated token, blue: against it). The sink
columns (the first token and special tokens, see :mod:`attnx.core.generation`) are hatched and left out
of the scale unless ``include_sinks``; their share of the relevance is written under the panel.
Cells after a generated token's own position (context the model had not seen yet) are blank.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .. import viz

if TYPE_CHECKING:
    from attnx.core.generation import GenerationExplanation

__all__ = ["generation_figure", "shown_token"]

CMAP = "RdBu_r"


def shown_token(token: str, width: int = 16) -> str:
    """A token as a label: newlines and tabs made visible, a leading space kept as ``␣``, cut to
    ``width`` characters."""
    text = token.replace("\n", "↵").replace("\t", "⇥")
    text = "␣" + text[1:] if text.startswith(" ") else (text or "∅")
    return text if len(text) <= width else text[: width - 1] + "…"


def sink_caption(g: "GenerationExplanation", include_sinks: bool) -> str:
    """One line: the mean share of |relevance| on the sinks, and whether they are in the scale."""
    where = "in the colour scale" if include_sinks else "hatched, kept out of the colour scale"
    return (f"first and special tokens ({where}) hold {100 * float(g.sink_share.mean()):.0f} % of |relevance| "
            f"on average, the first token alone {100 * float(g.first_token_share.mean()):.0f} %")


def generation_figure(
    explanations: Sequence["GenerationExplanation"],
    include_sinks: bool = False,
    title: str | None = None,
    cell: float = 0.24,
) -> Any:
    """One heat-map panel per explanation (e.g. per method) of the same answer, one under the other.

    Parameters
    ----------
    explanations:
        :class:`~attnx.core.generation.GenerationExplanation` objects of one prompt and answer.
    include_sinks:
        Put the first and special tokens in the colour scale (by default they are hatched and left
        out: they would take the whole scale).
    title:
        Above the panels (default: the answer).
    cell:
        Size of one cell in inches.
    """
    plt = viz.pyplot()
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    first = explanations[0]
    G, T = first.matrix.shape
    panel_h = cell * G + 2.2
    fig, axes = plt.subplots(len(explanations), 1, figsize=(max(6.0, cell * T + 3.2), panel_h * len(explanations) + 0.6),
                             squeeze=False)
    cmap = colormaps[CMAP].with_extremes(bad="white")
    labels_x = [shown_token(t) for t in first.context_tokens]
    labels_y = [f"{shown_token(t)} {float(p):.2f}" for t, p in zip(first.generated_tokens, first.probabilities)]
    for ax, g in zip(axes[:, 0], explanations):
        values = g.scaled(include_sinks).numpy().copy()
        sinks = g.sink_mask().numpy()
        if not include_sinks:
            values[:, sinks] = np.nan
        image = ax.imshow(values, cmap=cmap, vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        if not include_sinks:
            for j in np.flatnonzero(sinks):
                rows = np.flatnonzero(~np.isnan(g.matrix[:, j].numpy()))
                if len(rows):
                    ax.add_patch(Rectangle((j - 0.5, rows[0] - 0.5), 1, len(rows), facecolor="0.85", edgecolor="0.55",
                                           hatch="////", linewidth=0))
        ax.axvline(g.prompt_length - 0.5, color="0.2", linewidth=1.2)  # prompt | answer
        ax.set_xticks(range(T), labels_x, rotation=90, fontsize=8, family="monospace")
        ax.set_yticks(range(G), labels_y, fontsize=8, family="monospace")
        ax.tick_params(length=0)
        options = ", ".join(f"{k}={v}" for k, v in g.options.items())
        ax.set_title(f"{g.method}{f' ({options})' if options else ''}", fontsize=10, loc="left", weight="bold")
        ax.set_xlabel(sink_caption(g, include_sinks), fontsize=8, color="0.3")
        bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
        bar.set_label("relevance / row's max |·|", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title if title is not None else f"answer: {first.answer!r} (rows: generated token, p)", fontsize=10,
                 x=0.01, ha="left")
    fig.tight_layout()
    return fig
