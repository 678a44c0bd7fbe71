"""The public names of attnx.metrics: every name it exported as a single module is still there."""
from __future__ import annotations

import importlib

import attnx

#: ``attnx.metrics.__all__`` when attnx.metrics was one module
OLD_ALL = [
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
    "spearman",
    "pearson",
    "MEASURES",
]
#: its other public names of its own (not imports): the type aliases of the signatures
OLD_ALIASES = ["Relevance", "Measure"]
#: names made public by the split (a helper other modules of attnx use), and the metrics added since
NEW = ["randomisation_steps", "randomised_copy", "saco", "saco_coefficient", "salience_groups"]


def test_public_names_are_kept_and_importable():
    metrics = importlib.import_module("attnx.metrics")
    assert sorted(metrics.__all__) == sorted(OLD_ALL + NEW)
    assert len(set(metrics.__all__)) == len(metrics.__all__)
    for name in metrics.__all__ + OLD_ALIASES:
        namespace: dict = {}
        exec(f"from attnx.metrics import {name}", namespace)
        assert namespace[name] is getattr(metrics, name) is getattr(attnx.metrics, name), name
    star: dict = {}
    exec("from attnx.metrics import *", star)
    assert set(OLD_ALL + NEW) <= set(star)
