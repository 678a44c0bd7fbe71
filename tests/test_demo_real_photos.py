"""The captions of real_photos.png say what the occlusion check shows."""
from __future__ import annotations

from attnx.demo.real_photos import AGREES, occlusion_verdict


def test_occlusion_verdict_names_the_methods_that_agree_and_those_that_fail():
    text = occlusion_verdict({"generic": [0.09, -0.0, -0.55], "grad_rollout": [0.08, 0.11, -0.54],
                              "lrp": [0.49, 0.63, 0.60]})
    agree, fail = text.split("; fail it")
    assert "lrp (mean r = +0.57)" in agree and "generic" not in agree and "grad_rollout" not in agree
    assert "generic (mean r = -0.15)" in fail and "grad_rollout (mean r = -0.12)" in fail
    assert f"< {AGREES}" in fail


def test_occlusion_verdict_when_every_method_fails():
    text = occlusion_verdict({"generic": [0.1], "lrp": [0.2]})
    assert text.startswith("Fail it") and "Agree" not in text
