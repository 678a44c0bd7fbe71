"""The colour-scale rules every picture follows.

Image maps: relevance is divided by the 99th percentile of the sample's ``|relevance|`` (a few
extreme pixels of a pixel-level method do not wash the rest out) and clipped to the scale, never
min-max normalised, so that zero relevance is the same tint in every panel. A method whose relevance can be
negative (``lrp``, ``gradient_x_input``, ...) is drawn on a diverging colour map centred at zero
(blue against the class, red for it); a non-negative one on the upper (red) half of the same map,
so zero is the same near-white in both. A map that shows nothing (all zero, constant, non-finite)
is named in its panel instead of drawn as an empty picture.

Text: every token's relevance is divided by the largest ``|relevance|`` among the tokens that are
not special (``[CLS]``, ``[SEP]``, BOS, padding): a special token that takes most of the attention
mass (an attention sink) never sets the scale; it is shown clipped to the scale.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "PERCENTILE",
    "SIGNED_CMAP",
    "colormap",
    "image_maps",
    "map_status",
    "norm",
    "peak",
    "special_tokens",
    "text_scale",
    "token_colour",
]

#: the diverging colour map of every image map: zero in the middle (near-white), red for the class
SIGNED_CMAP = "RdBu_r"

#: image maps are divided by this percentile of their |relevance|
PERCENTILE = 99.0

#: constant when max - min <= this many float32 epsilons times max |value|
_TINY = 8 * float(np.finfo(np.float32).eps)


def colormap(signed: bool) -> Any:
    """The colour map of a signed map (``RdBu_r``), or of a non-negative one: the upper half of
    ``RdBu_r`` (zero the same near-white as a signed map's zero, the same reds above it)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    full = colormaps[SIGNED_CMAP]
    if signed:
        return full
    return ListedColormap(full(np.linspace(0.5, 1.0, 128)), name=f"{SIGNED_CMAP}_upper")


def norm(signed: bool) -> Any:
    """``TwoSlopeNorm`` centred at 0 on [-1, 1] for a signed map, ``Normalize(0, 1)`` otherwise."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    return TwoSlopeNorm(vcenter=0.0, vmin=-1.0, vmax=1.0) if signed else Normalize(0.0, 1.0)


def map_status(values: Any) -> str | None:
    """``"not finite"``, ``"all zero"``, ``"constant"`` for a map that shows nothing, else ``None``."""
    v = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return "empty"
    if not np.isfinite(v).all():
        return "not finite"
    peak = float(np.abs(v).max())
    if peak == 0:
        return "all zero"
    if float(v.max() - v.min()) <= _TINY * peak:
        return "constant"
    return None


def image_maps(explanation: Any, size: tuple[int, int]) -> tuple[torch.Tensor, bool, list[str | None]]:
    """The ``(B, H, W)`` maps an image picture draws, whether they are signed, and each sample's
    :func:`map_status`.

    The source is the pixel relevance of pixel-level methods (LRP to the input), else the patch
    scores upsampled bilinearly. The maps are signed when any sample has a negative value (all
    panels of one method share a colour map); each sample is divided by the :data:`PERCENTILE`
    of its ``|value|`` and clipped (to [-1, 1], or [0, 1] when not signed). A degenerate sample is
    returned as zeros.
    """
    pixels = getattr(explanation, "pixel_relevance", None)
    if pixels is not None:
        source = pixels.detach().double()
    else:
        h, w = explanation.grid
        source = explanation.scores.detach().double().reshape(-1, h, w)
    status = [map_status(s) for s in source]
    maps = source[:, None]
    if tuple(size) != tuple(maps.shape[-2:]):
        maps = torch.nn.functional.interpolate(maps.nan_to_num(0.0, 0.0, 0.0), size=tuple(size), mode="bilinear",
                                               align_corners=False)
    maps = maps[:, 0]
    good = [k for k, s in enumerate(status) if s is None]
    signed = any(bool((source[k] < 0).any()) for k in good)
    out = torch.zeros_like(maps)
    for k in good:
        out[k] = (maps[k] / peak(maps[k])).clamp(-1.0, 1.0)
    return out.float(), signed, status


def peak(values: torch.Tensor) -> float:
    """The value an image map is divided by: the :data:`PERCENTILE` of its ``|values|`` (their
    maximum when that percentile is zero); 0 for an all-zero map."""
    a = values.detach().abs().flatten().double()
    top = float(torch.quantile(a, PERCENTILE / 100)) if a.numel() <= 16_000_000 else float(a.max())
    return top if top > 0 else float(a.max()) if a.numel() else 0.0


def text_scale(scores: Any, special: Sequence[bool]) -> np.ndarray:
    """Token relevance divided by the largest ``|relevance|`` of the tokens that are not
    ``special``, clipped to [-1, 1] (a special token beyond the scale is shown at full strength)."""
    s = scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, np.float64)
    shown = s[~np.asarray(special, dtype=bool)] if len(special) else s
    m = float(np.abs(shown).max()) if shown.size else 0.0
    return np.clip(s / m, -1.0, 1.0) if m > 0 else np.zeros_like(s)


def token_colour(v: float) -> tuple[float, float, float, float]:
    """The background of a token whose scaled relevance is ``v`` in [-1, 1]: green for the class,
    red against it, opacity ``0.85 * |v|`` (the same in the PNGs, text.html and the terminal)."""
    a = min(abs(float(v)), 1.0) * 0.85
    return (0.0, 0.63, 0.0, a) if v >= 0 else (0.86, 0.0, 0.0, a)


def special_tokens(tokens: Sequence[str], tokenizer: Any) -> list[bool]:
    """Which of ``tokens`` are the tokenizer's special tokens (they never set the colour scale)."""
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    return [t in special for t in tokens]
