"""Pictures of explanations: heatmaps over images, coloured tokens, grids of methods and classes.

``maps`` draws explanations (matplotlib is imported on first use), ``generation`` draws a generated
answer's relevance matrix, ``terminal`` writes text safely to a terminal. The names of ``maps`` are
imported on first use (PEP 562): ``attnx.viz.terminal`` alone, as the command's help needs it,
loads no torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .maps import (
        class_maps,
        explained_strings,
        heat,
        image_text_maps,
        method_grid,
        overlay,
        overlay_maps,
        probability,
        pyplot,
        real_columns,
        real_scores,
        save_stacked,
        show,
        target_label,
        text_figure,
        text_grid,
        text_html,
        text_terminal,
        to_rgb,
        token_strings,
        word_pieces,
    )

__all__ = [
    "class_maps",
    "explained_strings",
    "heat",
    "image_text_maps",
    "method_grid",
    "overlay",
    "overlay_maps",
    "probability",
    "pyplot",
    "real_columns",
    "real_scores",
    "save_stacked",
    "show",
    "target_label",
    "text_figure",
    "text_grid",
    "text_html",
    "text_terminal",
    "to_rgb",
    "token_strings",
    "word_pieces",
]

_SUBMODULES = ("generation", "maps", "scale", "terminal")


def __getattr__(name: str) -> Any:
    """Import a name of :mod:`.maps`, or a submodule, on first use and keep it."""
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in __all__:
        value = getattr(importlib.import_module(".maps", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
