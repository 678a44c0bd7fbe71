"""The relay: an op's output whose backward is a rule, and the one forward that serves two backwards.

Under the gradient x input convention (DESIGN §5) a rule replaces the backward of one op: it
receives the modified gradient ``g̃`` of the op's output and returns ``g̃`` of its
relevance-carrying inputs. :func:`relay` builds that edge. Two things make one forward enough for
methods that need both the plain gradient ``dy/dA`` and relevance (Transformer Attribution):

* the relay keeps the op's real output, with its autograd graph, as an extra input; a
  :class:`Propagation` switch read by the relay's backward sends the incoming gradient either into
  that real graph (``relevance = False``: the model's own backward, exactly ``dy/dA``) or into the
  rule (``relevance = True``). The caller runs ``torch.autograd.grad`` once per mode on the same
  graph (``retain_graph`` on the first).
* a rule may also hand a modified gradient to the real graph (``through_output=True``), so the
  model's own backward computes the products a rule shares with the plain gradient (``Wᵀ s`` of a
  linear layer, both operands of ``Q Kᵀ``) instead of the rule recomputing the op.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "Kept",
    "Op",
    "Propagation",
    "RecycledBuffers",
    "Rule",
    "CONSTANT",
    "RELEVANCE_MARK",
    "SCALE_MARK",
    "USES_MARK",
    "carries_relevance",
    "divide_or_zero",
    "divide_or_zero_",
    "indicator",
    "relative_share",
    "epsilon_share",
    "held_constant",
    "hold_constant",
    "is_exact_alias",
    "mark_input",
    "mark_relevance",
    "mark_scale",
    "propagation",
    "relay",
    "safe_divide",
    "scale_of",
    "output_like",
    "scratch_like",
    "share_uses",
    "stabilize",
    "uses_of",
]


# Masks are kept in the tensors' floating dtype and applied by multiplication: on CPU, boolean
# tensors, ``torch.where`` and ``masked_fill_`` cost several times an arithmetic pass.


def indicator(t: torch.Tensor, comparison: Callable, value: float = 0.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``comparison(t, value)`` as 1.0 / 0.0 in ``t``'s dtype (e.g. ``indicator(x, torch.gt)``),
    written into ``out`` when given."""
    return comparison(t, value, out=torch.empty_like(t) if out is None else out)


def safe_divide(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """``a / (b + eps)``, and 0 where ``b == 0``: the stabiliser of Chefer et al.'s reference code
    (it adds ``eps`` whatever the sign of ``b``)."""
    return (a / (b + eps)).mul_(indicator(b, torch.ne))


def relative_share(
    z: torch.Tensor, g: torch.Tensor, eps: float, scale: float = 1.0, scratch: "Propagation | None" = None
) -> torch.Tensor:
    """``safe_divide(z ⊙ g, z, eps) · scale`` for a finite ``g``: where ``z = 0`` the numerator is
    0 already, so no mask is needed (four arithmetic passes). The denominator is a temporary of
    ``scratch`` (:meth:`Propagation.scratch`) and the result one of its recycled outputs
    (:meth:`Propagation.output`) when given."""
    shape = torch.broadcast_shapes(z.shape, g.shape)
    returned = None if scratch is None else scratch.output(shape, torch.result_type(z, g), z.device)
    out = torch.mul(z, g, out=returned).div_(torch.add(z, eps, out=scratch_like(scratch, 0, z)))
    return out.mul_(scale) if scale != 1 else out


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)`` (sign(0) taken as +1): the ε-rule denominator."""
    return torch.where(z >= 0, z + eps, z - eps)


def epsilon_share(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z / (z + eps * sign(z))`` = ``|z| / (|z| + eps)``: the fraction of an output's relevance
    the ε-rule passes on (0 where ``z = 0``), in three elementwise passes."""
    a = z.abs()
    return a.div_(a + eps) if eps else (a != 0).to(z.dtype)


