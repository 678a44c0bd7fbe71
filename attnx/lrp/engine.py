"""The LRP engine: applies a rule registry to a stock model during one forward.

Module rules are applied through module hooks; function rules through a ``TorchFunctionMode``
that sees every torch function and tensor method called during the forward. The engine tracks
which tensors carry relevance (those computed from the explained input); every op on such a
tensor is either handled by a rule, known to be linear in it (plain autograd is then the right
rule, see :mod:`attnx.lrp.rules`), or reported in the coverage table. Everything is removed on
exit. Relevance is then obtained with one backward (``torch.autograd.grad``).
"""
from __future__ import annotations

import collections
import warnings
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import AttnxError, AttnxValueError
from .coverage import Coverage
from .registry import Registry, get_preset
from .relay import (
    Propagation,
    carries_relevance,
    is_exact_alias,
    mark_input,
    mark_relevance,
    mark_scale,
    propagation,
    relative_share,
    scale_of,
    share_uses,
    uses_of,
)
from .rules import Constant, Op, Rule, relay

__all__ = ["LRPEngine", "UncoveredOpError", "LINEAR_OPS"]

#: ops that are linear in each relevance-carrying argument (plain autograd is LRP-0 on them)
LINEAR_OPS = frozenset(
    """view view_as reshape reshape_as permute transpose swapaxes moveaxis movedim t contiguous flatten
    unflatten squeeze unsqueeze expand expand_as repeat repeat_interleave cat concat concatenate stack
    hstack vstack split split_with_sizes chunk unbind narrow select __getitem__ __setitem__ index_select
    gather take_along_dim roll flip clone detach_copy to type type_as float double half bfloat16 dropout pad
    neg __neg__ sum mean add __add__ __radd__ __iadd__ sub __sub__ __rsub__ __isub__ masked_fill
    masked_fill_ where tril triu diagonal interpolate adaptive_avg_pool1d adaptive_avg_pool2d avg_pool1d
    avg_pool2d linear conv1d conv2d conv3d unfold identity scaled_dot_product_attention tensor_split
    new_tensor as_strided fill_diagonal_ copy_ index_add index_add_ scatter scatter_add T mT H mH real _base""".split()
)
#: linear only when a single argument carries relevance
_LINEAR_IF_ONE = frozenset(
    "mul __mul__ __rmul__ __imul__ div __truediv__ __itruediv__ matmul __matmul__ bmm einsum mm baddbmm addmm".split()
)


class UncoveredOpError(AttnxError, RuntimeError):
    """Raised in strict mode (the default) when a relevance-carrying op matches no rule."""


def _carrying(args: tuple) -> list[int]:
    out = []
    for i, a in enumerate(args):
        if carries_relevance(a) or (isinstance(a, (list, tuple)) and any(carries_relevance(x) for x in a)):
            out.append(i)
    return out


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # property getters: Tensor.T, Tensor.mT, ...
        return getattr(getattr(func, "__self__", None), "__name__", "property")
    return name


