"""Architecture adapters: everything attnx knows about particular model families.

Adapters are looked up in registration order; the first whose ``matches(model)`` is true is
used. The ``intercept`` adapter (attention kernels intercepted, see :mod:`.kernels`) is the
fallback and can be forced with ``adapter="intercept"``. Register your own with
:func:`register_adapter`.
"""
from __future__ import annotations

import warnings

from torch import nn

from ..errors import AttnxTypeError, AttnxValueError, UnsupportedModelError
from .base import Adapter
from .dual_encoder import DualEncoderAdapter, HFDualEncoderAdapter, OpenCLIPAdapter
from .hf import HFAdapter
from .hf_decoder import HFDecoderAdapter
from .intercept import InterceptAdapter
from .swin import HFSwinAdapter, TimmSwinAdapter
from .timm_vit import TimmViTAdapter
from .torchvision_vit import TorchvisionViTAdapter

__all__ = [
    "Adapter",
    "DualEncoderAdapter",
    "HFDualEncoderAdapter",
    "OpenCLIPAdapter",
    "HFAdapter",
    "HFDecoderAdapter",
    "HFSwinAdapter",
    "InterceptAdapter",
    "TimmSwinAdapter",
    "TimmViTAdapter",
    "TorchvisionViTAdapter",
    "adapter_names",
    "get_adapter",
    "register_adapter",
]

_REGISTRY: dict[str, type[Adapter]] = {}
#: the fallback adapter's former name, still accepted
DEPRECATED_NAMES = {"generic": InterceptAdapter.name}


def register_adapter(cls: type[Adapter], *, first: bool = False) -> type[Adapter]:
    """Register an adapter class (usable as a decorator). ``first=True`` gives it priority."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise AttnxTypeError(f"expected an Adapter subclass, got {cls!r}")
    global _REGISTRY
    _REGISTRY.pop(cls.name, None)
    _REGISTRY = {cls.name: cls, **_REGISTRY} if first else {**_REGISTRY, cls.name: cls}
    return cls


for _cls in (TimmViTAdapter, TimmSwinAdapter, TorchvisionViTAdapter, HFDualEncoderAdapter, OpenCLIPAdapter, HFDecoderAdapter, HFSwinAdapter, HFAdapter):
    register_adapter(_cls)


def adapter_names() -> list[str]:
    """Names of the registered adapters, in lookup order, then ``intercept``."""
    return [*_REGISTRY, InterceptAdapter.name]


def family_adapter(model: nn.Module) -> Adapter | None:
    """The first registered adapter that matches ``model``, or ``None``."""
    for cls in _REGISTRY.values():
        if cls.matches(model):
            return cls(model)
    return None


def get_adapter(model: nn.Module, adapter: str | Adapter | None = None) -> Adapter:
    """Select the adapter for ``model``.

    ``adapter`` may be ``None`` (automatic: the first matching adapter, else ``intercept``), the
    name of a registered adapter, ``"intercept"``, or an ``Adapter`` instance.
    """
    if not isinstance(model, nn.Module):
        raise AttnxTypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(adapter, Adapter):
        return adapter
    if adapter is None:
        return family_adapter(model) or InterceptAdapter(model)
    if adapter in DEPRECATED_NAMES:
        warnings.warn(
            f"adapter={adapter!r} is now called {DEPRECATED_NAMES[adapter]!r}", DeprecationWarning, stacklevel=3
        )
        adapter = DEPRECATED_NAMES[adapter]
    if adapter == InterceptAdapter.name:
        return InterceptAdapter(model, layout_from=family_adapter(model))
    if adapter not in _REGISTRY:
        raise AttnxValueError(f"unknown adapter {adapter!r}; available: {adapter_names()}")
    cls = _REGISTRY[adapter]
    if not cls.matches(model):
        raise UnsupportedModelError(f"adapter {adapter!r} does not apply to {type(model).__name__}")
    return cls(model)
