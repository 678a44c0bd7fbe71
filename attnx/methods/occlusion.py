"""Occlusion (Zeiler & Fergus, ECCV 2014), computed by captum.

Each window ``w`` of the explained input is replaced by a baseline, and the drop of the explained
scalar ``F = y_t`` is given to every element of the window::

    R_i = F(x) − F(x with the window containing i replaced)

(captum's ``Occlusion`` with non-overlapping windows, computed as captum's ``FeatureAblation`` with
one feature per window, the same numbers; ``Occlusion`` divides by its window counts in float32,
``FeatureAblation`` keeps a float64 model's precision). The windows are the model's own units:

* **images**: one patch of the model's grid at a time (all channels), replaced by zero pixels in
  the model's input space (the dataset's mean colour for mean/std-normalised inputs);
* **text**: one token at a time, its embedding (the output of the token embeddings) replaced by
  zeros (``baseline="zeros"``) or by the padding token's embedding (``baseline="pad"``,
  ``config.pad_token_id``). Padding tokens occlude to no change.

``Explanation.input_relevance`` holds captum's attribution ``(B, C, H, W)`` / ``(B, T, D)``; the
scores are its mean over each patch and the channels, resp. over the hidden dimension: exactly
``F(x) − F(x_w)`` per patch or token. The pixel map spreads each patch's drop evenly over its
pixels (they sum to the patch's score, as the pixels of ``gradient_x_input`` do). Cost: one forward of the batch per patch or token (no
backward), run in chunks of whole copies of the batch, plus one for ``F(x)``.
"""
from __future__ import annotations

import torch

from ..core.trace_types import Needs
from ..errors import AttnxValueError
from .integrated_gradients import BASELINE, baseline_inputs
from .lrp import pool_to_grid
from .registry import Relevance, register_method

__all__ = ["occlusion", "window_ids", "window_of"]


def window_ids(x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """The feature mask of the windows: ``(1, 1, H, W)`` patch index per pixel, ``(1, T, 1)`` token index."""
    if x.dim() == 4:
        H, W = x.shape[-2:]
        rows = torch.arange(H, device=x.device) // window[1]
        cols = torch.arange(W, device=x.device) // window[2]
        return (rows[:, None] * (W // window[2]) + cols[None, :])[None, None]
    return torch.arange(x.shape[1], device=x.device)[None, :, None]


def window_of(x: torch.Tensor, grid: tuple[int, int] | None) -> tuple[int, ...]:
    """The occluded window: ``(C, H/h, W/w)`` (one patch of the grid) or ``(1, D)`` (one token)."""
    if x.dim() == 4:
        if grid is None:
            raise AttnxValueError("occlusion of an image model needs its patch grid (pass patch_size)")
        H, W = x.shape[-2:]
        if H % grid[0] or W % grid[1]:
            raise AttnxValueError(f"the patch grid {grid} does not tile {H}x{W} images")
        return (x.shape[1], H // grid[0], W // grid[1])
    return (1, x.shape[-1])


@register_method(
    "occlusion",
    reference="Zeiler & Fergus, ECCV 2014 (captum Occlusion / FeatureAblation; exact: captum on the same forward)",
    needs=Needs(forward=True),
    options=(BASELINE,),
)
def occlusion(trace, readout, *, baseline: str = "zeros") -> Relevance:
    """Occlusion: ``y_t(x) − y_t(x with one patch / token replaced)`` for every patch or token (captum).

    Zeiler & Fergus 2014 with captum (``FeatureAblation`` over non-overlapping windows): one patch of the model's grid (images, zero
    pixels) or one token's embedding (text, zeros or the padding token's embedding) at a time.
    """
    from captum.attr import FeatureAblation

    forward = trace.forward
    x = forward.inputs()
    if baseline == "pad" and x.dim() == 4:
        raise AttnxValueError("baseline='pad' replaces token embeddings; images are occluded with zeros")
    window = window_of(x, trace.layout.grid)
    reference = baseline_inputs(forward, x, baseline)
    with forward.held(), torch.no_grad():
        attributions = FeatureAblation(forward).attribute(
            x, baselines=reference, feature_mask=window_ids(x, window), perturbations_per_eval=forward.copies_per_chunk(),
        )
    trace.input_relevance = attributions.detach()
    options = {"baseline": baseline}
    if x.dim() == 4:  # each patch's drop spread evenly over its pixels: a patch's pixels sum to its drop
        pixels = attributions.mean(dim=1) / (window[1] * window[2])
        return Relevance(scores=pool_to_grid(pixels, trace.layout.grid), pixels=pixels, options=options)
    return Relevance(tokens=attributions.mean(dim=-1), options=options)
