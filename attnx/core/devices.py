"""Device moves of what a pass recorded: a model dispatched over several devices (``accelerate``)
computes each layer where its weights are; the explanation lives with the inputs."""
from __future__ import annotations

import torch

__all__ = ["maybe_on_device", "on_device"]


def on_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """``t`` detached, on the device of the inputs: a model dispatched over several devices
    (``accelerate``) computes each layer where its weights are, the explanation lives with the inputs."""
    t = t.detach()
    return t if device is None else t.to(device)


def maybe_on_device(t: torch.Tensor | None, device: torch.device | None) -> torch.Tensor | None:
    """:func:`on_device`, passing ``None`` (a layer the backward did not reach) through."""
    return None if t is None else on_device(t, device)
