"""The class names a model carries, and class targets given by name.

Sources, in order: a Hugging Face ``config.id2label``; a timm model's ``pretrained_cfg``
(``label_names``, or the ImageNet names timm infers for a 1000 / 11821 / ... class head of a
model pretrained on an ImageNet subset). The names are used only when there is one per output
class.
"""
from __future__ import annotations

import difflib
from typing import Any, Sequence

from torch import nn

from ..errors import AttnxValueError

__all__ = ["class_index", "class_names", "multi_label"]


def output_classes(model: nn.Module) -> int | None:
    """The number of output classes of a classifier, when the model says it."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "id2label", None):
        return int(getattr(config, "num_labels", len(config.id2label)))
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def class_names(model: nn.Module) -> list[str] | None:
    """The name of each output class of ``model``, or ``None`` when it carries none."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) if config is not None else None
    if id2label:
        return [str(id2label[i]) for i in sorted(id2label)]
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return None
    n = output_classes(model)
    names = cfg.get("label_names")
    if names is not None and (n is None or len(names) == n):
        return [str(x) for x in names]
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            names = ImageNetInfo(subset).label_descriptions()
            if n is None or len(names) == n:
                return list(names)
    except Exception:  # no timm, or a config timm does not know: no names
        return None
    return None


def multi_label(model: nn.Module) -> bool:
    """Whether the model's head is multi-label (one sigmoid per class, not a softmax): a Hugging Face
    ``config.problem_type`` of ``"multi_label_classification"``, or ``multi_label`` in a timm
    ``pretrained_cfg``."""
    config = getattr(model, "config", None)
    if getattr(config, "problem_type", None) == "multi_label_classification":
        return True
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and bool(cfg.get("multi_label", False))


def normalised(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def class_index(name: str, names: Sequence[str] | None, model: Any = None) -> int:
    """The index of the class called ``name`` (case, ``_`` and spaces ignored; a comma-separated
    synonym of an ImageNet description counts).

    Raises one line with the closest names on a typo, or saying that string targets need a
    language model or a model with class names when ``names`` is ``None``.
    """
    what = type(model).__name__ if model is not None else "the model"
    if not names:
        raise AttnxValueError(
            f"target {name!r} is a string, but {what} is a classifier without class names: string targets need a "
            "language model (attnx.Explainer(model, tokenizer=tok)) or a model with labels (Hugging Face "
            "config.id2label, timm pretrained_cfg label_names); give a class index"
        )
    key = normalised(name)
    for i, n in enumerate(names):
        if normalised(n) == key or key in (normalised(s) for s in n.split(",")):
            return i
    close = difflib.get_close_matches(key, [normalised(n) for n in names], n=3, cutoff=0.6)
    shown = [names[[normalised(n) for n in names].index(c)] for c in close]
    hint = f"; did you mean {' or '.join(repr(s) for s in shown)}?" if shown else ""
    examples = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
    raise AttnxValueError(f"target {name!r} is not a class name of {what} ({len(names)} classes: {examples}){hint}")
