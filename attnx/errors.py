"""Errors and warnings that name what attnx expected.

Every error attnx raises on purpose (a bad input, an option out of range, a model it cannot
explain, a meaningless map) is an :class:`AttnxError`; the command line prints those as one line,
and anything else (a bug) with its traceback. The concrete classes also derive from the built-in
exception a user would catch (``ValueError``, ``TypeError``, ``RuntimeError``).
"""
from __future__ import annotations

__all__ = [
    "AttnxError",
    "AttnxTypeError",
    "AttnxValueError",
    "ConvergenceWarning",
    "DegenerateMapWarning",
    "ForwardMismatchError",
    "InsufficientMemoryError",
    "NonFiniteMapError",
    "NonFiniteOutputError",
    "ReadoutMismatchError",
    "UnsupportedModelError",
]


class AttnxError(Exception):
    """Base of the errors attnx raises on purpose, with a message saying what was expected."""


class AttnxValueError(AttnxError, ValueError):
    """A value attnx cannot use: an input of the wrong shape, an option out of range, ..."""


class AttnxTypeError(AttnxError, TypeError):
    """A value of the wrong type: a list where a tensor was expected, a float for an int, ..."""


class UnsupportedModelError(AttnxError, TypeError):
    """Raised when no adapter can make a model's attention observable."""


class ForwardMismatchError(UnsupportedModelError):
    """Raised when the forward attnx explains (attention made observable) does not compute the
    model's own logits, and no path that keeps the model's computation does (see
    :mod:`attnx.core.forward_check`)."""


class InsufficientMemoryError(AttnxError, MemoryError):
    """A call's estimated peak memory exceeds what the device has free (see
    :func:`attnx.estimate`); raised before the pass allocates anything."""


class DegenerateMapWarning(UserWarning):
    """A method gave a sample a constant or all-zero map: it shows nothing (the message names the
    method, the samples and the likely cause)."""


class ConvergenceWarning(UserWarning):
    """A path integral (integrated gradients) missed the total it claims by more than its tolerance:
    its quadrature did not converge, so the map is not the method's."""


class NonFiniteMapError(AttnxError, ValueError):
    """A method gave a sample NaN or infinite relevance."""


class NonFiniteOutputError(AttnxValueError):
    """The explained output of the model is NaN or infinite for some samples."""


class ReadoutMismatchError(UnsupportedModelError):
    """The rows an adapter declares the head reads are not those the target's gradient reaches
    (see :mod:`attnx.core.readout`)."""
