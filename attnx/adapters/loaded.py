"""Classes of model libraries, looked up only once the library is in use.

A model of a library can only exist once that library was imported, so an adapter's ``matches``
asks :data:`sys.modules` instead of importing timm, transformers or torchvision itself: explaining
a timm model never pays for importing transformers, and ``import attnx.adapters`` stays fast.
"""
from __future__ import annotations

import sys

__all__ = ["loaded_class"]


def loaded_class(module: str, name: str) -> type | None:
    """``module.name`` if ``module`` was imported already, else ``None`` (no model of it can exist)."""
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None
