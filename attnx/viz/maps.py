"""Pictures of explanations: heat-map overlays, method grids, class-specific maps, text colouring.

Every function returns a matplotlib ``Figure`` (or a string for text), draws nothing on screen by
itself and never needs a display, so it works in notebooks, scripts and on headless machines.
"""
from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import AttnxValueError

__all__ = [
    "to_rgb",
    "heat",
    "overlay",
    "show",
    "method_grid",
    "class_maps",
    "text_html",
    "text_terminal",
    "token_strings",
    "real_scores",
    "explained_strings",
    "text_figure",
    "text_grid",
    "target_label",
    "probability",
    "overlay_maps",
    "save_stacked",
    "pyplot",
    "real_columns",
    "word_pieces",
    "image_text_maps",
]


def pyplot():
    """matplotlib.pyplot, with a GUI backend that has no display replaced by Agg."""
    import matplotlib

    # only a GUI backend without a display is replaced: Jupyter's inline backend (reported as
    # "inline" by recent matplotlib), Agg, PDF, SVG, widget backends, ... are kept
    backend = matplotlib.get_backend().lower()
    if backend.startswith(("qt", "tk", "gtk", "wx")) and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def to_rgb(image: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """An image as an ``(H, W, 3)`` float array in [0, 1].

    Accepts ``(3, H, W)`` / ``(H, W, 3)`` / ``(H, W)`` tensors or arrays; ``mean`` / ``std`` undo a
    normalisation; anything else is min-max scaled into [0, 1].
    """
    a = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if mean is not None and std is not None:
        a = a * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8 or a.max() > 1.5:
        a = a / 255.0 if a.max() <= 255 else (a - a.min()) / max(a.max() - a.min(), 1e-12)
    if a.min() < 0 or a.max() > 1:
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    return np.clip(a, 0.0, 1.0)


def heat(explanation: Any, size: tuple[int, int]) -> torch.Tensor:
    """The ``(B, H, W)`` maps the pictures draw: relevance over the 99th percentile of its
    ``|value|``, in [-1, 1] for a signed method, [0, 1] otherwise, zero at zero
    (:func:`attnx.viz.scale.image_maps`; degenerate maps are zeros)."""
    from .scale import image_maps

    return image_maps(explanation, size)[0]


def overlay(
    image: Any,
    heatmap: Any,
    ax: Any = None,
    *,
    alpha: float = 0.5,
    cmap: str | None = None,
    title: str | None = None,
    colorbar: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    signed: bool = False,
    label: str | None = None,
):
    """Draw ``heatmap`` (H, W) over ``image`` (shown in grey); returns the axes.

    ``signed``: the map is in [-1, 1] and drawn on a diverging colour map centred at zero; else it
    is in [0, 1] (see :mod:`attnx.viz.scale`: zero is the same tint either way). ``label``: a word
    written in the panel, e.g. ``"all zero"`` for a map that shows nothing.
    """
    from . import scale

    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    rgb = to_rgb(image, mean, std)
    h = heatmap.detach().cpu().float().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    # the image in grey under the map (as captum's blended heat map): its own colours do not mix with the map's
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=rgb.dtype)
    ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    im = ax.imshow(h, cmap=cmap or scale.colormap(signed), norm=scale.norm(signed), alpha=alpha,
                   extent=(-0.5, rgb.shape[1] - 0.5, rgb.shape[0] - 0.5, -0.5))
    if colorbar:
        bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("relevance / 99th pct |relevance|", fontsize=7)
    if label:
        ax.text(0.5, 0.5, label, transform=ax.transAxes, ha="center", va="center", fontsize=11, weight="bold",
                color="black", bbox=dict(boxstyle="round", fc="white", ec="0.3", alpha=0.9))
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def column_colorbar(axes: Sequence[Any]) -> Any:
    """One horizontal colour bar under a column of overlays, for the map drawn in its first panel."""
    fig = axes[0].figure
    im = axes[0].images[-1]
    bar = fig.colorbar(im, ax=list(axes), location="bottom", fraction=0.025, pad=0.02, aspect=25)
    bar.set_ticks([im.norm.vmin, 0.5 * (im.norm.vmin + im.norm.vmax), im.norm.vmax])
    bar.ax.tick_params(labelsize=7)
    return bar


