"""Layer-wise relevance propagation on stock models: rules, registries and the engine.

See :mod:`attnx.lrp.rules` (the convention and the rules), :mod:`attnx.lrp.registry` (module
types and torch functions -> rules, the presets ``chefer2021``, ``attnlrp``, ``attnlrp-gamma``,
``cplrp``) and :mod:`attnx.lrp.engine` (applying a registry during a forward).
"""
from .engine import LINEAR_OPS, LRPEngine, UncoveredOpError
from .passes import RelevancePass, relevance_pass
from .registry import FUNCTION_ALIASES, Registry, get_preset, in_attention, in_mlp, presets
from . import rules

__all__ = [
    "FUNCTION_ALIASES",
    "LINEAR_OPS",
    "LRPEngine",
    "Registry",
    "RelevancePass",
    "UncoveredOpError",
    "get_preset",
    "in_attention",
    "in_mlp",
    "presets",
    "relevance_pass",
    "rules",
]
