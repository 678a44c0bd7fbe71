"""Evaluating explanations: faithfulness, localisation, text rationales and a sanity check.

Every function takes the relevance as an :class:`attnx.Explanation` (of any method) or as a
plain tensor, works on batches, on any device and dtype, and calls the model exactly as it is
given (under ``torch.no_grad()``; no mode, flag or hook is changed). ``model`` may be any
callable: an image model is called as ``model(x)``, a text model as ``model(**batch)``; the
logits are the output itself, its ``.logits`` or its first element. Wrap models that need other
arguments in a lambda, e.g. ``lambda x: hf_vit(pixel_values=x, interpolate_pos_encoding=True)``.

Every public name below is importable from ``attnx.metrics`` itself; the modules are:

:mod:`~attnx.metrics.curves`
    Faithfulness (the model's output as its input is progressively removed):
    :func:`perturbation_curve` (Chefer et al., CVPR 2021, positive / negative perturbation),
    :func:`deletion_curve` and :func:`insertion_curve` (Petsiuk et al., RISE, BMVC 2018), with
    :func:`gaussian_blur`. They return a :class:`Curve`.
:mod:`~attnx.metrics.text`
    :func:`token_deletion_curve` (faithfulness on text, also a :class:`Curve`) and
    :func:`rationale_f1` (token-level F1 of the top-k tokens, as in ERASER, DeYoung et al. 2020).
:mod:`~attnx.metrics.localisation`
    Localisation against ground-truth masks: :func:`segmentation_scores` /
    :class:`SegmentationMeter` (the ImageNet-segmentation protocol of Chefer et al.),
    :func:`average_precision`, :func:`pointing_game` (Zhang et al., 2016), :func:`relevance_mass`
    (Arras et al., 2022), :func:`class_discrimination`.
:mod:`~attnx.metrics.sanity`
    Sanity check: :func:`parameter_randomisation` (Adebayo et al., NeurIPS 2018) over the
    :func:`randomisation_steps`, with :func:`spearman` and :func:`pearson` correlations computed
    in torch.
:mod:`~attnx.metrics.saco`
    :func:`saco`, the salience-guided faithfulness coefficient (Wu et al., CVPR 2024): do the
    groups of the map that carry more salience change the prediction more
    (:func:`saco_coefficient`, :func:`salience_groups`).
:mod:`~attnx.metrics.measures`
    How the curves call the model and the measures they record (:data:`MEASURES`).
:mod:`~attnx.metrics.common`
    The :data:`RelevanceLike` type and the checks the metrics share.

Example
-------
>>> e = attnx.explain(model, images, method="transformer_attribution")
>>> pos = attnx.metrics.perturbation_curve(model, images, e, mode="positive", labels=labels)
>>> pos.mean, pos.auc().mean()        # accuracy after removing 0, 10, ..., 90 % of the pixels
"""
from __future__ import annotations

# RelevanceLike and Measure, the type aliases of the signatures, stay importable from here (outside __all__)
from .common import RelevanceLike as RelevanceLike
from .curves import Curve, deletion_curve, gaussian_blur, insertion_curve, perturbation_curve
from .localisation import (
    ClassDiscrimination,
    SegmentationMeter,
    SegmentationScores,
    average_precision,
    class_discrimination,
    pointing_game,
    relevance_mass,
    segmentation_scores,
)
from .measures import MEASURES
from .measures import Measure as Measure
from .saco import saco, saco_coefficient, salience_groups
from .sanity import Randomisation, parameter_randomisation, pearson, randomisation_steps, randomised_copy, spearman
from .text import RationaleScores, rationale_f1, token_deletion_curve

__all__ = [
    "Curve",
    "perturbation_curve",
    "deletion_curve",
    "insertion_curve",
    "gaussian_blur",
    "token_deletion_curve",
    "rationale_f1",
    "RationaleScores",
    "SegmentationScores",
    "SegmentationMeter",
    "segmentation_scores",
    "average_precision",
    "pointing_game",
    "relevance_mass",
    "class_discrimination",
    "ClassDiscrimination",
    "parameter_randomisation",
    "Randomisation",
    "randomisation_steps",
    "randomised_copy",
    "spearman",
    "pearson",
    "MEASURES",
    "saco",
    "saco_coefficient",
    "salience_groups",
]



def __getattr__(name: str):
    # the former name of RelevanceLike (attnx.Relevance is a method's result, another thing)
    if name == "Relevance":
        import warnings

        warnings.warn("attnx.metrics.Relevance is now attnx.metrics.RelevanceLike", DeprecationWarning, stacklevel=2)
        return RelevanceLike
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
