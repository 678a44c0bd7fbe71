"""Layer-wise relevance propagation on stock models: rules, registries and the engine.

See :mod:`attnx.lrp.rules` (the convention and the rules), :mod:`attnx.lrp.registry` (module
types, module kinds and torch functions -> rules, the presets ``chefer2021``, ``attnlrp``,
``attnlrp-gamma``, ``cplrp``; users add theirs with :func:`register_preset`), :mod:`attnx.lrp.kinds` (families of modules recognised by a
predicate: RMSNorm, written-out activations, GPT-2's Conv1D, MoE routers),
:mod:`attnx.lrp.decompositions` (attention kernels written out), :mod:`attnx.lrp.fused_attention`
(LRP through the model's own attention kernel), :mod:`attnx.lrp.engine`
(applying a registry during a forward, strict by default) and :mod:`attnx.lrp.coverage` (what a
pass did with every op). The pass itself runs in :mod:`attnx.core.trace`.
"""
from . import kinds, rules
from .coverage import Coverage
from .engine import LINEAR_OPS, LRPEngine, UncoveredOpError
from .fused_attention import FusedAttention
from .kinds import ModuleKind
from .registry import (
    FUNCTION_ALIASES,
    Registry,
    get_preset,
    in_attention,
    in_mlp,
    presets,
    register_preset,
    unregister_preset,
)

__all__ = [
    "Coverage",
    "FUNCTION_ALIASES",
    "FusedAttention",
    "LINEAR_OPS",
    "LRPEngine",
    "ModuleKind",
    "Registry",
    "UncoveredOpError",
    "get_preset",
    "in_attention",
    "in_mlp",
    "kinds",
    "presets",
    "register_preset",
    "rules",
    "unregister_preset",
]
