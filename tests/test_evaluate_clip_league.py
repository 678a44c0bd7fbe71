"""The clip league on one two-garment scene: columns in range, the zero-shot scorer is the CLIP's own
logits, and the CLI writes the table and the verdict."""
from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch

from attnx import zoo
from attnx.evaluate.clip_league import ZeroShotLogits, evaluate_clip
from attnx.evaluate.columns import SANITY_ROW
from cli_runner import run


def test_zero_shot_scorer_is_the_models_logits():
    loaded = zoo.clip_model()
    x = loaded.preprocess(zoo.scenes().images[:2])
    prompts = loaded.info["prompts"]
    tok = loaded.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = loaded.model.get_text_features(**tok)
        text = getattr(text, "pooler_output", text)
        own = loaded.model(pixel_values=x, **tok).logits_per_image
        assert torch.allclose(ZeroShotLogits(loaded.model, text)(x), own, atol=1e-4)


def test_one_scene(capsys, tmp_path):
    t = evaluate_clip(["rollout", "transformer_attribution"], limit=1, baselines=False)
    assert t.methods == ["rollout", "transformer_attribution", SANITY_ROW] and not t.failed
    for m in t.methods:
        r = t.row(m)
        assert r["discrimination"] in (0.0, 0.5, 1.0) and 0 <= r["mass"] <= 1 and -1 <= r["saco"] <= 1
        assert 0 <= r["deletion_auc"] <= 1
    assert t.row("rollout")["discrimination"] == 0.5  # class-agnostic: the same map for both garments
    status, out, err = run(capsys, "evaluate", "--task", "clip", "--limit", "1", "--methods", "rollout", "--no-baselines",
                           "--quiet", "--out", str(tmp_path))
    assert status == 0, err
    assert (tmp_path / "league_clip.csv").read_text().startswith("method,discrimination,discrimination_se,")
    assert "**rollout**" in (tmp_path / "verdict.md").read_text()