class LRPEngine(TorchFunctionMode):
    """Context manager applying ``registry`` to ``model`` while active.

    Parameters
    ----------
    model:
        The model to explain; it is left exactly as found on exit.
    registry:
        A :class:`~attnx.lrp.registry.Registry` or a preset name.
    strict:
        Raise :class:`UncoveredOpError` from :meth:`check_coverage` when a relevance-carrying op
        has no rule and is not linear (``False``: warn and proceed with plain gradient × input).
    plain_edges:
        Keep the model's own graph beside every rule, so that the same forward also serves a
        plain backward (``with engine.propagation.plain(): torch.autograd.grad(...)``, with
        ``retain_graph=True``), e.g. ``dy/dA`` for Transformer Attribution.

    Examples
    --------
    >>> with LRPEngine(model, "cplrp") as engine:
    ...     x = engine.track(x)          # the explained input
    ...     logits = model(x)
    >>> g, = torch.autograd.grad(logits, x, one_hot)
    >>> relevance = x * g
    """

    def __init__(
        self, model: nn.Module, registry: Registry | str = "chefer2021", strict: bool = True, plain_edges: bool = False
    ) -> None:
        super().__init__()
        #: the switch between the plain and the relevance backward, and the per-pass weight cache
        self.propagation = Propagation(plain_edges)
        self._switch: Any = None
        self.model = model
        self.registry = get_preset(registry)
        self.strict = strict
        self.coverage: collections.Counter = collections.Counter()
        self.uncovered: collections.Counter = collections.Counter()
        #: ``{op: {"module.path (ModuleType)": calls}}`` where the uncovered calls ran
        self.uncovered_at: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._stack: list[tuple[str, nn.Module]] = []
        self._suspended = 0
        self._ruled: list[tuple[nn.Module, Rule | None]] = []
        self._handles: list = []
        self._names = {m: n for n, m in model.named_modules()}
        self._inputs: set[int] = set()

    # public ---------------------------------------------------------------------------------
    def track(self, t: torch.Tensor) -> torch.Tensor:
        """Mark ``t`` as the explained input; returns the marked tensor, a new leaf that requires
        grad (``t`` may be the user's input: nothing is attached to it)."""
        t = t.detach().requires_grad_(True)
        mark_input(t)
        self._inputs.add(id(t))
        return t

    def mark(self, t: torch.Tensor) -> torch.Tensor:
        """Mark ``t`` itself as the explained input, keeping its graph (a caller that
        differentiates with respect to ``t``, e.g. captum, needs the tensor it passed); ``t``
        must require grad. Returns ``t``."""
        mark_input(t)
        self._inputs.add(id(t))
        return t

    def is_input(self, t: torch.Tensor) -> bool:
        return id(t) in self._inputs

    def track_output_of(self, module: nn.Module) -> Any:
        """Mark the output of ``module`` (e.g. the token embeddings) as the explained input.

        Returns the hook handle; the tracked tensors are collected in ``self.roots``.
        """
        self.roots: list[torch.Tensor] = []

        def hook(mod, args, output):
            out = self.track(output)
            self.roots.append(out)
            return out

        handle = module.register_forward_hook(hook)
        self._handles.append(handle)
        return handle

    def summary(self) -> Coverage:
        """The coverage of the pass so far, as a :class:`~attnx.lrp.coverage.Coverage`."""
        where = {op: tuple(sorted(c)) for op, c in self.uncovered_at.items()}
        return Coverage(self.registry.name, dict(self.coverage), dict(self.uncovered), where)

    def report(self) -> str:
        """The coverage table: every relevance-carrying op seen, with the rule that handled it."""
        return self.summary().report()

    def check_coverage(self) -> None:
        """Raise :class:`UncoveredOpError` (strict) or warn when an op matched no rule."""
        if not self.uncovered:
            return
        lines = []
        for op, n in sorted(self.uncovered.items()):
            places = self.uncovered_at.get(op, {})
            shown = ", ".join(sorted(places)[:4]) + (f", ... ({len(places)} places)" if len(places) > 4 else "")
            lines.append(f"  {op!r}: {n} call(s) in {shown or 'the model'}")
        name = self.registry.name
        msg = (
            f"LRP preset {name!r}: {sum(self.uncovered.values())} relevance-carrying call(s) matched no rule "
            f"and are not linear, so their relevance would be plain gradient x input, not what the preset "
            f"prescribes: {dict(self.uncovered)}\n" + "\n".join(lines) + "\n"
            "Register a rule for the module type or the torch function and pass the registry as preset:\n"
            f"  reg = attnx.lrp.get_preset({name!r}).copy()\n"
            "  reg.register(TheModuleType, attnx.lrp.rules.Identity())   # or reg.register(torch.<function>, rule)\n"
            + ("or pass strict=False to proceed with a warning.\n" if self.strict else "")
            + self.report()
        )
        if self.strict:
            raise UncoveredOpError(msg)
        warnings.warn(msg, stacklevel=3)

    # context --------------------------------------------------------------------------------
    def __enter__(self):
        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(module.register_forward_hook(self._post_hook))
        try:
            self._switch = propagation(self.propagation)
            self._switch.__enter__()
            return super().__enter__()
        except BaseException:
            self._remove()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._remove()

    def release(self) -> None:
        """Drop what the pass cached for its backward (``|W|`` of the linear layers)."""
        self.propagation.release()

    def _remove(self) -> None:
        if self._switch is not None:
            switch, self._switch = self._switch, None
            switch.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        self._ruled.clear()
        self._suspended = 0

    # module hooks ---------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        rule = None
        name = self._names.get(module, type(module).__name__)
        if not self._suspended and args and carries_relevance(args[0]):
            rule = self.registry.rule_for_module(module, list(self._stack), name)
            if rule is not None:
                _count_use(args[0])
        self._stack.append((name, module))
        self._ruled.append((module, rule))
        if rule is not None:
            self._suspended += 1

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        mod, rule = self._ruled.pop()
        stack = list(self._stack[:-1])
        name = self._stack.pop()[0]
        if rule is None:
            return None
        # the rule runs with the engine still suspended: its own torch calls are not model ops
        try:
            op = Op(
                module, args, {}, [0], module=module, stack=stack, output=output, call=self.call,
                is_input=self.is_input, name=name,
            )
            out = rule(op)
            self.coverage[(type(module).__name__, rule.name)] += 1
            if not isinstance(rule, Constant):
                out = self._fanout(out)
                mark_relevance(out)
        finally:
            self._suspended -= 1
        return out

    def _fanout(self, out: Any) -> Any:
        """Wrap a rule's output so that, if it is used more than once, its summed modified gradient
        is divided by the output with ``registry.fanout_eps`` (Chefer et al.'s ``Clone``)."""
        eps = self.registry.fanout_eps
        if eps is None or not (isinstance(out, torch.Tensor) and out.requires_grad and out.is_floating_point()):
            return out
        uses = [0]
        zd = out.detach()
        state = self.propagation

        def backward(g):
            return (relative_share(zd, g, eps, scratch=state) if uses[0] >= 2 else g,)

        wrapped = relay(out, [out], backward)
        share_uses(wrapped, uses)
        return wrapped

    # functions ------------------------------------------------------------------------------
    def call(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``func`` as if it had been called under the engine (used by decompositions)."""
        return self.__torch_function__(func, (), args, kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._suspended:
            return func(*args, **kwargs)
        carrying = _carrying(args) + [k for k, v in kwargs.items() if carries_relevance(v)]
        if not carrying:
            return func(*args, **kwargs)
        name = _name(func)
        stack = list(self._stack)
        rule = self.registry.rule_for_function(func, stack)
        where = stack[-1][0] if stack else ""
        op = Op(func, args, kwargs, carrying, stack=stack, call=self.call, is_input=self.is_input, name=where,
                rule_of=lambda f: self.registry.rule_for_function(f, stack))
        while rule is not None and not rule.applies(op):
            rule = rule.fallback
        if rule is not None:
            if any(isinstance(c, str) for c in carrying):
                raise AttnxValueError(f"rule {rule.name!r} for {name}: relevance-carrying keyword arguments are not supported")
            out = rule(op)
            self.coverage[(name, rule.name)] += 1
            _count_uses(args, kwargs, out)
            if not isinstance(rule, Constant):
                out = self._fanout(out)
                mark_relevance(out)
            return out
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") != "__get__":  # property reads are not uses
            _count_uses(args, kwargs, out)
        _record_scale(func, args, out)
        if not _has_float_grad(out):
            return out
        n_carrying = sum(
            1 for a in list(args) + list(kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a]) if carries_relevance(t)
        )
        if name in LINEAR_OPS or (name in _LINEAR_IF_ONE and n_carrying == 1):
            self.coverage[(name, "gradient (linear)")] += 1
        else:
            self.uncovered[name] += 1
            inner = self._stack[-1] if self._stack else None
            self.uncovered_at[name][f"{inner[0] or 'model'} ({type(inner[1]).__name__})" if inner else "model"] += 1
        mark_relevance(out)
        return out


def _count_use(t: Any) -> None:
    uses = uses_of(t)
    if uses is not None:
        uses[0] += 1


def _count_uses(args: tuple, kwargs: dict, out: Any) -> None:
    """Count one use of each tracked argument consumed into a new tensor. An op returning an exact
    alias of its input (dropout in eval mode) is not a use: the alias inherits the counter. Calls
    returning no tensor (``dim()``, ``size()``) are not uses."""
    if not any(isinstance(o, torch.Tensor) for o in (out if isinstance(out, (list, tuple)) else (out,))):
        return
    for a in list(args) + list(kwargs.values()):
        for t in a if isinstance(a, (list, tuple)) else (a,):
            uses = uses_of(t)
            if uses is None:
                continue
            if is_exact_alias(out, t):
                if out is not t:
                    share_uses(out, uses)
            else:
                uses[0] += 1


def _record_scale(func: Any, args: tuple, out: Any) -> None:
    """Remember that ``out`` is a relevance-carrying tensor times a Python number (e.g. timm's
    ``q * scale``), so that rules can state their stabilisers in unscaled units."""
    name = getattr(func, "__name__", "")
    if name not in ("mul", "__mul__", "__rmul__", "div", "__truediv__") or len(args) != 2 or not isinstance(out, torch.Tensor):
        return
    t, c = (args[0], args[1]) if isinstance(args[0], torch.Tensor) else (args[1], args[0])
    if not isinstance(t, torch.Tensor) or not isinstance(c, (int, float)) or c == 0:
        return
    factor = (1.0 / c) if name in ("div", "__truediv__") else float(c)
    mark_scale(out, scale_of(t) * factor)


def _has_float_grad(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return out.is_floating_point() and out.requires_grad
    if isinstance(out, (list, tuple)):
        return any(_has_float_grad(o) for o in out)
    return False
