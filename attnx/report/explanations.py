"""Interactive views of explanations: every method x target of a batch in one self-contained page.

Images: the heat map of a chosen method and target over a chosen image, two methods side by side,
overlay opacity and colour map controls, the patch score under the pointer, and every method at a
glance. Text: the word pieces of every sentence on signed colours (for / against the explained
class), two methods side by side, the explained (readout) token marked, the value under the pointer.

>>> page = attnx.report.explanation_html([rollout, lrp], images, class_names=names)   # a fragment
>>> attnx.report.write_report("report.html", {"dog": [e1, e2], "cat": [e3, e4]}, images)
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .. import viz
from ..core.layout import Readout, scores_to_map
from ..errors import AttnxTypeError, AttnxValueError
from ..viz import scale
from .page import COLORMAPS, colormap_tables, data_uri, document, fragment, uint8_text

__all__ = ["explanation_html", "report_page", "write_report", "target_name"]

Explanations = Any  # an Explanation, a sequence of them, or {target label: Explanation or sequence}


def target_name(explanation: Any, class_names: Sequence[str] | None = None) -> str:
    """A name for what ``explanation`` explains, for the target switcher: ``"predicted"`` when every
    sample's target is its top class, a class name when all samples share one target."""
    if explanation.targets is None:
        return "callable target"
    t = explanation.targets.detach().cpu()
    if torch.equal(t, explanation.logits.detach().cpu().argmax(dim=-1)):
        return "predicted"
    if bool((t == t[0]).all()):
        k = int(t[0])
        return class_names[k] if class_names is not None and k < len(class_names) else f"class {k}"
    return "targets " + ", ".join(str(int(v)) for v in t[:6]) + (", ..." if len(t) > 6 else "")


def _by_method_and_target(explanations: Explanations, class_names) -> tuple[list[str], list[str], dict]:
    """``(methods, targets, {method: {target: Explanation}})`` in the order given."""
    if isinstance(explanations, Mapping):
        pairs = [(str(label), e) for label, group in explanations.items()
                 for e in (group if isinstance(group, (list, tuple)) else [group])]
    else:
        group = explanations if isinstance(explanations, (list, tuple)) else [explanations]
        pairs = [(target_name(e, class_names), e) for e in group]
    if not pairs:
        raise AttnxValueError("give at least one explanation to show")
    methods, targets, table = [], [], {}
    for label, e in pairs:
        if not hasattr(e, "scores") or not hasattr(e, "method"):
            raise AttnxTypeError(f"expected attnx Explanations, got {type(e).__name__}")
        if label in table.setdefault(e.method, {}):
            raise AttnxValueError(f"two explanations of method {e.method!r} for target {label!r}: label the targets, "
                                  "e.g. {'dog': [...], 'cat': [...]}")
        table[e.method][label] = e
        methods += [e.method] if e.method not in methods else []
        targets += [label] if label not in targets else []
    first = pairs[0][1]
    for _, e in pairs:
        if len(e) != len(first) or (e.grid is None) != (first.grid is None) or e.grid != first.grid:
            raise AttnxValueError(f"the explanations are not of the same batch: {e!r} vs {first!r}")
        if e.grid is None and (e.input_ids is None or first.input_ids is None or not torch.equal(e.input_ids, first.input_ids)):
            raise AttnxValueError(f"the text explanations are not of the same token ids: {e!r} vs {first!r}")
    return methods, targets, table


def _values(v: torch.Tensor) -> list[float]:
    """Scores for the page: 7 significant digits (the read-outs show 4)."""
    return [float(f"{x:.7g}") for x in v.detach().cpu().double().tolist()]


def _checked(e: Any, i: int, scores: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The scores of sample ``i``, with non-finite values zeroed and said (warned and noted)."""
    finite = torch.isfinite(scores)
    if bool(finite.all()):
        return scores, ""
    warnings.warn(f"{e.method}: sample {i} has {int((~finite).sum())} non-finite scores; the report draws them as 0",
                  RuntimeWarning, stacklevel=4)
    return torch.where(finite, scores, torch.zeros_like(scores)), "non-finite relevance: drawn as 0"


def _image_data(methods, table, images, class_names, mean, std, multi_label, names) -> dict:
    first = next(iter(next(iter(table.values())).values()))
    n = len(first)
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] != n:
            raise AttnxValueError(f"images: expected the ({n}, C, H, W) batch the explanations were computed on, "
                                  f"got {tuple(images.shape) if hasattr(images, 'shape') else type(images).__name__}")
        size = (int(images.shape[-2]), int(images.shape[-1]))
    else:
        size = tuple(first.input_size or first.grid)
    samples = []
    for i in range(n):
        picture = None
        if images is not None:
            picture = data_uri((viz.to_rgb(images[i], mean, std) * 255).round().astype(np.uint8))
        samples.append({"name": names[i] if names is not None else f"image {i}", "image": picture})
    entries: dict[str, dict[str, list]] = {}
    for method in methods:
        for label, e in table[method].items():
            # the pictures' colour rule (attnx.viz.scale): relevance over the 99th percentile of its |value|,
            # in [-1, 1], zero mid-scale whatever the sign; colour-table index floor((v + 1) * 128)
            pixel_level = getattr(e, "pixel_relevance", None) is not None
            drawn, _, status = scale.image_maps(e, size)
            upsampled = None if pixel_level else scores_to_map(e.scores.detach().double(), e.grid, size)
            rows = []
            for i in range(n):
                scores, note = _checked(e, i, e.scores[i])
                if not note and status[i] is not None:
                    note = f"{status[i]} map: nothing to draw"
                row = {"label": viz.target_label(e, i, class_names, multi_label), "scores": _values(scores), "note": note}
                if pixel_level:
                    row["pixels"] = uint8_text(np.clip(np.floor((drawn[i].double().numpy() + 1) * 128), 0, 255))
                else:
                    row["scale"] = scale.peak(upsampled[i]) if status[i] is None else 0.0
                rows.append(row)
            entries.setdefault(method, {})[label] = rows
    return {"kind": "image", "size": list(size), "grid": list(first.grid), "samples": samples, "entries": entries,
            "colormaps": colormap_tables(), "cmap": COLORMAPS[0], "opacity": 0.5 if images is not None else 1.0}


def _text_data(methods, table, tokenizer, class_names, multi_label) -> dict:
    first = next(iter(next(iter(table.values())).values()))
    special = set(getattr(tokenizer, "all_special_tokens", ())) if tokenizer is not None else set()
    # one token read per sample (class token, a language model's last real token), or none marked
    index = None if first.layout is None else Readout(first.layout, len(first), torch.device("cpu")).index
    sentences, columns = [], []
    for i in range(len(first)):
        cols = viz.real_columns(first, i)  # real tokens on either padding side
        ids = first.input_ids[i, cols].tolist()
        tokens = viz.token_strings(first, tokenizer, i) if tokenizer is not None else [f"#{t}" for t in ids]
        pieces = viz.word_pieces(tokens)
        position = None if index is None else int(index[i]) - first.layout.prefix_tokens
        readout = cols.index(position) if position in cols else None
        sentences.append({"tokens": [p for p, _ in pieces], "joined": [j for _, j in pieces],
                          "special": [t in special for t in tokens], "readout": readout})
        columns.append(cols)
    entries: dict[str, dict[str, list]] = {}
    for method in methods:
        for label, e in table[method].items():
            rows = []
            for i, sentence in enumerate(sentences):
                scores, note = _checked(e, i, e.scores[i, columns[i]])
                shown = [s for s, sp in zip(scores.tolist(), sentence["special"]) if not sp] or scores.tolist()
                scale = max(abs(s) for s in shown) if shown else 0.0
                if not note and scale == 0:
                    note = "all relevance is zero"
                rows.append({"label": viz.target_label(e, i, class_names, multi_label), "scores": _values(scores),
                             "scale": float(f"{scale:.7g}"), "note": note})
            entries.setdefault(method, {})[label] = rows
    return {"kind": "text", "sentences": sentences, "entries": entries, "intensity": 0.85}


def explanation_html(
    explanations: Explanations,
    images: torch.Tensor | None = None,
    *,
    tokenizer: Any = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    multi_label: bool | None = None,
    names: Sequence[str] | None = None,
    title: str | None = None,
    subtitle: str | None = None,
    compare: Sequence[str] | None = None,
) -> str:
    """The interactive view of explanations of one batch, as an HTML fragment (a ``<div>`` with its
    style, data and script) for a notebook cell or a page (:func:`report_page`).

    Parameters
    ----------
    explanations:
        An :class:`~attnx.Explanation`, a list of them (one per method, or per method and target),
        or ``{target label: explanation or list}``. Unlabelled ones are named by
        :func:`target_name` (``"predicted"``, a class name). All must be of the same batch.
    images:
        The ``(B, C, H, W)`` image batch the explanations were computed on (``mean`` / ``std``
        undo its normalisation); without it the maps are shown alone.
    tokenizer:
        For text: shows the word pieces (without it, the token ids).
    class_names, multi_label:
        Name the classes (default: the names the model carries); ``multi_label`` gives the class's
        sigmoid instead of the softmax (default: what the model's head does).
    names:
        One name per image, for the image list.
    title, subtitle:
        The view's heading.
    compare:
        The one or two methods shown first as A and B (default: the first two).
    """
    methods, targets, table = _by_method_and_target(explanations, class_names)
    first = table[methods[0]][next(iter(table[methods[0]]))]
    if first.grid is not None:
        data = _image_data(methods, table, images, class_names, mean, std, multi_label, names)
        default = f"{len(first)} image{'s' if len(first) != 1 else ''}, {first.grid[0]}x{first.grid[1]} patches"
        default += f"; readout: {first.readout}" if getattr(first, "readout", None) is not None else ""  # the head's rows
        if images is None:
            default += "; the maps alone (attnx.report.explanation_html(e, images) draws them over the images)"
    else:
        if images is not None:
            raise AttnxValueError("these explanations are of text: pass tokenizer=..., not images")
        data = _text_data(methods, table, tokenizer, class_names, multi_label)
        default = f"{len(first)} text{'s' if len(first) != 1 else ''}"
        if tokenizer is None:
            default += "; token ids (attnx.report.explanation_html(e, tokenizer=tok) shows the word pieces)"
    shown = list(compare) if compare is not None else methods[:2]
    unknown = [m for m in shown if m not in methods]
    if unknown or not 1 <= len(shown) <= 2:
        raise AttnxValueError(f"compare: expected one or two of the methods shown ({', '.join(methods)}), got {shown}")
    data.update(methods=methods, targets=targets, a=shown[0], b=shown[1] if len(shown) > 1 else "", title=title or "attnx: " + ", ".join(methods),
                subtitle=subtitle if subtitle is not None else default)
    return fragment(data["kind"], data, "explanations.js")


def report_page(*fragments: str, title: str = "attnx report", intro: str | None = None, heading: bool = True) -> str:
    """A whole, self-contained HTML page holding ``fragments`` (from :func:`explanation_html` or
    :func:`attnx.report.league_html`) one under the other, under ``title`` (unless not ``heading``)
    and an ``intro`` paragraph."""
    import html

    head = (f"<h1>{html.escape(title)}</h1>\n" if heading else "") + (
        f"<p class='attnx-intro'>{html.escape(intro)}</p>\n" if intro else "")
    return document(title, head + "\n".join(fragments))


def write_report(path: str | Path, explanations: Explanations, images: torch.Tensor | None = None, *,
                 page_title: str = "attnx report", intro: str | None = None, **kwargs: Any) -> Path:
    """Write :func:`explanation_html` as a page to ``path`` (``kwargs`` go to it); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_page(explanation_html(explanations, images, **kwargs), title=page_title, intro=intro),
                    encoding="utf-8")
    return path

