"""The method registry: every method declared once, with what it reads and its typed options.

A method is a pure function of a :class:`~attnx.core.trace.Trace` and a :class:`~attnx.core.layout.Readout`::

    fn(trace, readout, **options) -> torch.Tensor | Relevance

returning the ``(B, N)`` relevance of every token for the readout row (or a :class:`Relevance`
with pixel-level results). Its declaration says what the trace must record (:class:`Needs`) and
its options (:class:`Option`: type, choices, bounds, default, one-line doc); ``attnx methods``,
the README's methods table and every option error come from that declaration. The explainer
alone runs the trace and builds the :class:`~attnx.core.explanation.Explanation`.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..core.layer_fold import LayerFold
from ..core.trace_types import FirstLayer, Needs
from ..errors import AttnxTypeError, AttnxValueError

__all__ = ["Method", "Option", "Relevance", "get_method", "list_methods", "method_names", "methods_markdown", "register_method", "unregister_method"]

_NOTHING = object()


@dataclass(frozen=True)
class Option:
    """A typed method option.

    Attributes
    ----------
    name, default, doc:
        The keyword, its default and a one-line description.
    kind:
        ``int``, ``float``, ``bool`` or ``str`` (values are checked against it), or ``None``.
    choices:
        The allowed values, when they are few.
    bounds:
        ``(low, high)`` for numbers; ``high_open`` excludes ``high``.
    allow_none:
        ``None`` is a valid value (meaning "chosen by the method").
    trace:
        The option configures the trace (the LRP registry, strictness), not the method function.
    check:
        An extra validator ``value -> value`` (raising with a clear message).
    """

    name: str
    default: Any
    doc: str = ""
    kind: type | None = None
    choices: tuple | None = None
    bounds: tuple[float, float] | None = None
    high_open: bool = False
    allow_none: bool = False
    trace: bool = False
    check: Callable[[Any], Any] | None = None

    def with_default(self, default: Any) -> "Option":
        return Option(**{**self.__dict__, "default": default})

    def validate(self, value: Any) -> Any:
        """``value`` if it is valid for this option; else a one-line error naming what is expected."""
        if value is None and self.allow_none:
            return value
        if self.choices is not None:
            if value not in self.choices or isinstance(value, bool) != isinstance(self.choices[0], bool):
                raise AttnxValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        elif self.kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise AttnxTypeError(f"{self.name}: expected {self.expected()}, got {value!r} (a {type(value).__name__})")
        elif self.kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise AttnxTypeError(f"{self.name}: expected {self.expected()}, got {value!r} (a {type(value).__name__})")
        elif self.kind is bool and not isinstance(value, bool):
            raise AttnxTypeError(f"{self.name}: expected {self.expected()}, got {value!r} (a {type(value).__name__})")
        if self.bounds is not None:
            low, high = self.bounds
            if not (low <= value and (value < high if self.high_open else value <= high)):
                raise AttnxValueError(f"{self.name} must be in [{low}, {high}{')' if self.high_open else ']'}, got {value}")
        return value if self.check is None else self.check(value)

    def parse(self, text: str) -> Any:
        """The value of ``text`` from the command line, typed by this option."""
        low = text.strip().lower()
        if low == "none" and self.allow_none:
            return None
        try:
            if self.kind is bool:
                if low in ("true", "1", "yes"):
                    return True
                if low in ("false", "0", "no"):
                    return False
                raise ValueError
            if self.kind is int:
                return int(text)
            if self.kind is float:
                return float(text)
        except ValueError:
            raise AttnxValueError(f"{self.name}: expected {self.expected(text=True)}, got {text!r}") from None
        return text

    def expected(self, text: bool = False) -> str:
        """What a value of this option is, in words: ``"a number in [0, 1)"``."""
        kind = {bool: "true or false" if text else "True or False", int: "an int", float: "a number"}.get(self.kind, "a value")
        if self.bounds is not None:
            low, high = self.bounds
            kind += f" in [{low}, {high}{')' if self.high_open else ']'}"
        return kind

    def describe(self) -> str:
        """``name=default``, as listed by ``attnx methods``."""
        return f"{self.name}={self.default!r}"


@dataclass(frozen=True)
class Relevance:
    """What a method returns when the token relevance is not the whole result.

    Attributes
    ----------
    tokens:
        ``(B, N)`` relevance of every token (prefix tokens included), or ``None``.
    scores:
        ``(B, P)`` content scores when they are not ``tokens`` without the prefix (e.g. pixel
        relevance summed per patch).
    pixels:
        ``(B, H, W)`` relevance per pixel, drawn as the heat map.
    options:
        The options as the method resolved them (e.g. a default that depends on the model).
    """

    tokens: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered explanation method."""

    name: str
    fn: Callable[..., Any]
    needs: Needs = Needs(attentions=True)
    summary: str = ""
    option_specs: tuple[Option, ...] = ()
    reference: str = ""
    #: ``first_layer(options, layout, num_layers)``: the lowest layer the method reads
    first_layer: Callable[[dict, Any, int], int] | None = None
    #: ``fold(layer, **options)``: what the method keeps of each layer (:mod:`attnx.core.layer_fold`)
    fold: Callable[..., Any] | None = None
    #: ``conserves(trace, result, options)``: the ``(B,)`` total the method claims its relevance
    #: sums to (``None`` under options where it claims nothing); see :func:`register_method`
    conserves: Callable[[Any, Relevance, dict], Any] | None = None

    def claimed_total(self, trace: Any, result: Relevance, options: dict) -> torch.Tensor | None:
        """``(B,)`` float64: what the method claims the relevance of each sample sums to on ``trace``
        under ``options`` (its ``conserves`` declaration), or ``None`` when it claims no conservation."""
        if self.conserves is None:
            return None
        total = self.conserves(trace, result, options)
        return None if total is None else torch.as_tensor(total).detach().to(torch.float64).reshape(-1)

    #: ``layer_pooling(options)``: the pooling of the per-layer readouts (``Needs.layer_readouts``)
    layer_pooling: Callable[[dict], str] | None = None

    def fold_for(self, options: dict) -> LayerFold | None:
        """The method's per-layer fold under ``options``, given to the pass (``None``: the pass
        keeps every layer's attention and gradient)."""
        return None if self.fold is None else LayerFold(self.fold, dict(options))

    def first_layer_for(self, options: dict) -> FirstLayer | None:
        """The lowest layer the method reads under ``options``, given to the pass beside ``needs``
        (``None``: every layer)."""
        if self.first_layer is None:
            return None
        pooling = "model" if self.layer_pooling is None else self.layer_pooling(options)
        return FirstLayer(self.first_layer, dict(options), pooling)

    @property
    def gradients(self) -> bool:
        """Whether the method reads ``dy_t/dA``."""
        return self.needs.gradients

    @property
    def options(self) -> dict[str, Any]:
        """``{name: default}`` of the method's options."""
        return {o.name: o.default for o in self.option_specs}

    def option(self, name: str) -> Option:
        for o in self.option_specs:
            if o.name == name:
                return o
        raise self.unknown([name])

    def unknown(self, names: Sequence[str]) -> AttnxTypeError:
        known = ", ".join(o.describe() for o in self.option_specs) or "none"
        hint = ""
        close = difflib.get_close_matches(names[0], [o.name for o in self.option_specs], n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
        return AttnxTypeError(f"method {self.name!r} got unknown option(s) {sorted(names)}; its options: {known}{hint}")

    def check_options(self, options: dict) -> None:
        unknown = sorted(set(options) - {o.name for o in self.option_specs})
        if unknown:
            raise self.unknown(unknown)

    def resolve(self, options: dict) -> tuple[dict, dict]:
        """Validate ``options``; return ``(method options, trace options)`` with defaults filled in."""
        self.check_options(options)
        method_opts, trace_opts = {}, {}
        for o in self.option_specs:
            value = o.validate(options[o.name]) if o.name in options else o.default
            (trace_opts if o.trace else method_opts)[o.name] = value
        return method_opts, trace_opts


_METHODS: dict[str, Method] = {}


def options_from_signature(fn: Callable) -> tuple[Option, ...]:
    """Options of a user's method, read from its keyword parameters (typed by their defaults)."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    out = []
    for p in params:
        if p.kind == p.KEYWORD_ONLY or p.default is not p.empty:
            default = None if p.default is p.empty else p.default
            kind = type(default) if isinstance(default, (bool, int, float, str)) else None
            out.append(Option(p.name, default, kind=kind, allow_none=default is None))
    return tuple(out)


def check_declaration(name: str, fn: Callable, options: Sequence[Option]) -> None:
    """The declared options must be the function's keyword parameters, with the same defaults."""
    params = {p.name: p for p in list(inspect.signature(fn).parameters.values())[2:]}
    for o in options:
        if o.trace:
            continue
        p = params.get(o.name)
        if p is None or (p.default is not p.empty and p.default != o.default):
            raise AttnxTypeError(f"method {name!r}: option {o.name!r} does not match the parameters of {fn.__name__}")


def register_method(
    name: str,
    *,
    needs: Needs | None = None,
    options: Sequence[Option] | None = None,
    summary: str | None = None,
    reference: str = "",
    gradients: bool = False,
    first_layer: Callable[[dict, Any, int], int] | None = None,
    fold: Callable[..., Any] | None = None,
    conserves: Callable[[Any, Relevance, dict], Any] | None = None,
    layer_pooling: Callable[[dict], str] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn(trace, readout, **options)`` as the method ``name``.

    Parameters
    ----------
    needs:
        What the trace must record; default: the attention probabilities (and ``dy_t/dA`` with
        ``gradients=True``).
    options:
        The typed options; default: read from the keyword parameters of ``fn``.
    summary:
        One line for ``attnx methods``; default: the first paragraph of the docstring.
    reference:
        The paper (or code) the method follows, for the methods table.
    first_layer:
        ``first_layer(options, layout, num_layers)``: the lowest layer whose gradients or
        attention relevance the method reads with these options (default: every layer); the
        backward passes stop there.
    fold:
        ``fold(layer, **options)``: what the method keeps of each
        :class:`~attnx.core.layer_fold.AttentionLayer` (e.g. its head-fused map), for a method that
        reads no more than that of the attentions and gradients; the attention pass then applies it
        as the backward reaches each layer and releases the layer. The method reads the kept
        values with :func:`attnx.core.layer_fold.kept_layers`, which applies the fold itself to a
        full trace.
    conserves:
        ``conserves(trace, result, options) -> (B,) | None``: for a method that claims
        conservation (completeness), the total its relevance should sum to for each sample, from
        the trace, the method's :class:`Relevance` and the options it ran with (every option,
        defaults filled in); ``None`` when it claims nothing under those options (e.g. a bool
        option that makes a gradient method complete: ``None`` when it is off). E.g. LRP under a conserving preset: the
        relevance put on the logits (``trace.seeded_relevance``); integrated gradients:
        ``y_t(x) − y_t(x')``. The sum is taken over ``trace.input_relevance`` when the pass has
        it, else over the token relevance (:attr:`attnx.Explanation.relevance_total`).
    layer_pooling:
        ``layer_pooling(options)``: for a method reading per-layer readouts
        (``Needs.layer_readouts``, with ``first_layer``), the pooling they use under its options
        (:data:`attnx.core.layer_readout.POOLINGS`); default: the model's own.
    """

    def deco(fn: Callable) -> Callable:
        specs = tuple(options) if options is not None else options_from_signature(fn)
        check_declaration(name, fn, specs)
        doc = summary if summary is not None else " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
        declared = needs if needs is not None else Needs(attentions=True, gradients=gradients)
        _METHODS[name] = Method(name, fn, declared, doc, specs, reference, first_layer, fold, conserves, layer_pooling)
        return fn

    return deco


def unregister_method(name: str) -> None:
    """Remove the method ``name`` (a no-op when there is none)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The method registered as ``name``."""
    if not isinstance(name, str) or name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1) if isinstance(name, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AttnxValueError(f"unknown method {name!r}; available: {list_methods()}{hint}")
    return _METHODS[name]


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_METHODS)


method_names = list_methods


def describe_option(option: Option) -> str:
    """``name=default`` with the choices, for the methods table."""
    text = f"`{option.describe()}`"
    if option.choices is not None and len(option.choices) > 1:
        text += " (" + "/".join(str(c) for c in option.choices) + ")"
    return text


def methods_markdown() -> str:
    """The README's methods table, written from the declarations (``attnx methods --markdown``)."""
    rows = ["| name | what it computes | reads | options | reference |", "|---|---|---|---|---|"]
    for m in _METHODS.values():
        reads = [k for k in ("attentions", "gradients", "attention_relevance", "input_relevance", "hidden_states", "forward") if getattr(m.needs, k)]
        options = ", ".join(describe_option(o) for o in m.option_specs) or "—"
        summary = m.summary.replace("``", "`").replace("|", "\\|")
        rows.append(f"| `{m.name}` | {summary} | {', '.join(reads)} | {options} | {m.reference or '—'} |")
    return "\n".join(rows)

