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
    """The ``(B, H, W)`` maps the pictures draw, in [0, 1].

    ``explanation.heatmap(size)`` (min-max per sample), except for signed pixel-level relevance
    (``lrp``): there min-max would put zero relevance mid-scale and tint the whole image, so the
    pictures show the positive relevance (evidence for the class) divided by its maximum.
    """
    pixels = getattr(explanation, "pixel_relevance", None)
    if pixels is None or float(pixels.min()) >= 0:
        return explanation.heatmap(size)
    maps = pixels[:, None].detach().float().clamp_min(0)
    if tuple(size) != tuple(maps.shape[-2:]):
        maps = torch.nn.functional.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    peak = maps.flatten(1).amax(1).clamp_min(1e-30)[:, None, None, None]
    return (maps / peak)[:, 0]


def overlay(
    image: Any,
    heatmap: Any,
    ax: Any = None,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    title: str | None = None,
    colorbar: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
):
    """Draw ``heatmap`` (H, W) in [0, 1] over ``image``; returns the axes."""
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    rgb = to_rgb(image, mean, std)
    h = heatmap.detach().cpu().float().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    ax.imshow(rgb, interpolation="nearest")
    im = ax.imshow(h, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, extent=(-0.5, rgb.shape[1] - 0.5, rgb.shape[0] - 0.5, -0.5))
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def target_label(explanation: Any, i: int, class_names: Sequence[str] | None = None, multi_label: bool = False) -> str:
    """The explained class of sample ``i`` and its probability, e.g. ``"Coat (p=0.91)"`` (the softmax,
    or with ``multi_label`` the class's sigmoid); the method's name for a callable target."""
    if explanation.targets is None:
        return explanation.method
    t = int(explanation.targets[i])
    name = class_names[t] if class_names is not None and t < len(class_names) else str(t)
    p = float(explanation.logits[i, t].float().sigmoid()) if multi_label else float(explanation.probabilities[i, t])
    return f"{name} (p={p:.2f})"


def show(
    explanation: Any,
    images: Any,
    *,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    multi_label: bool = False,
    max_images: int = 8,
    alpha: float = 0.5,
):
    """One overlay per sample, titled with the explained class and its probability (the softmax, or
    with ``multi_label`` the class's sigmoid)."""
    plt = pyplot()
    n = min(len(explanation), max_images)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    maps = heat(explanation, tuple(images.shape[-2:]))
    for i in range(n):
        overlay(images[i], maps[i], axes[0, i], alpha=alpha, mean=mean, std=std,
                title=f"{explanation.method}: {target_label(explanation, i, class_names, multi_label)}")
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
    multi_label: bool = False,
    options: dict[str, dict] | None = None,
    progress: bool = False,
):
    """Rows: samples; columns: the image, then one heat map per method (same target).
    ``multi_label``: the titles give the sigmoid of the class instead of the softmax."""
    plt = pyplot()
    options = options or {}
    B = images.shape[0]
    fig, axes = plt.subplots(B, len(methods) + 1, figsize=(2.6 * (len(methods) + 1), 2.6 * B), squeeze=False)
    it = methods
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(methods, desc="methods")
    for j, m in enumerate(it, start=1):
        e = explainer(images, method=m, target=target, **options.get(m, {}))
        maps = heat(e, tuple(images.shape[-2:]))
        for i in range(B):
            overlay(images[i], maps[i], axes[i, j], colorbar=False, mean=mean, std=std,
                    title=m if i == 0 else None)
        if j == 1:
            for i in range(B):
                axes[i, 0].imshow(to_rgb(images[i], mean, std))
                axes[i, 0].set_axis_off()
                axes[i, 0].set_title(target_label(e, i, class_names, multi_label), fontsize=9)
    fig.tight_layout()
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
    multi_label: bool = False,
    **options: Any,
):
    """Class-specific maps of one image side by side: "where does the model see A, and B?".
    ``multi_label``: the titles give the sigmoid of each class instead of the softmax."""
    plt = pyplot()
    if image.dim() == 3:
        image = image.unsqueeze(0)
    batch = image.expand(len(targets), *image.shape[1:])
    e = explainer(batch, method=method, target=list(targets), **options)
    maps = heat(e, tuple(image.shape[-2:]))
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(3.4 * (len(targets) + 1), 3.4), squeeze=False)
    axes[0, 0].imshow(to_rgb(image[0], mean, std))
    axes[0, 0].set_axis_off()
    axes[0, 0].set_title("input", fontsize=9)
    for k in range(len(targets)):
        overlay(image[0], maps[k], axes[0, k + 1], mean=mean, std=std, colorbar=k == len(targets) - 1,
                title=f"{method}: {target_label(e, k, class_names, multi_label)}")
    fig.tight_layout()
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


