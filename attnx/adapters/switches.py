"""Reversible switches that expose attention probabilities, each undone on exit (also on errors).

* ``attribute_switch`` -- set attributes such as timm's ``fused_attn=False`` for the call;
* ``attn_implementation`` -- a Hugging Face model's attention kernel (``eager`` materialises A);
* ``no_new_forward_hooks`` -- drop the output-capturing hooks transformers installs for good;
* ``per_head_weights`` -- ``nn.MultiheadAttention`` asked for per-head weights (``need_weights``);
* ``lifted_offload_hooks`` -- ``accelerate``'s offload hooks run as module hooks around every other
  hook, so that rules reading a module's weights after its forward see them loaded;
* ``no_gradient_checkpointing`` -- Hugging Face / timm gradient checkpointing off for the call;
* ``checkpointed_layers`` -- the layers the user's gradient checkpointing recomputes;
* ``plain_execution`` -- the model computes as the plain model does: offload hooks lifted, and
  gradient checkpointing either off or kept on through attnx's own (:mod:`attnx.core.checkpointing`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..core.checkpointing import checkpointed
from ..core.recorder import AttentionRecorder

__all__ = [
    "attn_implementation",
    "attribute_switch",
    "checkpointed_layers",
    "lifted_offload_hooks",
    "no_gradient_checkpointing",
    "no_new_forward_hooks",
    "per_head_weights",
    "plain_execution",
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


#: the flags that switch gradient checkpointing on: Hugging Face layers and models, timm models
CHECKPOINT_FLAGS = ("gradient_checkpointing", "grad_checkpointing")


@contextlib.contextmanager
def no_gradient_checkpointing(model: nn.Module) -> Iterator[None]:
    """Switch gradient checkpointing off in ``model`` for the call, restoring every flag on exit.

    A checkpointed block keeps no activations and re-runs its forward during the backward; the
    re-run would record its attentions and apply its LRP rules a second time, outside the
    forward that the relevance pass observes. Explaining needs one forward with its graph.
    """
    saved: list[tuple[nn.Module, str, bool, Any]] = []
    try:
        for m in model.modules():
            for flag in CHECKPOINT_FLAGS:
                if isinstance(getattr(type(m), flag, None), property):
                    continue  # a derived view (e.g. is_gradient_checkpointing), not the flag itself
                if getattr(m, flag, None) is True:
                    own = flag in m.__dict__
                    saved.append((m, flag, own, m.__dict__.get(flag)))
                    setattr(m, flag, False)
        yield
    finally:
        for m, flag, own, old in reversed(saved):
            if own:
                setattr(m, flag, old)
            else:
                m.__dict__.pop(flag, None)


def offload_hooked(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that carry an ``accelerate`` hook (``dispatch_model``,
    ``cpu_offload``, ``disk_offload``, ``device_map=...``) wrapped around their forward."""
    return [
        m for m in model.modules()
        if getattr(m, "_hf_hook", None) is not None and "_old_forward" in m.__dict__ and "forward" in m.__dict__
    ]


@contextlib.contextmanager
def lifted_offload_hooks(model: nn.Module) -> Iterator[None]:
    """Run ``accelerate``'s hooks as the outermost module hooks for the call.

    ``accelerate`` wraps a module's ``forward``: its weights are moved in from the ``meta``
    device (CPU or disk offload) just before the forward and out again just after it, inside the
    module call. Module hooks registered by attnx (LRP rules) then see ``meta`` weights. While
    this switch is on, the wrapped ``forward`` is the module's own and the same hook runs as a
    forward pre-hook placed before, and a forward hook placed after, every hook registered
    earlier (call it inside other hook-registering contexts). Restored on exit.
    """
    handles = []
    wrapped: list[tuple[nn.Module, Any]] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return module._hf_hook.pre_forward(module, *args, **kwargs)

    def post_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return module._hf_hook.post_forward(module, output)

    try:
        for m in offload_hooked(model):
            if getattr(m._hf_hook, "no_grad", False):
                continue  # a forward the user runs without gradients: leave it wrapped
            wrapped.append((m, m.__dict__["forward"]))
            m.forward = m._old_forward
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
            handles.append(m.register_forward_hook(post_hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, forward in wrapped:
            m.forward = forward


def checkpoint_flag_on(m: nn.Module) -> bool:
    return any(
        getattr(m, flag, None) is True and not isinstance(getattr(type(m), flag, None), property)
        for flag in CHECKPOINT_FLAGS
    )


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The modules the user's gradient checkpointing recomputes one at a time.

    The innermost modules whose flag is on (a Hugging Face decoder or encoder layer, not the
    encoder around it); where such a module holds its layers in ``blocks`` (timm's
    ``VisionTransformer``, a Swin stage: the flag is the container's), each of those blocks.
    """
    flagged = [m for m in model.modules() if checkpoint_flag_on(m)]
    inner = [m for m in flagged if not any(checkpoint_flag_on(d) for d in list(m.modules())[1:])]
    layers: list[nn.Module] = []
    for m in inner:
        blocks = getattr(m, "blocks", None)
        layers.extend(blocks.children() if isinstance(blocks, nn.Module) else [m])
    return layers


@contextlib.contextmanager
def plain_execution(model: nn.Module, keep_checkpointing: bool = False) -> Iterator[None]:
    """A forward that computes as the plain model does, ``accelerate``'s offload hooks lifted
    (:func:`lifted_offload_hooks`). Gradient checkpointing is switched off
    (:func:`no_gradient_checkpointing`); with ``keep_checkpointing`` the layers the user checkpoints
    are recomputed instead by :func:`attnx.core.checkpointing.checkpointed` (the backward must then
    run inside this context, under the same hooks and switches as the forward)."""
    layers = checkpointed_layers(model) if keep_checkpointing else []
    with no_gradient_checkpointing(model), lifted_offload_hooks(model), checkpointed(layers):
        yield