def overlay_maps(explanation: Any, images: Any, axes: Sequence[Any], *, alpha: float = 0.5,
                 colorbar: bool | Sequence[bool] = True, titles: Sequence[str | None] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
    """Overlay every sample's map on its image in ``axes`` by the rules of :mod:`attnx.viz.scale`
    (signed maps on a diverging colour map, degenerate maps named in the panel)."""
    from .scale import image_maps

    maps, signed, status = image_maps(explanation, tuple(images.shape[-2:]))
    bars = [colorbar] * len(axes) if isinstance(colorbar, bool) else list(colorbar)
    for i, ax in enumerate(axes):
        overlay(images[i], maps[i], ax, alpha=alpha, mean=mean, std=std, signed=signed, label=status[i],
                colorbar=bars[i], title=titles[i] if titles is not None else None)


def target_label(explanation: Any, i: int, class_names: Sequence[str] | None = None,
                 multi_label: bool | None = None) -> str:
    """The explained class of sample ``i`` and the model's probability of it, e.g. ``"Coat (p=0.91)"``.

    The probability is the model's own: the class's sigmoid for a multi-label head, else the softmax
    (``multi_label`` overrides; default what the explanation records of the model). The class names
    default to those the model carries (``config.id2label``, timm ``label_names``)."""
    if explanation.targets is None:
        return explanation.method
    names = class_names if class_names is not None else getattr(explanation, "class_names", None)
    t = int(explanation.targets[i])
    name = names[t] if names is not None and t < len(names) else str(t)
    return f"{name} (p={probability(explanation, i, t, multi_label):.2f})"


def probability(explanation: Any, i: int, t: int, multi_label: bool | None = None) -> float:
    """The model's probability of class ``t`` for sample ``i``: the class's sigmoid for a
    multi-label head (``multi_label``, default what the explanation records), else the softmax."""
    multi = bool(getattr(explanation, "multi_label", False)) if multi_label is None else multi_label
    return float(explanation.logits[i, t].float().sigmoid()) if multi else float(explanation.probabilities[i, t])


def show(
    explanation: Any,
    images: Any,
    *,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    multi_label: bool | None = None,
    max_images: int = 8,
    alpha: float = 0.5,
):
    """One overlay per sample with a colour bar, titled with the explained class and the model's
    probability of it (see :func:`target_label`)."""
    plt = pyplot()
    n = min(len(explanation), max_images)
    fig, axes = plt.subplots(1, n, figsize=(3.9 * n, 3.4), squeeze=False)
    titles = [f"{explanation.method}: {target_label(explanation, i, class_names, multi_label)}" for i in range(n)]
    overlay_maps(explanation, images, axes[0], alpha=alpha, mean=mean, std=std, titles=titles)
    fig.tight_layout()
    return fig


def method_grid(
    explainer: Any,
    images: torch.Tensor,
    methods: Sequence[str],
    *,
    target: Any = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    multi_label: bool | None = None,
    options: dict[str, dict] | None = None,
    progress: bool = False,
):
    """Rows: samples; columns: the image, then one heat map per method (same target), each column
    with its colour bar (signed methods on a diverging one). ``multi_label``: the titles give the
    sigmoid of the class instead of the softmax (default: what the model's head does)."""
    plt = pyplot()
    options = options or {}
    B = images.shape[0]
    fig, axes = plt.subplots(B, len(methods) + 1, figsize=(2.6 * (len(methods) + 1), 2.6 * B + 0.5), squeeze=False,
                             layout="constrained")
    it = methods
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(methods, desc="methods")
    for j, m in enumerate(it, start=1):
        e = explainer(images, method=m, target=target, **options.get(m, {}))
        overlay_maps(e, images, axes[:, j], colorbar=False, mean=mean, std=std, titles=[m] + [None] * (B - 1))
        column_colorbar(axes[:, j])
        if j == 1:
            for i in range(B):
                axes[i, 0].imshow(to_rgb(images[i], mean, std))
                axes[i, 0].set_axis_off()
                axes[i, 0].set_title(target_label(e, i, class_names, multi_label), fontsize=9)
    return fig


def class_maps(
    explainer: Any,
    image: torch.Tensor,
    targets: Sequence[int],
    *,
    method: str = "transformer_attribution",
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    multi_label: bool | None = None,
    **options: Any,
):
    """Class-specific maps of one image side by side: "where does the model see A, and B?".
    ``multi_label``: the titles give the sigmoid of each class instead of the softmax (default: what
    the model's head does)."""
    plt = pyplot()
    if image.dim() == 3:
        image = image.unsqueeze(0)
    batch = image.expand(len(targets), *image.shape[1:])
    e = explainer(batch, method=method, target=list(targets), **options)
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(3.4 * (len(targets) + 1) + 0.6, 3.4), squeeze=False,
                             layout="constrained")
    axes[0, 0].imshow(to_rgb(image[0], mean, std))
    axes[0, 0].set_axis_off()
    axes[0, 0].set_title("input", fontsize=9)
    overlay_maps(e, batch, axes[0, 1:], mean=mean, std=std, colorbar=False,
                 titles=[f"{method}: {target_label(e, k, class_names, multi_label)}" for k in range(len(targets))])
    bar = fig.colorbar(axes[0, 1].images[-1], ax=list(axes[0]), fraction=0.03, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("relevance / 99th pct |relevance|", fontsize=7)
    return fig


def real_columns(explanation: Any, index: int) -> list[int]:
    """The score columns of sample ``index`` that are real tokens (padding on either side dropped)."""
    layout = explanation.layout
    if layout is None:
        return list(range(explanation.scores.shape[1]))
    mask = layout.score_mask(len(explanation), explanation.scores.device)[index]
    return torch.nonzero(mask).flatten().tolist()


def token_strings(explanation: Any, tokenizer: Any, index: int) -> list[str]:
    """The word pieces of sample ``index`` (padding dropped), in the order of
    ``scores[index, real_columns(explanation, index)]``."""
    ids = explanation.input_ids[index]
    return tokenizer.convert_ids_to_tokens(ids[real_columns(explanation, index)].tolist())


def real_scores(explanation: Any, index: int) -> torch.Tensor:
    """The scores of the real tokens of sample ``index``, aligned with :func:`token_strings`."""
    return explanation.scores[index, real_columns(explanation, index)]


def explained_strings(explanation: Any, tokenizer: Any, index: int) -> list[str]:
    """For a language model, the explained token(s) after the prompt (the next token or the
    continuation); empty for classifiers."""
    tokens = getattr(explanation, "explained_tokens", None)
    if tokens is None:
        return []
    ids = [t for t in tokens[index].tolist() if t >= 0]
    return tokenizer.convert_ids_to_tokens(ids)


def _text_label(explanation: Any, tokenizer: Any, i: int, class_names: Sequence[str] | None) -> str:
    """The class label, or for a language model what is explained after the prompt."""
    explained = explained_strings(explanation, tokenizer, i)
    if not explained:
        return target_label(explanation, i, class_names)
    if explanation.targets is not None:  # one token
        t = int(explanation.targets[i])
        return f"next token {explained[0]!r} (p={float(explanation.probabilities[i, t]):.2f})"
    score = "" if explanation.target_scores is None else f" (log p={float(explanation.target_scores[i]):.2f})"
    return f"continuation {tokenizer.convert_tokens_to_string(explained)!r}{score}"


def _scaled_tokens(explanation: Any, tokenizer: Any, index: int) -> tuple[list[str], np.ndarray, list[bool]]:
    """Sample ``index``'s word pieces, their relevance on the one text colour scale of
    :func:`attnx.viz.scale.text_scale`, and which are special: the tokenizer's special tokens and,
    for a language model, the first token (an attention sink) never set the scale."""
    from .scale import special_tokens, text_scale

    toks = token_strings(explanation, tokenizer, index)
    special = special_tokens(toks, tokenizer)
    if explained_strings(explanation, tokenizer, index) and special:
        special[0] = True
    return toks, text_scale(real_scores(explanation, index), special), special


def _css(v: float) -> str:
    from .scale import token_colour

    r, g, b, a = token_colour(v)
    return f"rgba({round(r * 255)},{round(g * 255)},{round(b * 255)},{a:.3f})"


def _names(explanation: Any, class_names: Sequence[str] | None) -> Sequence[str] | None:
    return class_names if class_names is not None else getattr(explanation, "class_names", None)


def text_html(
    explanation: Any,
    tokenizer: Any,
    *,
    class_names: Sequence[str] | None = None,
    skip_special: bool = False,
) -> str:
    """HTML with every token coloured by its signed relevance (green: for the explained class,
    red: against it), one line per sample, with the prediction. For a language model the
    explained token(s) follow the prompt in a framed box after an arrow. A list of explanations
    (e.g. one per method) gives one page with a section per explanation, separated by rules."""
    explanations = explanation if isinstance(explanation, (list, tuple)) else [explanation]
    sections = ["\n".join(_text_html_rows(e, tokenizer, class_names, skip_special)) for e in explanations]
    title = "attnx: " + ", ".join(dict.fromkeys(e.method for e in explanations))
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>\n"
            + "\n<hr>\n".join(sections) + "\n</body></html>\n")