def _signed(scores: torch.Tensor, keep: Sequence[bool] | None = None) -> np.ndarray:
    """Scores divided by the largest absolute score among the ``keep`` tokens (default all): the
    tokens shown set the scale, not a hidden ``[CLS]`` that takes most of the attention mass."""
    s = scores.detach().cpu().double().numpy()
    shown = s[np.asarray(keep, dtype=bool)] if keep is not None else s
    m = np.abs(shown).max() if shown.size else 0.0
    return s / m if m > 0 else s


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
    return "<html><head><meta charset='utf-8'></head><body>\n" + "\n<hr>\n".join(sections) + "\n</body></html>\n"


def _text_html_rows(explanation: Any, tokenizer: Any, class_names, skip_special: bool) -> list[str]:
    rows = []
    for i in range(len(explanation)):
        toks = token_strings(explanation, tokenizer, i)
        special = set(getattr(tokenizer, "all_special_tokens", ()))
        keep = [not (skip_special and t in special) for t in toks]
        s = _signed(real_scores(explanation, i), keep)
        spans = []
        for tok, v, k in zip(toks, s, keep):
            if not k:
                continue
            color = f"rgba(0,160,0,{abs(v):.3f})" if v >= 0 else f"rgba(220,0,0,{abs(v):.3f})"
            spans.append(f'<span style="background:{color};padding:1px 2px;margin:1px;border-radius:3px" '
                         f'title="{v:+.3f}">{html.escape(tok)}</span>')
        explained = explained_strings(explanation, tokenizer, i)
        if explained:
            spans.append('&rarr; <span class="explained" style="border:2px solid #333;padding:1px 3px;margin:1px;'
                         f'border-radius:3px;font-weight:bold" title="explained">{html.escape(" ".join(explained))}</span>')
        pred = int(explanation.logits[i].argmax())
        if explained:
            name = tokenizer.convert_ids_to_tokens([pred])[0]
        else:
            name = class_names[pred] if class_names else str(pred)
        rows.append(
            f'<div style="margin:6px 0;font-family:sans-serif"><b>{html.escape(_text_label(explanation, tokenizer, i, class_names))}</b> '
            f'<small>(predicted{" next token" if explained else ""}: {html.escape(name)}, '
            f'p={float(explanation.probabilities[i, pred]):.2f}; method: '
            f'{html.escape(explanation.method)})</small><br>{" ".join(spans)}</div>'
        )
    return rows