def divide_or_zero(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b != 0``, else 0 (turns a relevance back into a modified gradient)."""
    return divide_or_zero_(a.expand(torch.broadcast_shapes(a.shape, b.shape)).clone(), b)


def divide_or_zero_(a: torch.Tensor, b: torch.Tensor, scratch: "Propagation | None" = None) -> torch.Tensor:
    """:func:`divide_or_zero` written into ``a`` (a temporary of the full shape); ``a`` finite.
    Where ``b = 0`` it divides by 1 (``b`` plus the indicator of zero, exact elsewhere) and then
    multiplies by 0. The mask is a temporary of ``scratch`` when given."""
    mask = indicator(b, torch.eq, out=scratch_like(scratch, 0, b))
    a.div_(mask.add_(b))
    return a.mul_(torch.ne(b, 0.0, out=mask))  # the one temporary serves both masks


#: the number of references to a storage (torch's own count; absent from a torch that lacks it,
#: and then no buffer is ever handed out twice)
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _only_reference(t: torch.Tensor) -> bool:
    """Whether ``t`` holds the only reference to its storage (no view of it is alive anywhere)."""
    if _STORAGE_USE_COUNT is None:
        return False
    return _STORAGE_USE_COUNT(t.untyped_storage()._cdata) == 2  # t, and the wrapper made here


class RecycledBuffers:
    """Tensors handed out on the pages of earlier ones: at most ``keep`` buffers of each shape,
    dtype and device, a buffer handed out again only when its storage is referenced by the pool
    alone (no view of it alive in Python or autograd). On the CPU, where a new tensor of tens of
    megabytes comes from fresh pages of the kernel (see :class:`Propagation`); elsewhere, and
    on a torch without the storage use count, new tensors."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.pools: dict[tuple, list[torch.Tensor]] = {}

    def get(self, shape: torch.Size, dtype: torch.dtype, device: torch.device,
            mark: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """A contiguous tensor of ``shape``, ``dtype`` on ``device`` whose values are to be written:
        a view of a kept buffer (views count as references to its storage, the buffer object
        itself would not), ``mark(buffer)`` called on the buffer it is a view of."""
        if torch.device(device).type != "cpu":
            buffer = torch.empty(shape, dtype=dtype, device=device)
        else:
            pool = self.pools.setdefault((tuple(shape), dtype, device), [])
            buffer = next((b for b in pool if _only_reference(b)), None)
            if buffer is None:
                buffer = torch.empty(shape, dtype=dtype, device=device)
                if len(pool) < self.keep:
                    pool.append(buffer)
        if mark is not None:
            mark(buffer)
        return buffer.view(shape)

    def clear(self) -> None:
        self.pools.clear()


class Kept:
    """Tensors a rule's backward reads, kept as autograd keeps the tensors its nodes save: through
    the saved-tensor hooks in force when the rule runs. Under gradient checkpointing (attnx's
    non-re-entrant checkpoint, :mod:`attnx.core.checkpointing`) they are therefore let go after
    the layer's forward and recomputed with it when the backward reaches it; the recomputed forward
    applies the rule again and keeps the same tensors in the same order, as the checkpoint needs.
    Without hooks the tensors are held as they are."""

    __slots__ = ("packed", "unpack")

    def __init__(self, *tensors: torch.Tensor | None) -> None:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if hooks is None:
            self.packed, self.unpack = tensors, None
        else:
            pack, self.unpack = hooks
            self.packed = tuple(None if t is None else pack(t) for t in tensors)

    def get(self) -> tuple:
        """The tensors (recomputed under checkpointing)."""
        if self.unpack is None:
            return self.packed
        return tuple(None if p is None else self.unpack(p) for p in self.packed)


def scratch_like(state: "Propagation | None", slot: int, like: torch.Tensor) -> torch.Tensor:
    """A temporary shaped as ``like``: the pass's reused buffer for ``slot`` (see
    :meth:`Propagation.scratch`), or a new tensor outside a pass and off the CPU."""
    if state is None or like.device.type != "cpu":
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return state.scratch(slot, like.shape, like.dtype, like.device)


def output_like(state: "Propagation | None", like: torch.Tensor) -> torch.Tensor | None:
    """Where a rule's backward writes a gradient it returns, shaped as ``like``: recycled pages of
    the pass (see :meth:`Propagation.output`), or ``None`` (a new tensor) outside a pass."""
    return None if state is None else state.output(like.shape, like.dtype, like.device)


class Propagation:
    """Which backward the relays of one forward run: the rules (``relevance = True``) or the
    model's own gradient (``False``).

    On the CPU, ``scratch`` hands the rules' backwards the buffers of their temporaries and
    ``output`` the pages of the gradients they return, kept for the whole pass: every layer of
    the same width reuses them. There a new tensor of tens of megabytes comes from fresh pages of
    the kernel (glibc returns large blocks on ``free``), which costs several times the arithmetic
    that fills it (18 ms against 3.5 ms for a product of two (16, 197, 3072) tensors); reused, the
    pages are already there. On other devices the caching allocator of the device reuses memory
    already, and both give new tensors.

    ``weights`` caches per-call derived weights (``|W|``, ``W ± |W|`` of a linear layer) for the
    backward of every layer that uses the same weight: the forward counts each weight's uses
    (:meth:`will_use`), the backward drops a weight's derived tensors after its last use
    (:meth:`used`), so that they never pile up; :meth:`release` drops what is left after the pass.
    """

    def __init__(self, plain_edges: bool = False) -> None:
        #: whether the relays keep the real graph so that a plain backward can run on it
        self.plain_edges = plain_edges
        self.relevance = True
        self.weights: dict[tuple, dict[str, torch.Tensor]] = {}
        self.uses: dict[tuple, int] = {}
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.returned = RecycledBuffers(keep=2)

    @staticmethod
    def key(w: torch.Tensor) -> tuple:
        return (w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w.device)

    def will_use(self, w: torch.Tensor) -> None:
        """Count one use of ``w`` by a rule's backward (called in the forward)."""
        key = self.key(w)
        self.uses[key] = self.uses.get(key, 0) + 1

    def used(self, w: torch.Tensor) -> None:
        """One backward use of ``w`` is done; after the last, its derived tensors are dropped."""
        key = self.key(w)
        left = self.uses.get(key, 0) - 1
        if left > 0:
            self.uses[key] = left
        else:
            self.uses.pop(key, None)
            self.weights.pop(key, None)

    def derived(self, w: torch.Tensor, kind: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``make(w)``, computed once per pass for each weight tensor and ``kind``."""
        kinds = self.weights.setdefault(self.key(w), {})
        out = kinds.get(kind)
        if out is None:
            out = kinds[kind] = make(w)
        return out

    def scratch(self, slot: int, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous buffer for a temporary of one rule's backward, the same tensor on every call
        with this ``slot`` and shape. ``slot`` numbers the buffers one call uses at once (0, 1, 2);
        every rule counts the same way, so each shape has at most three buffers. A backward may
        use them only until it returns (never as, or inside, what it returns): the next call of
        any rule may overwrite them. Backwards on one device run one after another, and the key
        includes the device. Off the CPU a new tensor (see the class docstring)."""
        if torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        key = (slot, tuple(shape), dtype, device)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    def output(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor for a gradient a rule's backward *returns*, on the pages of an earlier one.

        The pass keeps two buffers of each shape (a gradient and the one computed from it) and
        hands out views of them; a buffer is handed out again only when no view of it is left
        (its storage referenced by the buffer alone: autograd has consumed the gradient, and no
        code holds it). Otherwise, and off the CPU, a new tensor."""
        return self.returned.get(shape, dtype, device)

    @contextlib.contextmanager
    def plain(self) -> Iterator[None]:
        """Run the backward inside as the model's own gradient."""
        self.relevance = False
        try:
            yield
        finally:
            self.relevance = True

    def release(self) -> None:
        self.weights.clear()
        self.uses.clear()
        self.buffers.clear()
        self.returned.clear()


_ACTIVE: contextvars.ContextVar[Propagation | None] = contextvars.ContextVar("attnx_propagation", default=None)


@contextlib.contextmanager
def propagation(state: Propagation) -> Iterator[Propagation]:
    """Make ``state`` the switch of the relays built inside (the LRP engine's forward)."""
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def active() -> Propagation | None:
    """The switch of the forward running now, if any."""
    return _ACTIVE.get()


class _Relay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backward_fn, state, through_output, output, *inputs):  # type: ignore[override]
        ctx.backward_fn = backward_fn
        ctx.state = state
        ctx.through_output = through_output
        ctx.num_inputs = len(inputs)
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        n = ctx.num_inputs
        if ctx.state is not None and not ctx.state.relevance:
            return (None, None, None, grad_output) + (None,) * n
        if ctx.backward_fn is None:
            raise RuntimeError("this relevance pass was already run (a relay's rule runs once)")
        grads = tuple(ctx.backward_fn(grad_output))
        if ctx.state is not None:  # one relevance backward per pass: free what the rule held
            ctx.backward_fn = None
        if ctx.through_output:
            g_out, grads = grads[0], grads[1:]
        else:
            g_out = None
        if len(grads) != n:
            raise RuntimeError(f"rule returned {len(grads)} gradients for {n} inputs")
        return (None, None, None, g_out, *grads)


def relay(
    output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    backward: Callable[[torch.Tensor], Sequence],
    through_output: bool = False,
) -> torch.Tensor:
    """A tensor equal to ``output`` whose backward to ``inputs`` is ``backward(g̃_out) -> g̃_inputs``.

    With ``through_output``, ``backward`` returns ``(g_real, *g̃_inputs)``: ``g_real`` is sent
    back through ``output``'s own graph (so ``output`` must have one), the rest to ``inputs``. In
    a forward that keeps plain edges (:class:`Propagation`), the plain backward sends the incoming
    gradient through ``output``'s own graph unchanged.
    """
    state = active()
    keep = through_output or (state is not None and state.plain_edges)
    return _Relay.apply(backward, state, through_output, output if keep else output.detach(), *inputs)


# tensor marks ---------------------------------------------------------------------------------
# The engine and the rules speak about the tensors of one forward through attributes set on them;
# the relay owns those attributes: they are read and written only through the names below.

#: attribute marking a tensor that carries relevance (the explained input and what follows from it)
RELEVANCE_MARK = "_attnx_relevance"
#: attribute holding a shared ``[count]`` of the uses of a rule's output (Chefer et al.'s ``Clone``)
USES_MARK = "_attnx_uses"
#: attribute holding the Python-number factor a tensor was scaled by (``q * scale``)
SCALE_MARK = "_attnx_scale"
#: attribute marking a tensor that a rule holds constant (relevance stops there, gradients do not)
CONSTANT = "_attnx_constant"


def mark_relevance(t: Any) -> None:
    """Mark ``t`` (or each tensor of a list / tuple) as carrying relevance, when it can (a floating
    point tensor in the autograd graph)."""
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() and t.requires_grad:
            setattr(t, RELEVANCE_MARK, True)
    elif isinstance(t, (list, tuple)):
        for x in t:
            mark_relevance(x)


def mark_input(t: torch.Tensor) -> None:
    """Mark the explained input ``t`` as carrying relevance (whatever its dtype)."""
    setattr(t, RELEVANCE_MARK, True)


def carries_relevance(t: Any) -> bool:
    """Whether ``t`` is a tensor marked as carrying relevance."""
    return isinstance(t, torch.Tensor) and getattr(t, RELEVANCE_MARK, False)


def uses_of(t: Any) -> list[int] | None:
    """The shared use counter of a rule's output ``t`` (``None``: its uses are not counted)."""
    return getattr(t, USES_MARK, None) if isinstance(t, torch.Tensor) else None


def share_uses(t: torch.Tensor, uses: list[int]) -> None:
    """Count the uses of ``t`` on ``uses`` (an alias of a counted tensor shares its counter)."""
    setattr(t, USES_MARK, uses)


def scale_of(t: Any) -> float:
    """The Python-number factor ``t`` was scaled by since it left a rule (1.0 when none)."""
    return getattr(t, SCALE_MARK, 1.0)


def mark_scale(t: torch.Tensor, factor: float) -> None:
    """Note that ``t`` is a relevance-carrying tensor times the Python number ``factor``."""
    setattr(t, SCALE_MARK, factor)


def hold_constant(t: torch.Tensor) -> None:
    """Mark ``t`` as held constant by a rule."""
    setattr(t, CONSTANT, True)


def held_constant(t: torch.Tensor) -> bool:
    """Whether ``t`` (or the tensor it is a view of) was held constant by a rule."""
    return bool(getattr(t, CONSTANT, False) or (t._base is not None and getattr(t._base, CONSTANT, False)))


def is_exact_alias(out: Any, t: torch.Tensor) -> bool:
    """``out`` is ``t`` or views exactly the same elements the same way (dropout in eval mode, a
    no-op ``.to``): the same storage, shape, strides, dtype and device."""
    if out is t:
        return True
    if not isinstance(out, torch.Tensor) or (out.shape, out.dtype, out.device) != (t.shape, t.dtype, t.device):
        return False
    try:
        return out.data_ptr() == t.data_ptr() and out.stride() == t.stride()
    except RuntimeError:  # tensors without storage (functorch wrappers, fake tensors)
        return False


def plain_edges() -> bool:
    """Whether the forward running now keeps the real graph of every op (for a plain backward)."""
    state = active()
    return state is not None and state.plain_edges


@dataclass
class Op:
    """One intercepted call.

    Attributes
    ----------
    func:
        The torch function called, or the module whose forward ran (``module`` is set then).
    args, kwargs:
        The call's arguments (for a module: its forward's arguments).
    carrying:
        Positions in ``args`` of the tensors that carry relevance.
    module:
        The module, for module rules; ``None`` for function rules.
    stack:
        The enclosing modules as ``(qualified name, module)`` pairs, outermost first.
    output:
        For module rules, the output the module computed.
    call:
        ``call(func, *args, **kwargs)``: run another op through the engine (for decompositions).
    is_input:
        ``is_input(t)``: whether ``t`` is the explained input (pixels or token embeddings).
    name:
        The qualified name of the module (module rules) or of the innermost enclosing module.
    rule_of:
        ``rule_of(func)``: the rule the registry gives ``func`` called at the same place (a rule
        for a kernel reads the rules of the ops it stands for), or ``None``.
    """

    func: Any
    args: tuple
    kwargs: dict
    carrying: list[int]
    module: nn.Module | None = None
    stack: list = field(default_factory=list)
    output: Any = None
    call: Callable[..., Any] | None = None
    is_input: Callable[[torch.Tensor], bool] | None = None
    name: str = ""
    rule_of: Callable[[Any], Any] | None = None

    def compute(self, graph: bool = False) -> Any:
        """The op's output; with its autograd graph when ``graph`` or when the forward keeps
        plain edges, else without."""
        if self.output is not None:
            return self.output
        with torch.set_grad_enabled(graph or plain_edges()):
            return self.func(*self.args, **self.kwargs)

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [self.args[i] for i in self.carrying]


class Rule:
    """Base class: a rule turns one :class:`Op` into an output whose backward is the rule."""

    #: short name shown in the coverage table
    name = "rule"
    #: the rule the engine applies instead where :meth:`applies` is ``False`` (``None``: as if no
    #: rule matched)
    fallback: "Rule | None" = None

    def applies(self, op: Op) -> bool:
        """Whether the rule takes this call of a function it is registered for; when it does not,
        the engine applies :attr:`fallback`, or treats the call as if no rule matched (linear ops
        are then plain gradient)."""
        return True

    def __call__(self, op: Op) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"