def _text_html_rows(explanation: Any, tokenizer: Any, class_names, skip_special: bool) -> list[str]:
    rows = []
    for i in range(len(explanation)):
        toks, s, special = _scaled_tokens(explanation, tokenizer, i)
        spans = []
        for tok, v, sp in zip(toks, s, special):
            if skip_special and sp:
                continue
            spans.append(f'<span style="background:{_css(v)};padding:1px 2px;margin:1px;border-radius:3px" '
                         f'title="{v:+.3f}{" (special: not in the scale)" if sp else ""}">{html.escape(tok)}</span>')
        explained = explained_strings(explanation, tokenizer, i)
        if explained:
            spans.append('&rarr; <span class="explained" style="border:2px solid #333;padding:1px 3px;margin:1px;'
                         f'border-radius:3px;font-weight:bold" title="explained">{html.escape(" ".join(explained))}</span>')
        pred = int(explanation.logits[i].argmax())
        if explained:
            name = tokenizer.convert_ids_to_tokens([pred])[0]
        else:
            names = _names(explanation, class_names)
            name = names[pred] if names is not None and pred < len(names) else str(pred)
        rows.append(
            f'<div style="margin:6px 0;font-family:sans-serif"><b>{html.escape(_text_label(explanation, tokenizer, i, class_names))}</b> '
            f'<small>(predicted{" next token" if explained else ""}: {html.escape(name)}, '
            f'p={probability(explanation, i, pred) if not explained else float(explanation.probabilities[i, pred]):.2f}; method: '
            f'{html.escape(explanation.method)})</small><br>{" ".join(spans)}</div>'
        )
    return rows


