"""Errors and warnings that name what attnx expected, raised where a model or an input cannot be
explained, or where an explanation would be silently meaningless."""
from __future__ import annotations

__all__ = ["UnsupportedModelError", "DegenerateMapWarning", "NonFiniteMapError"]


class UnsupportedModelError(TypeError):
    """Raised when no adapter can make a model's attention observable."""


class DegenerateMapWarning(UserWarning):
    """A method gave a sample a constant or all-zero map: it shows nothing (the message names the
    method, the samples and the likely cause)."""


class NonFiniteMapError(ValueError):
    """A method gave a sample NaN or infinite relevance."""
