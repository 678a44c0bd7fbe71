"""What an adapter was built from: the model's modules and the settings that decide its head.

Adapters read a model once, when they are made (its attention modules, its pooling, its attention
kernel). A user may then replace a block, call timm's ``reset_classifier`` or set a new head.
:class:`ModelStructure` notes the identity of every module (held weakly, so replaced modules are
freed) and those settings; comparing it with the model's current state costs one walk over the
modules, and the :class:`~attnx.Explainer` makes its adapter again when they differ.
"""
from __future__ import annotations

import weakref
from typing import Any

from torch import nn

__all__ = ["ModelStructure"]

#: module attributes that decide what the head reads or how attention is computed
SETTINGS = ("global_pool", "pool_include_prefix", "num_classes", "num_prefix_tokens")


def settings_of(model: nn.Module) -> tuple:
    """The values of :data:`SETTINGS` on every module, and a Hugging Face attention kernel."""
    values: list[Any] = []
    for name, m in model.named_modules():
        for key in SETTINGS:
            v = m.__dict__.get(key)
            if isinstance(v, (str, bool, int, type(None))) and key in m.__dict__:
                values.append((name, key, v))
        config = m.__dict__.get("config")
        impl = getattr(config, "_attn_implementation", None) if config is not None else None
        if isinstance(impl, str):
            values.append((name, "_attn_implementation", impl))
    return tuple(values)


class ModelStructure:
    """The modules of ``model`` (their names and identities) and its head settings, as they are now."""

    def __init__(self, model: nn.Module) -> None:
        named = list(model.named_modules())
        self.names = tuple(name for name, _ in named)
        self.modules = [weakref.ref(m) for _, m in named]
        self.settings = settings_of(model)

    def same_as(self, model: nn.Module) -> bool:
        """Whether ``model`` still has the same modules (the very objects) and settings."""
        named = list(model.named_modules())
        if tuple(name for name, _ in named) != self.names:
            return False
        if any(ref() is not m for ref, (_, m) in zip(self.modules, named)):
            return False
        return settings_of(model) == self.settings