def text_terminal(explanation: Any, tokenizer: Any, *, class_names: Sequence[str] | None = None, color: bool = True) -> str:
    """A terminal rendering: tokens on 24-bit colour backgrounds (or ``token[+0.42]`` without
    colour); for a language model the explained token(s) follow ``->`` in bold underline (or
    ``[[token]]`` without colour). Tokens and class names are escaped (:func:`attnx.viz.terminal.escape`)."""
    from .scale import token_colour
    from .terminal import escape

    lines = []
    for i in range(len(explanation)):
        toks, s, _ = _scaled_tokens(explanation, tokenizer, i)
        toks = [escape(t) for t in toks]
        parts = []
        for tok, v in zip(toks, s):
            if color:  # the token's colour of the pictures, over a white background
                *rgb, a = token_colour(v)
                bg = [round(255 * (1 - a * (1 - c))) for c in rgb]
                parts.append(f"\x1b[48;2;{bg[0]};{bg[1]};{bg[2]}m\x1b[38;2;0;0;0m{tok}\x1b[0m")
            else:
                parts.append(f"{tok}[{v:+.2f}]")
        explained = explained_strings(explanation, tokenizer, i)
        if explained:
            text = escape(" ".join(explained))
            parts.append("->")
            parts.append(f"\x1b[1;4m{text}\x1b[0m" if color else f"[[{text}]]")
        lines.append(f"{escape(_text_label(explanation, tokenizer, i, class_names))}: " + " ".join(parts))
    return "\n".join(lines)


def text_figure(
    explanations: Sequence[Any],
    tokenizer: Any,
    *,
    class_names: Sequence[str] | None = None,
    width: float = 11.0,
    skip_special: bool = True,
):
    """A matplotlib picture of text explanations: for each explanation (e.g. one per method) and
    each sample, the word pieces on green (for the class) / red (against) backgrounds."""
    from .scale import token_colour

    plt = pyplot()
    lines: list[tuple[str, list[tuple[str, float]]]] = []
    for e in explanations:
        for i in range(len(e)):
            toks, s, special = _scaled_tokens(e, tokenizer, i)
            pairs = [(t, float(v)) for t, v, sp in zip(toks, s, special) if not (skip_special and sp)]
            explained = explained_strings(e, tokenizer, i)
            if explained:  # a language model's explained token(s): an arrow, then a framed box
                pairs += [("→", None), (" ".join(explained), None)]
            lines.append((f"{e.method} | {_text_label(e, tokenizer, i, class_names)}", pairs))
    fig = plt.figure(figsize=(width, 0.2 + 0.55 * len(lines) * 1.6))
    # an invisible axes: Jupyter's inline backend draws nothing for a figure without axes
    fig.add_axes((0, 0, 1, 1)).set_axis_off()
    renderer = fig.canvas.get_renderer()
    y = 1.0
    step = 1.0 / (len(lines) * 1.6 + 0.2)
    for title, pairs in lines:
        y -= step * 0.6
        fig.text(0.01, y, title, fontsize=8, color="0.3", va="top")
        y -= step * 0.55
        x = 0.01
        for tok, v in pairs:
            if v is None:
                box = dict(boxstyle="round,pad=0.15", fc="white", ec="black" if tok != "→" else "none")
            else:
                box = dict(boxstyle="round,pad=0.15", fc=token_colour(v), ec="none")
            t = fig.text(x, y, tok.replace("##", ""), fontsize=10, va="top", family="monospace", bbox=box)
            bb = t.get_window_extent(renderer=renderer)
            x += bb.width / fig.bbox.width + 0.006
            if x > 0.95:
                x = 0.01
                y -= step * 0.5
        y -= step * 0.45
    return fig


