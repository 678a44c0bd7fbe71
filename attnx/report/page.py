"""What every attnx HTML page is made of: templates, embedded data, colour maps and images.

A page is self-contained: its styles and scripts are inline, its data is JSON inside a
``<script type="application/json">``, its images are data URIs and its maps are drawn by the script
from the embedded numbers; nothing is fetched, so a page works opened from disk, offline, and a
fragment works inline in a notebook.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import itertools
import json
from importlib import resources
from string import Template
from typing import Any, Sequence

import numpy as np

__all__ = ["COLORMAPS", "colormap_tables", "data_uri", "document", "fill", "fragment", "json_text", "template",
           "uint8_text"]

#: colour maps offered for image heat maps; the first is the default, the diverging map of
#: :mod:`attnx.viz.scale` (maps in [-1, 1], zero in the middle)
COLORMAPS = ("RdBu_r", "jet", "turbo", "viridis", "inferno", "magma", "gray")
_ids = itertools.count()


@functools.lru_cache(maxsize=None)
def template(name: str) -> str:
    """The text of ``attnx/report/templates/<name>`` (shipped as package data)."""
    text = resources.files("attnx.report").joinpath("templates", name).read_text(encoding="utf-8")
    if name.endswith((".js", ".css")) and "</" in text.replace("<\\/", ""):
        # inlined into <script> / <style>: a closing tag inside would end the element early
        raise RuntimeError(f"attnx/report/templates/{name} contains '</', which cannot be inlined")
    return text


def fill(name: str, **values: str) -> str:
    """Template ``name`` with its ``$placeholders`` replaced by ``values`` (inserted as given)."""
    return Template(template(name)).substitute(values)


def json_text(data: Any) -> str:
    """``data`` as JSON that can sit inside a ``<script>`` element (``<`` escaped); NaN and
    infinities are refused (JSON has none: callers replace them and say so)."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False).replace("<", "\\u003c")


def fragment(kind: str, data: Any, script: str, style: str | None = None) -> str:
    """A self-contained ``<div>`` for a page or a notebook cell: the shared styles (and the template
    ``style``, a view's own), ``data`` as JSON, and the script ``script`` (a template ``.js``
    defining ``attnxView(root)``) run on the div.

    Every fragment gets its own element id, so several can live in one page or notebook."""
    text = json_text(data)
    uid = f"attnx-{hashlib.sha1(text.encode()).hexdigest()[:10]}-{next(_ids)}"
    css = template("report.css") + (template(style) if style else "")
    return fill("fragment.html", uid=uid, kind=kind, css=css, data=text, script=template(script))


def document(title: str, body: str) -> str:
    """A whole HTML page around ``body`` (one or more fragments)."""
    return fill("page.html", title=html.escape(title), body=body)


@functools.lru_cache(maxsize=None)
def colormap_tables(names: Sequence[str] = COLORMAPS) -> dict[str, str]:
    """``{name: hex}``: each matplotlib colour map as 256 RGB entries (768 bytes, hex-encoded).

    Entry ``k`` is the colour matplotlib gives values in ``[k/256, (k+1)/256)``, so a page that looks
    up ``min(255, floor(v * 256))`` colours a map exactly as ``imshow(..., vmin=0, vmax=1)`` does."""
    import matplotlib

    out = {}
    for name in names:
        rgba = matplotlib.colormaps[name](np.arange(256))
        out[name] = (rgba[:, :3] * 255).round().astype(np.uint8).tobytes().hex()
    return out


def uint8_text(a: np.ndarray) -> str:
    """A uint8 array as base64 text (decoded by the page's script)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.uint8).tobytes()).decode("ascii")


def data_uri(rgb: np.ndarray) -> str:
    """An ``(H, W, 3)`` uint8 picture as a PNG data URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
