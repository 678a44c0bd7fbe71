"""attnx: explain stock pretrained Transformers without rewriting them.

>>> import attnx
>>> e = attnx.explain(model, images, method="rollout")
>>> e.scores      # (B, P) relevance per patch / token
>>> e.heatmap()   # (B, H, W) maps at the input size
"""
from __future__ import annotations

from . import adapters
from .adapters import register_adapter
from .capture import Captured
from .explainer import Explainer, explain
from .explanation import Explanation
from .methods import get_method, method_names, register_method
from . import metrics

__version__ = "0.1.0"

__all__ = [
    "Captured",
    "Explainer",
    "Explanation",
    "adapters",
    "explain",
    "get_method",
    "methods",
    "register_adapter",
    "register_method",
]


def __getattr__(name: str):
    if name == "evaluate":  # attnx.evaluate: the evaluation tables, imported on first use
        import importlib

        return importlib.import_module(".evaluate", __name__)
    raise AttributeError(f"module 'attnx' has no attribute {name!r}")


def methods() -> list[str]:
    """Names of the available explanation methods."""
    return method_names()