def word_pieces(tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """Word pieces as ``(text, joined)``: the text to show and whether it continues the previous
    word (BERT's ``##`` pieces; for byte-level / SentencePiece vocabularies, pieces without the
    ``Ġ`` / ``▁`` word-start mark)."""
    marked = any(t.startswith(("Ġ", "▁")) for t in tokens)
    out = []
    for k, t in enumerate(tokens):
        if t.startswith("##"):
            out.append((t[2:], k > 0))
        elif marked:
            out.append((t.lstrip("Ġ▁") or t, k > 0 and not t.startswith(("Ġ", "▁"))))
        else:
            out.append((t, False))
    return out


def text_grid(
    explanations: Sequence[Any],
    tokenizer: Any,
    *,
    class_names: Sequence[str] | None = None,
    column_width: float = 2.5,
    fontsize: float = 9.0,
    skip_special: bool = True,
):
    """A compact picture of text explanations: one column per explanation (e.g. one per method),
    one row per sentence, every word piece on a green (for the explained class) or red (against it)
    background whose strength is its relevance divided by the sentence's largest absolute one.

    Parameters
    ----------
    explanations:
        Explanations of the same sentences (the first one's targets title the rows).
    column_width:
        Width of a method's column in inches; sentences wrap inside it.
    skip_special:
        Leave out special tokens (``[CLS]``, ``[SEP]``); they also do not set the scale.
    """
    from matplotlib.font_manager import FontProperties
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from .scale import token_colour

    plt = pyplot()
    if not explanations:
        raise AttnxValueError("text_grid needs at least one explanation")
    n = len(explanations[0])
    cells: list[list[list[tuple[str, bool, float]]]] = []  # [row][column] -> (text, joined, signed value)
    for i in range(n):
        row = []
        for e in explanations:
            toks, s, special = _scaled_tokens(e, tokenizer, i)
            pieces = word_pieces(toks)
            row.append([(text, joined, float(v)) for (text, joined), v, sp in zip(pieces, s, special)
                        if not (skip_special and sp)])
        cells.append(row)

    fig = plt.figure(figsize=(1, 1), dpi=100)
    renderer = fig.canvas.get_renderer()
    prop = FontProperties(size=fontsize)
    pt = 1 / 72  # inches per point
    pad, space, line = 0.18 * fontsize * pt, 0.32 * fontsize * pt, 1.75 * fontsize * pt
    label_width, gap, top, legend = 1.55, 0.14, 0.32, 0.5

    def width(text: str) -> float:
        w, _, _ = renderer.get_text_width_height_descent(text or " ", prop, ismath=False)
        return w / fig.dpi

    # wrap every cell into lines of (x, text, value) within the column
    layout, heights = [], []
    for row in cells:
        placed_row, lines_in_row = [], 1
        for tokens in row:
            placed, x, y = [], 0.0, 0
            for text, joined, v in tokens:
                w = width(text) + 2 * pad
                if not joined and x > 0:
                    x += space
                if x + w > column_width - gap and x > 0:
                    x, y = 0.0, y + 1
                placed.append((x, y, text, v))
                x += w
            placed_row.append(placed)
            lines_in_row = max(lines_in_row, y + 1)
        layout.append(placed_row)
        heights.append(lines_in_row * line + 0.16)
    W = label_width + column_width * len(explanations)
    H = top + sum(heights) + legend
    fig.set_size_inches(W, H)
    inch = fig.dpi_scale_trans

    def put(x: float, y: float, text: str, **kw: Any) -> Any:  # (x, y) in inches from the top left
        return fig.text(x, H - y, text, transform=inch, **kw)

    for j, e in enumerate(explanations):
        put(label_width + j * column_width + pad, top - 0.1, e.method, fontsize=fontsize + 0.5, weight="bold", va="bottom")
    y = top
    for i, (placed_row, h) in enumerate(zip(layout, heights)):
        fig.add_artist(Line2D([0.05, W - 0.05], [H - y, H - y], transform=inch, color="0.85", linewidth=0.6))
        put(0.08, y + 0.08, target_label(explanations[0], i, class_names), fontsize=fontsize - 0.5, color="0.25", va="top")
        for j, placed in enumerate(placed_row):
            x0 = label_width + j * column_width + pad
            for x, k, text, v in placed:
                colour = token_colour(v)
                put(x0 + x + pad, y + 0.08 + k * line + pad, text, fontsize=fontsize, va="top",
                    bbox=dict(boxstyle=f"round,pad={pad / (fontsize * pt):.2f}", fc=colour, ec="none"))
        y += h
    fig.add_artist(Line2D([0.05, W - 0.05], [H - y, H - y], transform=inch, color="0.85", linewidth=0.6))
    # the colour scale: -1 (against the class) ... +1 (for it)
    bar_x, bar_w, bar_y = label_width, min(3.0, W - label_width - 0.2), y + 0.22
    steps = 41
    for s in range(steps):
        v = -1 + 2 * s / (steps - 1)
        fig.add_artist(Rectangle((bar_x + s * bar_w / steps, H - bar_y - 0.12), bar_w / steps, 0.12, transform=inch,
                                 fc=token_colour(v), ec="none"))
    put(bar_x - 0.08, bar_y + 0.06, "against the class", fontsize=fontsize - 1.5, ha="right", va="center", color="0.3")
    put(bar_x + bar_w + 0.08, bar_y + 0.06, "for the class", fontsize=fontsize - 1.5, va="center", color="0.3")
    put(bar_x + bar_w / 2, bar_y + 0.16, "relevance / largest |relevance| of the sentence's non-special tokens",
        fontsize=fontsize - 2, ha="center", va="top", color="0.4")
    return fig


def save_stacked(figs: Sequence[Any], path: Any, dpi: int = 100) -> None:
    """Save matplotlib figures one under the other as a single PNG (narrower ones padded with
    white on the right) and close them."""
    import io

    from PIL import Image

    plt = pyplot()
    arrays = []
    for f in figs:
        buf = io.BytesIO()
        f.savefig(buf, dpi=dpi, bbox_inches="tight", format="png")
        plt.close(f)
        buf.seek(0)
        arrays.append(np.asarray(Image.open(buf).convert("RGB")))
    width = max(a.shape[1] for a in arrays)
    padded = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255) for a in arrays]
    Image.fromarray(np.concatenate(padded, axis=0)).save(path)


