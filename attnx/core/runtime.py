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
  precision (:mod:`attnx.core.precision` chooses). Each op casts the weights it reads; no float32
  copy of the model is held, and the model is not changed.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import replace
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ..errors import AttnxError
from ..lrp.relay import RecycledBuffers
from .batch import Batch

__all__ = ["CASTS_PER_SHAPE", "HALF_DTYPES", "Float32Compute", "eager_compiled", "evaluation_mode", "exclusive", "float32_execution", "is_compiled", "no_autocast", "unwrap_model"]

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


#: float32 casts of half-precision weights kept for reuse per weight shape under :func:`float32_execution`
#: (the memory estimate counts them: :mod:`attnx.core.model_shape`)
CASTS_PER_SHAPE = 2

#: conversions whose half-precision result is made float32 under :func:`float32_execution`
_CONVERSIONS = frozenset({torch.Tensor.to, torch.Tensor.type, torch.Tensor.type_as, torch.Tensor.half,
                          torch.Tensor.bfloat16})
_IN_PLACE = frozenset({torch.Tensor.__setitem__, torch.Tensor.copy_})
_ALIASES = frozenset({torch.Tensor.detach, torch.Tensor.t})
#: what a tensor is, not what it holds: read from the tensor itself
_METADATA = frozenset({
    torch.Tensor.data_ptr, torch.Tensor.stride, torch.Tensor.storage_offset, torch.Tensor.untyped_storage,
    torch.Tensor.is_contiguous, torch.Tensor.numel, torch.Tensor.nelement, torch.Tensor.dim, torch.Tensor.size,
    torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.__len__, torch.Tensor.__hash__,
    torch.Tensor.requires_grad_,
})


def _any_half(values: Any) -> bool:
    """Whether a half-precision tensor is among ``values`` or the lists in them (``torch.cat``'s)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.dtype in HALF_DTYPES:
                return True
        elif isinstance(v, (list, tuple)) and _any_half(v):
            return True
    return False


class _Recast:
    """A saved tensor that was (a view of) the float32 cast of a half-precision weight: the cast is
    made again when the backward reads it."""

    __slots__ = ("source", "size", "stride", "offset")

    def __init__(self, source: torch.Tensor, like: torch.Tensor) -> None:
        self.source, self.size, self.stride, self.offset = source, like.size(), like.stride(), like.storage_offset()


class Float32Compute(TorchFunctionMode):
    """Every torch function called while active computes in float32: half-precision tensors are
    cast as they enter an op, conversions to a half dtype give float32 and factory functions
    asked for a half dtype make float32 tensors; attributes and metadata (``data_ptr``,
    ``stride``, ...) are read from the tensor itself.

    Everything computed is then float32, so a half-precision tensor reaching an op is a stored
    one: a parameter, a buffer, a constant, a weight an offloading hook has just brought in. Its
    cast is written on recycled pages (:class:`~attnx.lrp.relay.RecycledBuffers`: at most two of
    each shape) and marked; the saved-tensor hooks (:meth:`pack`, :meth:`unpack`) save the mark
    instead of the cast, so that the backward casts again rather than keep it
    (:func:`float32_execution`)."""

    def __init__(self) -> None:
        super().__init__()
        self.casts = RecycledBuffers(keep=CASTS_PER_SHAPE)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA or getattr(func, "__name__", None) == "__get__":  # read, nothing computed
            return func(*args, **kwargs)
        if func in _ALIASES and args[0].dtype in HALF_DTYPES:
            # an alias of a weight (the LRP rules' ``w.detach()``) stays in its dtype: its reader casts it
            return func(*args, **kwargs)
        if func in _CONVERSIONS and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.dtype in HALF_DTYPES and out.dtype != args[0].dtype:
                return args[0].to(device=out.device)  # a computed tensor asked into half precision: kept float32
            return out  # a stored half tensor moved (an offloading hook's) stays as it is
        if func is F.embedding:  # rows looked up in the stored dtype and cast: the same values, no cast of the table
            return self.cast(func(*args, **kwargs))
        if kwargs.get("dtype") in HALF_DTYPES:
            kwargs = {**kwargs, "dtype": torch.float32}
        if not _any_half(args) and not _any_half(kwargs.values()):
            return func(*args, **kwargs)
        if func in _IN_PLACE or getattr(func, "__name__", "").endswith("_"):
            return func(args[0], *tree_map(self.cast, args[1:]), **tree_map(self.cast, kwargs))
        return func(*tree_map(self.cast, args), **tree_map(self.cast, kwargs))

    def cast(self, v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.dtype not in HALF_DTYPES:
            return v
        return self.float32_of(v.detach())  # a stored tensor: cast again in the backward

    def float32_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 cast of a half-precision ``weight`` on recycled pages, marked as its cast."""

        def mark(t: torch.Tensor) -> None:
            t._attnx_float32_of = weight

        if not weight.is_contiguous():
            out = weight.to(torch.float32)
            mark(out)
            return out
        return self.casts.get(weight.shape, torch.float32, weight.device, mark).copy_(weight)

    def pack(self, t: torch.Tensor) -> Any:
        base = t if t._base is None else t._base
        source = getattr(base, "_attnx_float32_of", None)
        if source is None or t.dtype != torch.float32:
            # detached: a saved output kept with its grad_fn would hold its own node (a cycle in
            # the graph that outlives the call)
            return t.detach()
        return _Recast(source, t)

    def unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Recast):
            return saved
        return self.float32_of(saved.source).as_strided(saved.size, saved.stride, saved.offset)


@contextlib.contextmanager
def float32_execution(model: nn.Module, batch: Batch) -> Iterator[Batch]:
    """Compute ``model`` on ``batch`` in float32 where either is float16 / bfloat16; yields the batch to run.

    No float32 copy of the weights is made: half-precision parameters and buffers (and weights an
    offloading hook brings in) are cast to float32 as each op reads them (:class:`Float32Compute`,
    a torch-function mode) and let go after it; autograd saves the cast as a note to cast again
    (saved-tensor hooks), so the backward too holds only the casts it is reading, at most two of
    each weight shape. Half-precision input tensors are cast (the user's tensors are not
    touched), conversions to a half dtype inside the model give float32, and autocast is off for
    the call. The model is not changed. A model without half-precision weights runs as it is,
    autocast off.
    """
    everything = list(model.parameters()) + list(model.buffers())
    half = any(t.dtype in HALF_DTYPES for t in everything)
    with no_autocast(tuple({t.device.type for t in model.parameters()})):
        cast = replace(
            batch,
            args=tuple(_to_float32(a) for a in batch.args),
            kwargs={k: _to_float32(v) for k, v in batch.kwargs.items()},
        )
        if not half:
            yield cast
            return
        compute = Float32Compute()
        with compute, torch.autograd.graph.saved_tensors_hooks(compute.pack, compute.unpack):
            yield cast


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
