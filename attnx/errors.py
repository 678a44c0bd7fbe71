"""Errors and warnings that name what attnx expected, raised where a model or an input cannot be
explained, or where an explanation would be silently meaningless."""
from __future__ import annotations

__all__ = ["UnsupportedModelError", "DegenerateMapWarning", "NonFiniteMapError"]


class AttnxError(Exception):
    """Base of the errors attnx raises on purpose, with a message saying what was expected."""


class AttnxValueError(AttnxError, ValueError):
    """A value attnx cannot use: an input of the wrong shape, an option out of range, ..."""


class AttnxTypeError(AttnxError, TypeError):
    """A value of the wrong type: a list where a tensor was expected, a float for an int, ..."""


class UnsupportedModelError(AttnxError, TypeError):
    """Raised when no adapter can make a model's attention observable."""


class DegenerateMapWarning(UserWarning):
    """A method gave a sample a constant or all-zero map: it shows nothing (the message names the
    method, the samples and the likely cause)."""


class NonFiniteMapError(ValueError):
    """A method gave a sample NaN or infinite relevance."""
