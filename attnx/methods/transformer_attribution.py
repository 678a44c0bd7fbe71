"""Transformer Attribution (Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
Visualization", CVPR 2021), and partial LRP (Voita et al. 2019) as in that paper's baselines."""
from __future__ import annotations

import torch

from ..capture import capture
from ..explanation import Explanation
from ..layout import Readout, to_scores
from ..lrp.passes import relevance_pass
from . import register_method
from .fusion import check_start_layer, rollout_row


def attribution_row(
    attentions_grad: list[torch.Tensor],
    attention_relevance: list[torch.Tensor],
    readout: Readout,
    start_layer: int,
    form: str,
) -> torch.Tensor:
    """Eq. 13-14 of the paper: ``Ā_b = E_h[(∇A_b ⊙ R^(A_b))⁺]``, ``C = (Ā_L + I) ... (Ā_s + I)``.

    ``form="vit"``: no normalisation (the reference ViT code). ``form="bert"``: every ``Ā_b + I``
    is row-normalised and the readout token's relevance to itself is set to the minimum of its
    row over the real tokens (the reference BERT code).
    """
    s = check_start_layer(start_layer, len(attention_relevance))
    eye = torch.eye(attention_relevance[0].shape[-1], dtype=attention_relevance[0].dtype, device=attention_relevance[0].device)

    def layer(g, r):
        m = (g * r).clamp(min=0).mean(dim=1) + eye
        return m / m.sum(dim=-1, keepdim=True) if form == "bert" else m

    row = rollout_row((layer(g, r) for g, r in zip(attentions_grad[s:], attention_relevance[s:])), readout)
    if form == "bert" and readout.index is not None:
        masked = row.masked_fill(~readout.valid, float("inf"))
        row = row.clone()
        row[:, readout.index] = masked.min(dim=-1).values
    return row


def _form(form: str, layout) -> str:
    if form == "auto":
        return "vit" if layout.grid is not None else "bert"
    if form not in ("vit", "bert"):
        raise ValueError(f"form must be 'auto', 'vit' or 'bert', got {form!r}")
    return form


@register_method("transformer_attribution", kind="lrp")
def transformer_attribution(
    explainer, batch, target=None, *, start_layer: int | None = None, form: str = "auto", preset="chefer2021", strict: bool = False
) -> Explanation:
    """Transformer Attribution (Chefer et al. CVPR'21): LRP relevance at each attention map,
    weighted by its gradient, positive part averaged over heads, rolled out with the identity.

    ``form``: ``vit`` (no normalisation, default ``start_layer=0``; the paper's ViT evaluation
    uses 1) or ``bert`` (row normalisation, default start at the last layer, readout
    self-relevance set to the row minimum); ``auto`` picks ``vit`` for images, ``bert`` for text.
    """
    adapter = explainer.adapter
    plain = capture(adapter, batch, target, gradients=True)
    lrp = relevance_pass(adapter, batch, plain.targets, preset, attentions=True, strict=strict)
    layout = plain.layout
    form = _form(form, layout)
    if start_layer is None:
        start_layer = 0 if form == "vit" else len(plain.attentions) - 1
    readout = Readout(layout, batch.batch_size, plain.logits.device)
    row = attribution_row(plain.gradients, lrp.attention_relevance, readout, start_layer, form)
    options = {"start_layer": start_layer, "form": form, "preset": getattr(preset, "name", preset)}
    return explainer.package(row, plain, "transformer_attribution", options, batch)


@register_method("partial_lrp", kind="lrp")
def partial_lrp(explainer, batch, target=None, *, layer: int = -1, preset="chefer2021", strict: bool = False) -> Explanation:
    """Partial LRP (Voita et al. 2019; Chefer et al.'s baseline): relevance at one layer's
    attention probabilities (default the last), positive part averaged over heads, readout row."""
    lrp = relevance_pass(explainer.adapter, batch, target, preset, attentions=True, strict=strict)
    index = check_start_layer(layer, len(lrp.attention_relevance))
    readout = Readout(lrp.layout, batch.batch_size, lrp.logits.device)
    row = readout.row(lrp.attention_relevance[index].clamp(min=0).mean(dim=1))
    return _package(explainer, row, lrp, "partial_lrp", {"layer": layer, "preset": getattr(preset, "name", preset)}, batch)


def _package(explainer, row, lrp, method, options, batch) -> Explanation:
    from ..capture import Captured

    captured = Captured(lrp.attentions or [], None, lrp.logits, lrp.targets, lrp.layout)
    return explainer.package(row, captured, method, options, batch)
