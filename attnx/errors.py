"""Errors that name what attnx expected, raised where a model or an input cannot be explained."""
from __future__ import annotations

__all__ = ["UnsupportedModelError"]


class UnsupportedModelError(TypeError):
    """Raised when no adapter can make a model's attention observable."""
