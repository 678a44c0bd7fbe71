"""Rule registries: module types and torch functions -> propagation rules, and the presets.

A :class:`Registry` is an ordered list of entries ``(key, rule, within)``:

* ``key`` is a module type (matched with ``isinstance``), a :class:`~attnx.lrp.kinds.ModuleKind`
  (a family of modules recognised by a predicate, e.g. every RMSNorm) or a torch function (matched
  together with its aliases: registering ``F.softmax`` also covers ``torch.softmax`` and
  ``Tensor.softmax``);
* ``within`` optionally restricts the entry to ops running inside an enclosing module, given as a
  module type or a predicate ``(qualified_name, module) -> bool`` tested on every enclosing module.

Later entries win over earlier ones, so a user overrides a preset with ``registry.register(...)``
without editing attnx::

    reg = attnx.lrp.presets["attnlrp"].copy()
    reg.register(nn.Linear, Gamma(0.25), within=attnx.lrp.in_mlp)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnxTypeError, AttnxValueError
from . import rules as R
from .fused_attention import FusedAttention
from .kinds import ACTIVATION, HF_CONV1D, MOE_ROUTER, RMS_NORM, ModuleKind

__all__ = [
    "Registry", "FUNCTION_ALIASES", "presets", "in_mlp", "in_attention", "get_preset", "register_preset", "unregister_preset",
]

T = torch.Tensor

#: functions that are the same op, registered together
FUNCTION_ALIASES: list[tuple] = [
    (F.softmax, torch.softmax, T.softmax),
    (torch.matmul, T.matmul, T.__matmul__),
    (torch.bmm, T.bmm),
    (torch.einsum,),
    (torch.add, T.add, T.__add__, T.__radd__),
    (torch.mul, T.mul, T.__mul__, T.__rmul__),
    (F.gelu,),
    (F.relu, torch.relu, T.relu),
    (F.silu,),
    (F.rms_norm,),
    R.GROUPED_MM,
    (torch.tanh, T.tanh, F.tanh),
    (torch.sigmoid, T.sigmoid, F.sigmoid),
    (F.layer_norm,),
    (F.normalize,),
    (F.linear,),
    (F.conv2d,),
    (F.scaled_dot_product_attention,),
    (F.multi_head_attention_forward,),
]
_ALIAS_OF: dict[Any, tuple] = {f: group for group in FUNCTION_ALIASES for f in group}

WithinSpec = "type[nn.Module] | tuple[type, ...] | Callable[[str, nn.Module], bool] | None"


def _within_predicate(within: Any) -> Callable[[str, nn.Module], bool] | None:
    if within is None:
        return None
    if isinstance(within, type) or (isinstance(within, tuple) and all(isinstance(t, type) for t in within)):
        return lambda name, module: isinstance(module, within)
    if callable(within):
        return within
    raise AttnxTypeError(f"within must be a module type, a tuple of types or a predicate, got {within!r}")


_MLP_NAME = re.compile(r"(^|\.)(mlp|ffn|feed_forward|intermediate|output)(\.|$)|(^|\.)mlp[^.]*$", re.IGNORECASE)


def in_mlp(name: str, module: nn.Module) -> bool:
    """Predicate: the enclosing module is a feed-forward block (timm ``Mlp``, torchvision
    ``MLPBlock``, Hugging Face ``*Intermediate`` / ``*Output`` / ``ffn``)."""
    cls = type(module).__name__.lower()
    if "attention" in cls:
        return False
    # Hugging Face BERT-family layers hold the second feed-forward linear in ``*Output``
    # (``BertOutput.dense``); ``*SelfOutput`` is the attention's output projection
    hf_ffn_output = cls.endswith("output") and not cls.endswith("selfoutput")
    return "mlp" in cls or "intermediate" in cls or "ffn" in cls or "feedforward" in cls or hf_ffn_output or bool(
        re.search(r"(^|\.)(mlp|ffn|intermediate)$", name)
    )


def in_attention(name: str, module: nn.Module) -> bool:
    """Predicate: the enclosing module is an attention block."""
    return "attention" in type(module).__name__.lower() or isinstance(module, nn.MultiheadAttention)


@dataclass
class Entry:
    key: Any
    rule: R.Rule
    within: Callable[[str, nn.Module], bool] | None = None
    is_module: bool = False


class Registry:
    """Ordered map from module types and torch functions to rules (later entries win)."""

    #: whether every rule is plain autograd (gradient x input): the pass then seeds the target's
    #: exact gradient, and a target's own ``relevance_seed`` is not used
    plain_gradient: bool = False

    def __init__(
        self,
        name: str = "custom",
        entries: Iterable[Entry] = (),
        seed: str = "logit",
        fanout_eps: float | None = None,
        conserving: bool = False,
        exact_seed: bool = False,
    ) -> None:
        self.name = name
        #: the rules define a modified *gradient* (LibraGrad): the pass seeds the target's exact
        #: gradient at the logits (a target's own ``relevance_seed`` is not used)
        self.exact_seed = exact_seed
        #: whether the rules (about) conserve relevance, so that the input relevance of a sample
        #: must sum to about the relevance put on the logits (checked by attnx.core.degenerate)
        self.conserving = conserving
        self.entries: list[Entry] = list(entries)
        #: relevance put on the target logit: ``"logit"`` (R = y_t) or ``"one_hot"`` (R = 1)
        self.seed = seed
        #: where a rule's output is used more than once, divide its total relevance by the output
        #: with this stabiliser (Chefer et al.'s ``Clone``); ``None``: plain summation
        self.fanout_eps = fanout_eps

    def register(self, key: Any, rule: R.Rule, *, within: Any = None) -> "Registry":
        """Map ``key`` (a module type, a :class:`ModuleKind` or a torch function) to ``rule``;
        returns ``self``."""
        if not isinstance(rule, R.Rule):
            raise AttnxTypeError(f"rule must be an attnx.lrp.rules.Rule, got {rule!r}")
        is_module = isinstance(key, ModuleKind) or (isinstance(key, type) and issubclass(key, nn.Module))
        if not is_module and not callable(key):
            raise AttnxTypeError(f"key must be a module type, an attnx.lrp.kinds.ModuleKind or a torch function, got {key!r}")
        self.entries.append(Entry(key, rule, _within_predicate(within), is_module))
        return self

    def copy(self, name: str | None = None) -> "Registry":
        return Registry(name or self.name, list(self.entries), self.seed, self.fanout_eps, self.conserving, self.exact_seed)

    def _match(self, entry: Entry, stack: list) -> bool:
        return entry.within is None or any(entry.within(n, m) for n, m in stack)

    def rule_for_module(self, module: nn.Module, stack: list, name: str = "") -> R.Rule | None:
        """The rule for ``module`` (qualified ``name``, with ``stack`` its enclosing modules), or ``None``."""
        for entry in reversed(self.entries):
            if not entry.is_module or not self._match(entry, stack):
                continue
            if entry.key.matches(name, module) if isinstance(entry.key, ModuleKind) else isinstance(module, entry.key):
                return entry.rule
        return None

    def rule_for_function(self, func: Any, stack: list) -> R.Rule | None:
        """The rule for a call of ``func`` inside ``stack``, or ``None``."""
        group = _ALIAS_OF.get(func, (func,))
        for entry in reversed(self.entries):
            if not entry.is_module and entry.key in group and self._match(entry, stack):
                return entry.rule
        return None

    def attention_held_constant(self) -> bool:
        """Whether ``F.scaled_dot_product_attention`` runs by its own kernel with the probabilities
        held constant (no gradient to ``q``, ``k``; LibraGrad, CP-LRP) wherever it is called: the
        gradient at ``A`` is then ``g vᵀ`` of the kernel's output gradient, which a fold can
        recompute beside the kernel (:mod:`attnx.adapters.fused_kernel`)."""
        if any(e.within is not None for e in self.entries if e.key in (F.scaled_dot_product_attention, F.softmax)):
            return False  # a rule for some places only: written out, where each place meets its own
        sdpa, softmax = self.rule_for_function(F.scaled_dot_product_attention, []), self.rule_for_function(F.softmax, [])
        return isinstance(sdpa, FusedAttention) and isinstance(softmax, R.Constant)

    def __repr__(self) -> str:
        rows = []
        for e in self.entries:
            key = e.key.__name__ if hasattr(e.key, "__name__") else repr(e.key)
            rows.append(f"  {key}{' (within)' if e.within else ''} -> {e.rule!r}")
        return f"Registry({self.name!r}, seed={self.seed!r},\n" + "\n".join(rows) + "\n)"


def _base(name: str, seed: str) -> Registry:
    """Entries every preset shares: attention kernels are decomposed so their parts get rules."""
    reg = Registry(name, seed=seed, conserving=True)
    reg.register(F.scaled_dot_product_attention, R.Decompose(R.sdpa_decomposition))
    reg.register(F.multi_head_attention_forward, R.Decompose(R.mha_decomposition))
    # L2 normalisation (SwinV2's cosine attention normalises q and k) with the norm held constant:
    # y = x / c is linear and elementwise, so R_x = R_y (the identity rule), as LayerNorm's σ
    reg.register(F.normalize, R.Identity())
    return reg


def _fused_attention(reg: Registry) -> None:
    """Run ``F.scaled_dot_product_attention`` by its own kernel where the preset's rules for the
    softmax and the products only scale gradients (:class:`~attnx.lrp.fused_attention.FusedAttention`;
    no ``(B, H, N, N)`` map is kept). The written-out kernel stays reachable:
    ``reg.register(F.scaled_dot_product_attention, rules.Decompose(rules.sdpa_decomposition))``."""
    reg.register(F.scaled_dot_product_attention, FusedAttention())


def _linear_layers(reg: Registry, rule: R.Rule, within: Any = None) -> None:
    """``rule`` on every linear layer of the stock models: ``nn.Linear`` / ``F.linear``, GPT-2's
    ``Conv1D`` and the grouped products of mixture-of-experts layers."""
    for key in (nn.Linear, F.linear, HF_CONV1D, *R.GROUPED_MM[:1]):
        reg.register(key, rule, within=within)


def _decoder_ops(reg: Registry, norm: R.Rule, gate: R.Rule | None = None) -> None:
    """The ops modern decoders bring: RMSNorm (``norm``), elementwise activations written out in
    several ops (identity), gated products ``act(gate(x)) * up(x)`` (``gate``, when ``torch.mul``
    has no rule yet), and MoE routing weights (constants). Rotary embeddings, soft-capping
    ``tanh(x / c) * c``, ALiBi and relative position biases need no entry: they are linear, the
    tanh rule, and constants."""
    for key in (RMS_NORM, F.rms_norm):
        reg.register(key, norm)
    reg.register(ACTIVATION, R.Identity())
    if gate is not None:
        reg.register(torch.mul, gate)
    reg.register(MOE_ROUTER, R.Constant())


def chefer2021() -> Registry:
    """The rules of Chefer, Gur & Wolf (CVPR 2021) as in their reference code.

    Linear / convolution: α=1 β=0 with a shared positive denominator, bias ignored; z^B at the
    layer that sees the pixels; LayerNorm, GELU, tanh, softmax: identity; residual addition:
    normalised add (attention masks included); ``Q Kᵀ`` and ``A V``: gradient × input per
    operand, halved; class-token indexing and fan-out (``Clone``) divide by their output with
    ``safe_divide``. Seed: one-hot.

    Decoder ops, by analogy (the reference code has none): GPT-2's ``Conv1D`` and MoE grouped
    products as linear layers (α=1 β=0); RMSNorm, SiLU and the written-out GELUs as LayerNorm
    and GELU (identity); a gate ``act(gate(x)) * up(x)`` as ``A V`` (each operand half, after
    ``safe_divide``); MoE routing weights constant.
    """
    reg = _base("chefer2021", seed="one_hot")
    reg.fanout_eps = 1e-9
    reg.register(T.__getitem__, R.Stabilized())
    identity = R.Identity()
    linear = R.AlphaBeta(1.0, 0.0)
    for key in (nn.Linear, F.linear):
        reg.register(key, linear)
    for key in (nn.Conv2d, F.conv2d):
        reg.register(key, R.ZBox(otherwise=linear))
    for key in (nn.LayerNorm, F.layer_norm, nn.GELU, F.gelu, F.softmax, torch.tanh, F.relu):
        reg.register(key, identity)
    reg.register(torch.add, R.NormalizedAdd(constants=True))
    bilinear = R.Bilinear(0.5, chefer=True)
    for key in (torch.matmul, torch.bmm, torch.einsum):
        reg.register(key, bilinear)
    for key in (HF_CONV1D, *R.GROUPED_MM[:1]):
        reg.register(key, linear)
    reg.register(F.silu, identity)
    _decoder_ops(reg, R.RMSNormConstantRMS(), gate=R.Bilinear(0.5, chefer=True, products_only=True))
    return reg


def attnlrp(gamma: float | None = None, epsilon: float = 1e-6) -> Registry:
    """AttnLRP (Achtibat et al., ICML 2024).

    Linear (``nn.Linear``, GPT-2's ``Conv1D``, MoE grouped products): ε-rule; LayerNorm and
    RMSNorm: normalisation held constant (identity on σ / the RMS), ε-stabilised; GELU (also
    tanh-GELU written out) / SiLU / tanh / ReLU: identity, so logit soft-capping ``tanh(x/c)·c``
    is identity too; softmax: its own gradient × input (plain autograd); products of two
    relevance-carrying tensors (``Q Kᵀ``, ``A V``, gates ``act(gate(x)) * up(x)``): uniform
    rule, each operand half; MoE routing weights: constants. ``gamma``: use LRP-γ on convolutions
    and feed-forward linear layers (recommended for ViTs). Seed: the target logit.
    """
    reg = _base("attnlrp" if gamma is None else f"attnlrp-gamma{gamma}", seed="logit")
    eps = R.Epsilon(epsilon)
    for key in (nn.Conv2d, F.conv2d):
        reg.register(key, eps)
    _linear_layers(reg, eps)
    if gamma is not None:
        g = R.Gamma(gamma, epsilon)
        reg.register(nn.Conv2d, g)
        reg.register(F.conv2d, g)
        _linear_layers(reg, g, within=in_mlp)
    ln = R.LayerNormConstantStd(epsilon)
    reg.register(nn.LayerNorm, ln)
    reg.register(F.layer_norm, ln)
    identity = R.Identity()
    for key in (nn.GELU, F.gelu, F.silu, torch.tanh, F.relu):
        reg.register(key, identity)
    reg.register(F.softmax, R.Passthrough())
    reg.register(torch.add, R.Passthrough())
    bilinear = R.Bilinear(0.5)
    for key in (torch.matmul, torch.bmm, torch.einsum):
        reg.register(key, bilinear)
    reg.register(torch.mul, R.Bilinear(0.5, products_only=True))  # gates; products with constants are linear
    _decoder_ops(reg, R.RMSNormConstantRMS(epsilon))
    _fused_attention(reg)
    return reg


def cplrp() -> Registry:
    """Conservative propagation, CP-LRP (Ali et al., ICML 2022).

    Attention probabilities and the LayerNorm standard deviation (the RMS of RMSNorm) are held
    constant, so the attention head and the normalisations are linear in their value path;
    everything else is gradient × input (LRP-0), with the identity rule on pointwise activations
    (tanh-GELU and soft-capping included), the uniform rule on gates ``act(gate(x)) * up(x)``
    and MoE routing weights held constant. With zero biases the input relevance sums to the
    target logit exactly. ``F.scaled_dot_product_attention`` runs by its own kernel with no
    gradient to ``q, k`` (the same rules, no attention map kept). Seed: the target logit.
    """
    reg = _base("cplrp", seed="logit")
    for key in (nn.Conv2d, F.conv2d):
        reg.register(key, R.Passthrough())
    _linear_layers(reg, R.Passthrough())
    ln = R.LayerNormConstantStd(0.0)
    reg.register(nn.LayerNorm, ln)
    reg.register(F.layer_norm, ln)
    reg.register(F.softmax, R.Constant())
    identity = R.Identity()
    for key in (nn.GELU, F.gelu, F.silu, torch.tanh, F.relu):
        reg.register(key, identity)
    reg.register(torch.add, R.Passthrough())
    bilinear = R.Bilinear(0.5)
    for key in (torch.matmul, torch.bmm, torch.einsum):
        reg.register(key, bilinear)
    reg.register(torch.mul, R.Bilinear(0.5, products_only=True))  # gates; products with constants are linear
    _decoder_ops(reg, R.RMSNormConstantRMS())
    _fused_attention(reg)
    return reg


def libragrad() -> Registry:
    """LibraGrad (Mehri, Soleymani Baghshah & Pilehvar, CVPR 2025): the backward of a Transformer
    pruned and scaled so that gradient methods are complete (their relevance sums to the output).

    The rules modify the *gradient* a method reads (at the input, the attention probabilities, the
    blocks' tokens); the forward is the model's own. With ``g`` the gradient at an op's output:

    * LayerNorm ``γ (x − μ)/σ + β``: ``σ`` pruned (a constant of the backward), ``μ`` kept:
      ``∂ = γ g/σ − mean(γ g/σ)``; RMSNorm alike (the RMS a constant);
    * activations ``f(x) = x · s(x)`` (GELU ``s = Φ``, SiLU ``s = σ``, ReLU, tanh ...): the gate
      ``s(x)`` pruned, ``∂ = s(x) g = f(x)/x · g`` (the identity rule ``R_x = R_y``);
    * attention: the ``Q``, ``K`` paths pruned (the probabilities ``A`` a constant of the backward,
      ``∂/∂V = Aᵀ g``; the gradient *at* ``A`` is kept for the methods that read it);
    * products of ``N`` gradient-carrying factors (gates ``act(gate(x)) · up(x)``): each factor's
      gradient scaled by ``1/N``;
    * linear layers, convolutions, residual sums: the plain gradient.

    These are the rules of :func:`cplrp` (with the identity rule on activations); LibraGrad's
    point is to run gradient methods through them. Seed: the target's exact gradient at the logits.
    """
    reg = cplrp().copy("libragrad")
    reg.exact_seed = True
    reg.register(F.softmax, R.Pruned())
    return reg


presets: dict[str, Callable[[], Registry]] = {
    "chefer2021": chefer2021,
    "attnlrp": attnlrp,
    "attnlrp-gamma": lambda: attnlrp(gamma=0.25),
    "cplrp": cplrp,
    "libragrad": libragrad,
}


def register_preset(name: str, builder: Callable[[], Registry]) -> Callable[[], Registry]:
    """Register ``builder`` as the LRP preset ``name`` (a later registration of a name wins).

    Parameters
    ----------
    name:
        The preset's name, as the ``preset`` option of the LRP methods takes it.
    builder:
        A function of no arguments returning a new :class:`Registry` (each pass gets its own).

    Returns
    -------
    ``builder``, so that the function can be used as ``register_preset("mine", mine)`` after its
    definition.

    Examples
    --------
    >>> def mine():
    ...     return attnx.lrp.get_preset("attnlrp").copy("mine").register(nn.GELU, attnx.lrp.rules.Passthrough())
    >>> attnx.lrp.register_preset("mine", mine)
    >>> attnx.explain(model, x, method="lrp", preset="mine")
    """
    if not isinstance(name, str) or not name:
        raise AttnxTypeError(f"a preset name must be a non-empty string, got {name!r}")
    if not callable(builder) or isinstance(builder, Registry):
        raise AttnxTypeError(
            f"preset {name!r}: expected a function returning an attnx.lrp.Registry, got {type(builder).__name__} "
            "(pass the registry's builder, e.g. lambda: registry.copy())"
        )
    presets[name] = builder
    return builder


def unregister_preset(name: str) -> None:
    """Remove the preset ``name`` (a no-op when there is none)."""
    presets.pop(name, None)


def get_preset(preset: "str | Registry") -> Registry:
    """A registry from a preset name or a registry itself."""
    if isinstance(preset, Registry):
        return preset
    if preset not in presets:
        raise AttnxValueError(f"unknown LRP preset {preset!r}; available: {sorted(presets)} or an attnx.lrp.Registry")
    registry = presets[preset]()
    if not isinstance(registry, Registry):
        raise AttnxTypeError(f"the builder of LRP preset {preset!r} returned {type(registry).__name__}, not an attnx.lrp.Registry")
    return registry
