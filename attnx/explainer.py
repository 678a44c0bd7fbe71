"""Explainer: model + adapter -> Explanation. The public entry point."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .capture import Captured, capture
from .explanation import Explanation
from .layout import Readout, to_scores
from .methods import get_method
from .targets import Target

__all__ = ["Explainer", "explain"]


class Explainer:
    """Explains one model, holding its adapter for repeated calls.

    Parameters
    ----------
    model:
        A stock model: timm / torchvision / Hugging Face ViT or DeiT, a Hugging Face BERT-family
        sequence classifier, or any model whose attention runs through
        ``F.scaled_dot_product_attention`` or ``nn.MultiheadAttention``.
    adapter:
        ``None`` to choose automatically, an adapter name (``"timm_vit"``, ``"torchvision_vit"``,
        ``"hf"``, ``"generic"``) or an :class:`attnx.adapters.Adapter` instance.

    Examples
    --------
    >>> explainer = attnx.Explainer(model)
    >>> e = explainer(images, method="grad_rollout", target=[243, 282])
    >>> e.heatmap().shape  # (B, H, W)
    """

    def __init__(self, model: nn.Module, adapter: str | Adapter | None = None) -> None:
        self.model = model
        self.adapter = get_adapter(model, adapter)

    def capture(self, inputs: Any, target: Target = None, gradients: bool = False) -> Captured:
        """Attentions (and their gradients) of one forward, for users' own methods."""
        return capture(self.adapter, self.adapter.prepare(inputs), target, gradients)

    def explain(self, inputs: Any, method: str = "rollout", target: Target = None, **options: Any) -> Explanation:
        """Explain a batch.

        Parameters
        ----------
        inputs:
            An image batch ``(B, C, H, W)``, or the dict a Hugging Face tokenizer returns.
        method:
            A name from :func:`attnx.methods`.
        target:
            ``None`` (predicted class), an int, ``B`` ints, or a callable on the model output
            returning ``B`` scalars.
        **options:
            Options of the method (e.g. ``head_fusion``, ``discard_ratio``, ``start_layer``).
        """
        spec = get_method(method)
        spec.check_options(options)
        batch = self.adapter.prepare(inputs)
        if spec.kind != "attention":
            return spec.fn(self, batch, target, **options)
        captured = capture(self.adapter, batch, target, gradients=spec.gradients)
        readout = Readout(captured.layout, batch.batch_size, captured.logits.device)
        relevance = spec.fn(captured, readout, **options)
        return self.package(relevance, captured, method, options, batch)

    __call__ = explain

    @staticmethod
    def package(relevance: torch.Tensor, captured: Captured, method: str, options: dict, batch) -> Explanation:
        layout = captured.layout
        ids = batch.kwargs.get("input_ids") if layout.grid is None else None
        return Explanation(
            scores=to_scores(relevance, layout),
            grid=layout.grid,
            targets=captured.targets,
            logits=captured.logits,
            method=method,
            options=dict(options),
            token_relevance=relevance,
            layout=layout,
            input_ids=ids,
        )


def explain(model: nn.Module, inputs: Any, method: str = "rollout", target: Target = None, **options: Any) -> Explanation:
    """Explain ``model`` on ``inputs`` with ``method``; see :meth:`Explainer.explain`."""
    return Explainer(model).explain(inputs, method=method, target=target, **options)
