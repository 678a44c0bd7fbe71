"""How a model is run for an explanation: the module itself, one call at a time, eager, in a safe dtype.

* :func:`unwrap_model` -- the module inside ``torch.compile`` (``OptimizedModule``),
  ``nn.DataParallel`` and ``DistributedDataParallel`` wrappers: adapters recognise and switch the
  user's own module, whose forward is the eager one;
* :func:`exclusive` -- one explanation of a model at a time: the switches, hooks and casts of a
  call are attributes of the shared model object, so calls from several threads on one model wait
  for each other (a lock per model object); re-entering from the same thread (a target callable
  explaining the same model) raises at once;
* :func:`eager_compiled` -- modules compiled in place (``module.compile()``) run their eager
  forward for the call (``torch.compiler.set_stance("force_eager")``): a compiled graph skips the
  hooks and switches that make attention observable;
* :func:`evaluation_mode` -- every submodule in eval mode, each module's own ``training`` flag
  restored on exit;
* :func:`float32_execution` -- float16 / bfloat16 parameters, buffers and inputs computed in
  float32 and autocast off for the call, for the methods whose maps leave the tolerance in half
  precision (:mod:`attnx.core.precision` chooses). The parameters' own storage is put back on
  exit (bit-exact).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import replace
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import AttnxError, AttnxValueError
from .batch import Batch

__all__ = ["HALF_DTYPES", "eager_compiled", "evaluation_mode", "exclusive", "float32_execution", "is_compiled", "no_autocast", "unwrap_model"]

#: half-precision dtypes (computed in float32 where attnx.core.precision chooses it)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def unwrap_model(model: Any) -> Any:
    """The user's module inside ``torch.compile`` / ``nn.DataParallel`` / ``DistributedDataParallel``
    wrappers (any nesting); other objects are returned as they are."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


# one explanation of a model at a time ----------------------------------------------------------
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


@contextlib.contextmanager
def exclusive(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s explanation lock for the call (other threads explaining it wait)."""
    me = threading.get_ident()
    with _REGISTRY_LOCK:
        lock = _LOCKS.setdefault(model, threading.Lock())
        if _OWNERS.get(model) == me:
            raise AttnxError(
                f"{type(model).__name__} is already being explained in this thread (a target callable or a "
                "hook that explains the same model inside an explanation?); nested explanations of one model "
                "are not supported"
            )
    with lock:
        _OWNERS[model] = me
        try:
            yield
        finally:
            del _OWNERS[model]


# compiled modules --------------------------------------------------------------------------------
_EAGER_LOCK = threading.Lock()
_eager_calls = 0
_eager_stance: Any = None


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule was compiled in place (``module.compile()``)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


@contextlib.contextmanager
def eager_compiled(model: nn.Module) -> Iterator[None]:
    """Run the in-place compiled modules of ``model`` eagerly for the call.

    The dynamo stance is process-wide: while any thread explains a compiled model, compiled code
    elsewhere in the process also runs eagerly (correct, only slower). Counted so that the last of
    several concurrent calls restores the stance found by the first.
    """
    global _eager_calls, _eager_stance
    if not is_compiled(model):
        yield
        return
    with _EAGER_LOCK:
        if _eager_calls == 0:
            _eager_stance = torch.compiler.set_stance("force_eager")
            _eager_stance.__enter__()
        _eager_calls += 1
    try:
        yield
    finally:
        with _EAGER_LOCK:
            _eager_calls -= 1
            if _eager_calls == 0:
                _eager_stance.__exit__(None, None, None)
                _eager_stance = None


# precision ---------------------------------------------------------------------------------------
def _to_float32(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dtype in HALF_DTYPES:
        return v.to(torch.float32)
    return v


@contextlib.contextmanager
def no_autocast(devices: tuple[str, ...] = ("cpu",)) -> Iterator[None]:
    """Autocast off on ``devices`` (and the CPU) for the block: attnx computes in the dtypes it chose."""
    with contextlib.ExitStack() as stack:
        for device in sorted(set(devices) | {"cpu"}):
            if torch.amp.is_autocast_available(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


@contextlib.contextmanager
def float32_execution(model: nn.Module, batch: Batch) -> Iterator[Batch]:
    """Compute ``model`` on ``batch`` in float32 where either is float16 / bfloat16; yields the batch to run.

    Half-precision parameters and buffers get float32 copies as their ``.data`` for the call (the
    parameter objects stay the same; their original storage is put back on exit, so the model is
    bit-exactly as found), half-precision input tensors are cast (the user's tensors are not
    touched), and autocast is off for the call. Models without half-precision tensors run as they are.
    """
    everything = list(model.parameters()) + list(model.buffers())
    offloaded = {str(t.dtype) for t in everything if t.dtype in HALF_DTYPES and t.device.type == "meta"}
    if offloaded:
        raise AttnxValueError(
            f"{type(model).__name__} is offloaded (accelerate) with {', '.join(sorted(offloaded))} weights, which "
            "its hooks load in that dtype at every call; this method is computed in float32 (its maps leave the "
            "tolerance in half precision, or precision='float32' was asked) and offloaded weights cannot be "
            "cast: offload the model in float32 (model.float() before accelerate), or use a method computed in "
            "the model's own precision (docs/large_models.md)"
        )
    tensors = [t for t in everything if t.dtype in HALF_DTYPES]
    saved = []
    with no_autocast(tuple({t.device.type for t in model.parameters()})):
        try:
            for t in tensors:
                saved.append((t, t.data))
                t.data = t.data.to(torch.float32)
            cast = replace(
                batch,
                args=tuple(_to_float32(a) for a in batch.args),
                kwargs={k: _to_float32(v) for k, v in batch.kwargs.items()},
            )
            yield cast
        finally:
            for t, data in reversed(saved):
                t.data = data


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each module's own ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag
