"""Pictures of explanations: heatmaps over images, coloured tokens, grids of methods and classes.

``maps`` draws explanations (matplotlib is imported on first use), ``generation`` draws a generated
answer's relevance matrix, ``terminal`` writes text safely to a terminal.
"""
from .maps import (
    class_maps,
    explained_strings,
    heat,
    image_text_maps,
    method_grid,
    overlay,
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
