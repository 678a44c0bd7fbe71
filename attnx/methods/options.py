"""Options shared by several methods, declared once (each method may change the default)."""
from __future__ import annotations

from ..errors import AttnxValueError
from ..lrp.registry import Registry, presets
from .registry import Option


def preset_or_registry(value):
    """A preset name from ``attnx.lrp.presets`` or an :class:`attnx.lrp.Registry`."""
    if isinstance(value, Registry) or (isinstance(value, str) and value in presets):
        return value
    raise AttnxValueError(f"unknown LRP preset {value!r}; available: {sorted(presets)} or an attnx.lrp.Registry")


HEAD_FUSION = Option("head_fusion", "mean", "how the heads of a layer are fused", kind=str, choices=("mean", "max", "min"))
DISCARD_RATIO = Option(
    "discard_ratio", 0.0, "fraction of the smallest fused attentions zeroed per layer (never in the readout row)",
    kind=float, bounds=(0, 1), high_open=True,
)
START_LAYER = Option("start_layer", 0, "first layer of the product (negative counts from the end)", kind=int)
LAYER = Option("layer", -1, "the layer read (negative counts from the end)", kind=int)
PRESET = Option(
    "preset", "attnlrp", "LRP rule registry: a name from attnx.lrp.presets or an attnx.lrp.Registry",
    trace=True, check=preset_or_registry,
)
PATCH_SIZE = Option(
    "patch_size", None, "pixels per patch, for image models whose token layout attnx cannot know",
    kind=int, allow_none=True, trace=True,
)
STRICT = Option(
    "strict", True,
    "raise attnx.lrp.UncoveredOpError when a relevance-carrying op matches no rule (False: warn and proceed)",
    kind=bool, trace=True,
)
LIBRAGRAD = Option(
    "libragrad", False,
    "take the gradients through LibraGrad's pruned and scaled backward (attnx.lrp.presets['libragrad'], Mehri et al., CVPR 2025)",
    kind=bool, trace=True,
)
