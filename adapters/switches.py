"""Reversible switches that expose attention probabilities, each undone on exit (also on errors).

* ``attribute_switch`` -- set attributes such as timm's ``fused_attn=False`` for the call;
* ``attn_implementation`` -- a Hugging Face model's attention kernel (``eager`` materialises A);
* ``no_new_forward_hooks`` -- drop the output-capturing hooks transformers installs for good;
* ``per_head_weights`` -- ``nn.MultiheadAttention`` asked for per-head weights (``need_weights``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..recorder import AttentionRecorder

__all__ = [
    "attn_implementation",
    "attribute_switch",
    "no_new_forward_hooks",
    "per_head_weights",
    "record_mha_weights",
]


@contextlib.contextmanager
def attribute_switch(items: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    """Set ``obj.name = value`` for each triple, restoring every old value on exit."""
    saved = []
    try:
        for obj, name, value in items:
            saved.append((obj, name, obj.__dict__[name] if name in obj.__dict__ else getattr(obj, name)))
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


def get_attn_implementation(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def set_attn_implementation(model: nn.Module, impl: str | None) -> None:
    if impl is None or get_attn_implementation(model) == impl:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers: the modules read the config at call time
        model.config._attn_implementation = impl


@contextlib.contextmanager
def attn_implementation(model: nn.Module, impl: str) -> Iterator[None]:
    """Switch a Hugging Face model to another attention kernel, restoring the old one on exit."""
    old = get_attn_implementation(model)
    try:
        set_attn_implementation(model, impl)
        yield
    finally:
        set_attn_implementation(model, old)


_HOOKED_MARK = "_output_capturing_hooks_installed"


@contextlib.contextmanager
def no_new_forward_hooks(model: nn.Module) -> Iterator[None]:
    """Remove the forward hooks a call adds to ``model`` and its submodules.

    With ``output_attentions=True`` transformers 5 installs its output-capturing forward hooks on
    the first call and keeps them for good (marking the model with ``_output_capturing_hooks_installed``);
    explaining must leave the model as it was found.
    """
    before = {m: set(m._forward_hooks) for m in model.modules()}
    marked = {m for m in model.modules() if _HOOKED_MARK in m.__dict__}
    try:
        yield
    finally:
        for m in model.modules():
            for key in set(m._forward_hooks) - before.get(m, set()):
                for hooks in (m._forward_hooks, m._forward_hooks_with_kwargs, m._forward_hooks_always_called):
                    hooks.pop(key, None)
            if m not in marked and _HOOKED_MARK in m.__dict__:
                del m.__dict__[_HOOKED_MARK]


def record_mha_weights(recorder: AttentionRecorder, weights: torch.Tensor) -> None:
    """Record the per-head weights returned by ``F.multi_head_attention_forward``.

    The returned ``(B, H, L, S)`` tensor is a view; its base ``(B*H, L, S)`` is the tensor the
    attention product used, so gradients are taken with respect to the base.
    """
    base = weights._base if weights._base is not None else weights
    if base.numel() != weights.numel():
        base = weights
    recorder.record(weights, grad_wrt=base)


@contextlib.contextmanager
def per_head_weights(modules: list[nn.MultiheadAttention], recorder: AttentionRecorder) -> Iterator[None]:
    """Make ``nn.MultiheadAttention`` modules return and record per-head attention weights."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        module_wants = (kwargs.get("need_weights", True), kwargs.get("average_attn_weights", True))
        kwargs["need_weights"] = True
        kwargs["average_attn_weights"] = False
        wanted[module] = module_wants
        return args, kwargs

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        out, weights = output
        record_mha_weights(recorder, weights)
        need, average = wanted.pop(module)
        if not need:
            return out, None
        return out, (weights.mean(dim=1) if average else weights)

    wanted: dict[nn.Module, tuple[bool, bool]] = {}
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
