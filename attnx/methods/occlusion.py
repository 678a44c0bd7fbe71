"""Occlusion (Zeiler & Fergus, ECCV 2014), computed by captum.

Each window ``w`` of the explained input is replaced by a baseline, and the drop of the explained
scalar ``F = y_t`` is given to every element of the window::

    R_i = F(x) − F(x with the window containing i replaced)

(``captum.attr.Occlusion`` with non-overlapping windows: each element lies in one window). The
windows are the model's own units:

* **images**: one patch of the model's grid at a time (all channels), replaced by zero pixels in
  the model's input space (the dataset's mean colour for mean/std-normalised inputs);
* **text**: one token at a time, its embedding (the output of the token embeddings) replaced by
  zeros (``baseline="zeros"``) or by the padding token's embedding (``baseline="pad"``,
  ``config.pad_token_id``). Padding tokens occlude to no change.

``Explanation.input_relevance`` holds captum's attribution ``(B, C, H, W)`` / ``(B, T, D)``; the
scores are its mean over each patch and the channels, resp. over the hidden dimension: exactly
``F(x) − F(x_w)`` per patch or token. Cost: one forward of the batch per patch or token (no
backward), run in chunks of whole copies of the batch, plus one for ``F(x)``.
"""
from __future__ import annotations

import torch

from ..core.trace_types import Needs
from ..errors import AttnxValueError
from .integrated_gradients import BASELINE, baseline_inputs
from .registry import Relevance, register_method

__all__ = ["occlusion", "window_of"]


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
    reference="Zeiler & Fergus, ECCV 2014 (captum Occlusion; exact: captum on the same forward)",
    needs=Needs(forward=True),
    options=(BASELINE,),
)
def occlusion(trace, readout, *, baseline: str = "zeros") -> Relevance:
    """Occlusion: ``y_t(x) − y_t(x with one patch / token replaced)`` for every patch or token (captum).

    Zeiler & Fergus 2014 with captum's ``Occlusion``: one patch of the model's grid (images, zero
    pixels) or one token's embedding (text, zeros or the padding token's embedding) at a time.
    """
    from captum.attr import Occlusion

    forward = trace.forward
    x = forward.inputs()
    if baseline == "pad" and x.dim() == 4:
        raise AttnxValueError("baseline='pad' replaces token embeddings; images are occluded with zeros")
    window = window_of(x, trace.layout.grid)
    reference = baseline_inputs(forward, x, baseline)
    with forward.held(), torch.no_grad():
        attributions = Occlusion(forward).attribute(
            x, sliding_window_shapes=window, strides=window, baselines=reference,
            perturbations_per_eval=forward.copies_per_chunk(),
        )
    trace.input_relevance = attributions.detach()
    options = {"baseline": baseline}
    if x.dim() == 4:
        pixels = attributions.mean(dim=1)
        scores = torch.nn.functional.avg_pool2d(pixels[:, None], window[1:]).flatten(1)
        return Relevance(scores=scores, pixels=pixels, options=options)
    return Relevance(tokens=attributions.mean(dim=-1), options=options)
