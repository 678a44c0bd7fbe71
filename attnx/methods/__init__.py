"""Explanation methods, looked up by name.

A method is a pure function over captured tensors::

    fn(captured: Captured, readout: Readout, **options) -> torch.Tensor  # (B, N) token relevance

``captured.attentions`` holds the post-softmax attention ``A`` of every layer as ``(B, H, N, N)``;
``captured.gradients`` holds ``dy_t/dA`` when the method was registered with ``gradients=True``.
The returned row is the relevance of every token for the readout (class) token; attnx turns it
into content scores and heat maps. Add your own with :func:`register_method`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Method", "get_method", "method_names", "register_method"]


@dataclass(frozen=True)
class Method:
    """A registered explanation method."""

    name: str
    fn: Callable[..., Any]
    gradients: bool = False
    kind: str = "attention"  # "attention": needs captured A (and dy/dA); others are run by their own engine
    summary: str = ""
    options: dict = field(default_factory=dict)

    def check_options(self, options: dict) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "none"
            raise TypeError(f"method {self.name!r} got unknown option(s) {unknown}; its options: {known}")


_METHODS: dict[str, Method] = {}


def register_method(
    name: str, *, gradients: bool = False, kind: str = "attention", summary: str | None = None
) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as the method ``name`` (overriding any earlier one)."""

    def deco(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters.values())[2:]
        # methods run by their own engine take (explainer, batch, target, ...): the target is not an option
        options = {p.name: p.default for p in params
                   if (p.kind == p.KEYWORD_ONLY or p.default is not p.empty) and not (kind != "attention" and p.name == "target")}
        doc = summary if summary is not None else (inspect.getdoc(fn) or "").split("\n")[0]
        _METHODS[name] = Method(name, fn, gradients, kind, doc, options)
        return fn

    return deco


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {method_names()}")
    return _METHODS[name]


def method_names() -> list[str]:
    return list(_METHODS)


# the built-in methods register themselves on import
from . import raw, rollout, grad_rollout, generic, gradcam, transformer_attribution, lrp, attention_flow, baselines  # noqa: E402,F401