def text_terminal(explanation: Any, tokenizer: Any, *, class_names: Sequence[str] | None = None, color: bool = True) -> str:
    """A terminal rendering: tokens on 24-bit colour backgrounds (or ``token[+0.42]`` without
    colour); for a language model the explained token(s) follow ``->`` in bold underline (or
    ``[[token]]`` without colour). Tokens and class names are escaped (:func:`attnx.viz.terminal.escape`)."""
    from .terminal import escape

    lines = []
    for i in range(len(explanation)):
        toks = [escape(t) for t in token_strings(explanation, tokenizer, i)]
        s = _signed(real_scores(explanation, i))
        parts = []
        for tok, v in zip(toks, s):
            if color:
                g = int(255 - 155 * abs(v))
                bg = (g, 255, g) if v >= 0 else (255, g, g)
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
    plt = pyplot()
    lines: list[tuple[str, list[tuple[str, float]]]] = []
    for e in explanations:
        for i in range(len(e)):
            toks = token_strings(e, tokenizer, i)
            special = set(getattr(tokenizer, "all_special_tokens", ()))
            keep = [not (skip_special and t in special) for t in toks]
            s = _signed(real_scores(e, i), keep)
            pairs = [(t, float(v)) for t, v, k in zip(toks, s, keep) if k]
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
                color = (0.0, 0.63, 0.0, min(abs(v), 1.0) * 0.85) if v >= 0 else (0.86, 0.0, 0.0, min(abs(v), 1.0) * 0.85)
                box = dict(boxstyle="round,pad=0.15", fc=color, ec="none")
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

    plt = pyplot()
    if not explanations:
        raise AttnxValueError("text_grid needs at least one explanation")
    n = len(explanations[0])
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    cells: list[list[list[tuple[str, bool, float]]]] = []  # [row][column] -> (text, joined, signed value)
    for i in range(n):
        row = []
        for e in explanations:
            toks = token_strings(e, tokenizer, i)
            keep = [not (skip_special and t in special) for t in toks]
            s = _signed(e.scores[i, : len(toks)], keep)
            pieces = word_pieces(toks)
            row.append([(text, joined, float(v)) for (text, joined), v, k in zip(pieces, s, keep) if k])
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
                a = min(abs(v), 1.0) * 0.85
                colour = (0.0, 0.63, 0.0, a) if v >= 0 else (0.86, 0.0, 0.0, a)
                put(x0 + x + pad, y + 0.08 + k * line + pad, text, fontsize=fontsize, va="top",
                    bbox=dict(boxstyle=f"round,pad={pad / (fontsize * pt):.2f}", fc=colour, ec="none"))
        y += h
    fig.add_artist(Line2D([0.05, W - 0.05], [H - y, H - y], transform=inch, color="0.85", linewidth=0.6))
    # the colour scale: -1 (against the class) ... +1 (for it)
    bar_x, bar_w, bar_y = label_width, min(3.0, W - label_width - 0.2), y + 0.22
    steps = 41
    for s in range(steps):
        v = -1 + 2 * s / (steps - 1)
        a = abs(v) * 0.85
        fig.add_artist(Rectangle((bar_x + s * bar_w / steps, H - bar_y - 0.12), bar_w / steps, 0.12, transform=inch,
                                 fc=(0.0, 0.63, 0.0, a) if v >= 0 else (0.86, 0.0, 0.0, a), ec="none"))
    put(bar_x - 0.08, bar_y + 0.06, "against the class", fontsize=fontsize - 1.5, ha="right", va="center", color="0.3")
    put(bar_x + bar_w + 0.08, bar_y + 0.06, "for the class", fontsize=fontsize - 1.5, va="center", color="0.3")
    put(bar_x + bar_w / 2, bar_y + 0.16, "relevance / largest |relevance| of the sentence",
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
    plt = pyplot()
    B, P = pair.logits_per_image.shape
    fig, axes = plt.subplots(B, P + 1, figsize=(2.8 * (P + 1), 2.8 * B), squeeze=False)
    maps = pair.image_maps(tuple(images.shape[-2:]))
    probs = pair.logits_per_image.float().softmax(-1)
    prompts = pair.prompts or [f"prompt {p}" for p in range(P)]
    for b in range(B):
        axes[b, 0].imshow(to_rgb(images[b], mean, std))
        axes[b, 0].set_axis_off()
        for p in range(P):
            overlay(images[b], maps[b, p], axes[b, p + 1], alpha=alpha, colorbar=False, mean=mean, std=std,
                    title=f"{prompts[p]!r} {probs[b, p]:.2f}" if b == 0 else f"{probs[b, p]:.2f}")
    axes[0, 0].set_title(pair.tower("image").method, fontsize=9)
    fig.tight_layout()
    return fig
