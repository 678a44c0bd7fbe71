"""Transformer Attribution (Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
Visualization", CVPR 2021), and partial LRP (Voita et al. 2019) as in that paper's baselines."""
from __future__ import annotations

import torch

from ..core.layout import Readout
from ..core.trace_types import Needs
from .options import LAYER, PRESET, STRICT
from .propagation import check_start_layer, option_layer, rollout_row
from .registry import Option, Relevance, register_method


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
    first = attention_relevance[s]
    eye = torch.eye(first.shape[-1], dtype=first.dtype, device=first.device)

    product = None  # one buffer for every layer's ∇A ⊙ R^A (a new one per layer costs fresh pages)

    def layer(g, r):
        nonlocal product
        shape, dtype = torch.broadcast_shapes(g.shape, r.shape), torch.result_type(g, r)
        if product is None or product.shape != shape or product.dtype != dtype:
            product = torch.empty(shape, dtype=dtype, device=r.device)
        m = torch.mul(g, r, out=product).clamp_(min=0).mean(dim=1).add_(eye)
        return m / m.sum(dim=-1, keepdim=True) if form == "bert" else m

    row = rollout_row((layer(g, r) for g, r in zip(attentions_grad[s:], attention_relevance[s:])), readout)
    if form == "bert" and readout.protected.any():
        # the readout token's relevance to itself (the identity of the product) is set to the
        # row's minimum over the real tokens (every readout token, for a multi-row readout)
        low = row.masked_fill(~readout.valid, float("inf")).min(dim=-1, keepdim=True).values
        row = torch.where(readout.protected.to(row.device), low.expand_as(row), row)
    return row


def resolve_form(form: str, start_layer: int | None, layout, num_layers: int) -> tuple[str, int]:
    """``(form, start_layer)`` with the defaults filled in: ``auto`` is ``vit`` for images and
    ``bert`` for text; the product starts at layer 0 (vit) or the last layer (bert)."""
    if form == "auto":
        form = "vit" if layout.grid is not None else "bert"
    if start_layer is None:
        start_layer = 0 if form == "vit" else num_layers - 1
    return form, start_layer


def first_attribution_layer(options: dict, layout, num_layers: int) -> int:
    """The first layer of the product (``start_layer``, or its default for the form)."""
    return resolve_form(options["form"], options["start_layer"], layout, num_layers)[1]


@register_method(
    "transformer_attribution",
    reference="Chefer, Gur & Wolf, CVPR 2021",
    needs=Needs(attentions=True, gradients=True, attention_relevance=True),
    options=(
        Option("start_layer", None, "first layer of the product (default: 0 for vit, the last for bert)", kind=int, allow_none=True),
        Option("form", "auto", "vit (no normalisation) or bert (row-normalised); auto: vit for images, bert for text",
               kind=str, choices=("auto", "vit", "bert")),
        PRESET.with_default("chefer2021"),
        STRICT,
    ),
    first_layer=first_attribution_layer,
)
def transformer_attribution(trace, readout, *, start_layer: int | None = None, form: str = "auto") -> Relevance:
    """Transformer Attribution (Chefer et al. CVPR'21): LRP relevance at each attention map,
    weighted by its gradient, positive part averaged over heads, rolled out with the identity.

    ``form``: ``vit`` (no normalisation, default ``start_layer=0``; the paper's ViT evaluation
    uses 1) or ``bert`` (row normalisation, default start at the last layer, readout
    self-relevance set to the row minimum); ``auto`` picks ``vit`` for images, ``bert`` for text.
    """
    form, start_layer = resolve_form(form, start_layer, readout.layout, len(trace.attention_relevance))
    row = attribution_row(trace.gradients, trace.attention_relevance, readout, start_layer, form)
    return Relevance(tokens=row, options={"start_layer": start_layer, "form": form})


@register_method(
    "partial_lrp",
    reference="Voita et al., ACL 2019",
    needs=Needs(attentions=True, attention_relevance=True),
    options=(LAYER, PRESET.with_default("chefer2021"), STRICT),
    first_layer=option_layer("layer"),
)
def partial_lrp(trace, readout, *, layer: int = -1) -> Relevance:
    """Partial LRP (Voita et al. 2019; Chefer et al.'s baseline): relevance at one layer's
    attention probabilities (default the last), positive part averaged over heads, readout row."""
    index = check_start_layer(layer, len(trace.attention_relevance), "layer")
    row = readout.row(trace.attention_relevance[index].clamp(min=0).mean(dim=1))
    return Relevance(tokens=row, options={"layer": layer})
