"""attnx: explain stock pretrained Transformers without rewriting them.

>>> import attnx
>>> e = attnx.explain(model, images, method="rollout")
>>> e.scores      # (B, P) relevance per patch / token
>>> e.heatmap()   # (B, H, W) maps at the input size
"""
from __future__ import annotations

from . import adapters, image_text, methods, metrics, similarity
from .adapters import register_adapter
from .allocator import reuse_freed_memory
from .errors import DegenerateMapWarning, NonFiniteMapError, UnsupportedModelError
from .explainer import Explainer, explain
from .explanation import Explanation
from .generation import GenerationExplanation, explain_generation
from .image_text import ImageText, ImageTextExplanation
from .methods import Option, Relevance, get_method, list_methods, register_method
from .targets import Continuation
from .trace import Needs, Trace

__version__ = "0.1.0"

__all__ = [
    "DegenerateMapWarning",
    "Continuation",
    "Explainer",
    "Explanation",
    "GenerationExplanation",
    "ImageText",
    "ImageTextExplanation",
    "Needs",
    "NonFiniteMapError",
    "Option",
    "Relevance",
    "Trace",
    "UnsupportedModelError",
    "adapters",
    "explain",
    "explain_generation",
    "get_method",
    "image_text",
    "list_methods",
    "methods",
    "metrics",
    "register_adapter",
    "register_method",
    "reuse_freed_memory",
    "similarity",
]


def __getattr__(name: str):
    if name == "evaluate":  # attnx.evaluate: the evaluation tables, imported on first use
        import importlib

        return importlib.import_module(".evaluate", __name__)
    raise AttributeError(f"module 'attnx' has no attribute {name!r}")
