"""attnx: explain stock pretrained Transformers without rewriting them.

>>> import attnx
>>> e = attnx.explain(model, images, method="rollout")
>>> e.scores      # (B, P) relevance per patch / token
>>> e.heatmap()   # (B, H, W) maps at the input size
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below are imported on first use (``import attnx`` stays light)
    from attnx import adapters, image_text, methods, metrics, similarity
    from attnx.adapters import register_adapter
    from attnx.allocator import reuse_freed_memory
    from attnx.errors import DegenerateMapWarning, NonFiniteMapError, UnsupportedModelError
    from attnx.explainer import Explainer, explain
    from attnx.explanation import Explanation
    from attnx.image_text import ImageText, ImageTextExplanation
    from attnx.methods import Option, Relevance, get_method, list_methods, register_method
    from attnx.targets import Continuation
    from attnx.trace import Needs, Trace

#: public name -> the module that defines it (a submodule when the name is the module itself)
_LAZY = {
    "adapters": ".adapters", "image_text": ".image_text", "methods": ".methods", "metrics": ".metrics",
    "similarity": ".similarity", "evaluate": ".evaluate",
    "register_adapter": ".adapters", "reuse_freed_memory": ".allocator",
    "DegenerateMapWarning": ".errors", "NonFiniteMapError": ".errors", "UnsupportedModelError": ".errors",
    "Explainer": ".explainer", "explain": ".explainer", "Explanation": ".explanation",
    "ImageText": ".image_text", "ImageTextExplanation": ".image_text",
    "Option": ".methods", "Relevance": ".methods", "get_method": ".methods", "list_methods": ".methods",
    "register_method": ".methods", "Continuation": ".targets", "Needs": ".trace", "Trace": ".trace",
}

__version__ = "0.1.0"

__all__ = [
    "DegenerateMapWarning",
    "Continuation",
    "Explainer",
    "Explanation",
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
    """The public names, imported on first use: ``import attnx`` loads no torch (``attnx --help``
    starts at once); ``attnx.Explainer`` imports the core."""
    if name not in _LAZY:
        raise AttributeError(f"module 'attnx' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name], __name__)
    value = module if _LAZY[name] == f".{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
