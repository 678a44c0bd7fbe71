"""attnx: explain stock pretrained Transformers without rewriting them.

>>> import attnx
>>> e = attnx.explain(model, images, method="rollout")
>>> e.scores      # (B, P) relevance per patch / token
>>> e.heatmap()   # (B, H, W) maps at the input size

``import attnx`` loads no torch, transformers, timm or matplotlib: the public names below and the
subpackages (``attnx.zoo``, ``attnx.metrics``, ``attnx.evaluate``, ...) are imported on first use
(PEP 562), so a command that only prints its help starts at once.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ConvergenceWarning, DegenerateMapWarning, NonFiniteMapError, UnsupportedModelError

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and editors
    from . import adapters, methods, metrics
    from .adapters import register_adapter
    from .core import image_text, similarity
    from .core.allocator import reuse_freed_memory
    from .core.explainer import Explainer, explain
    from .core.explanation import Explanation
    from .core.generation import GenerationExplanation, explain_generation
    from .core.image_text import ImageText, ImageTextExplanation
    from .core.memory_estimate import MemoryEstimate, estimate
    from .core.targets import Continuation
    from .core.trace_types import Needs, Trace
    from .methods import Option, Relevance, get_method, list_methods, register_method

__version__ = "0.1.0"

#: public name -> the submodule that defines it, imported when the name is first read
_LAZY_NAMES = {
    "register_adapter": "adapters",
    "reuse_freed_memory": "core.allocator",
    "Explainer": "core.explainer",
    "explain": "core.explainer",
    "Explanation": "core.explanation",
    "estimate": "core.memory_estimate",
    "MemoryEstimate": "core.memory_estimate",
    "GenerationExplanation": "core.generation",
    "explain_generation": "core.generation",
    "ImageText": "core.image_text",
    "ImageTextExplanation": "core.image_text",
    "Option": "methods",
    "Relevance": "methods",
    "get_method": "methods",
    "list_methods": "methods",
    "register_method": "methods",
    "Continuation": "core.targets",
    "Needs": "core.trace_types",
    "Trace": "core.trace_types",
}
#: public submodule name -> where it lives (``attnx.core.similarity`` reads ``attnx.core.similarity``)
_SUBMODULES = {"image_text": "core.image_text", "similarity": "core.similarity"}

__all__ = [
    "Continuation",
    "ConvergenceWarning",
    "DegenerateMapWarning",
    "Explainer",
    "Explanation",
    "GenerationExplanation",
    "ImageText",
    "ImageTextExplanation",
    "MemoryEstimate",
    "Needs",
    "NonFiniteMapError",
    "Option",
    "Relevance",
    "Trace",
    "UnsupportedModelError",
    "adapters",
    "estimate",
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


def __getattr__(name: str) -> Any:
    """Import a public name or a submodule on first use (PEP 562) and keep it."""
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    elif not name.startswith("_"):
        try:
            value = importlib.import_module(f".{_SUBMODULES.get(name, name)}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # a submodule that exists but fails to import
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(__path__)}
    return sorted({*globals(), *__all__, *_LAZY_NAMES, *_SUBMODULES, *submodules})