def image_text_maps(
    pair: Any,
    images: torch.Tensor,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    alpha: float = 0.5,
):
    """An :class:`attnx.core.image_text.ImageTextExplanation` of every pair: rows are images, columns
    the image and then one map per prompt, titled with the prompt and its probability among the
    prompts (the softmax of the image's logits)."""
    from .scale import image_maps

    plt = pyplot()
    B, P = pair.logits_per_image.shape
    fig, axes = plt.subplots(B, P + 1, figsize=(2.8 * (P + 1) + 0.6, 2.8 * B), squeeze=False, layout="constrained")
    flat, signed, status = image_maps(pair.tower("image"), tuple(images.shape[-2:]))
    maps = pair.per_pair(flat)
    probs = pair.logits_per_image.float().softmax(-1)
    prompts = pair.prompts or [f"prompt {p}" for p in range(P)]
    for b in range(B):
        axes[b, 0].imshow(to_rgb(images[b], mean, std))
        axes[b, 0].set_axis_off()
        for p in range(P):
            overlay(images[b], maps[b, p], axes[b, p + 1], alpha=alpha, colorbar=False, mean=mean, std=std,
                    signed=signed, label=status[b * P + p],
                    title=f"{prompts[p]!r} {probs[b, p]:.2f}" if b == 0 else f"{probs[b, p]:.2f}")
    axes[0, 0].set_title(pair.tower("image").method, fontsize=9)
    bar = fig.colorbar(axes[0, 1].images[-1], ax=list(axes.flatten()), fraction=0.03, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("relevance / 99th pct |relevance|", fontsize=7)
    return fig
