"""The LRP methods on decoders: every op covered (strict), every contract that does not depend on
the rules kept with ``strict=False`` too (finite, padding 0, batched = alone, callable = id, the
readout position); the rules themselves are checked in ``test_lrp_decoder_rules.py`` and
``test_lrp_registry.py``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import attnx
from conftest import max_abs_diff
from decoder_models import CASES, EAGER, params

LRP_METHODS = [("lrp", {"preset": "attnlrp"}), ("lrp", {"preset": "chefer2021"}), ("transformer_attribution", {}),
               ("partial_lrp", {})]
RUN_IDS = [f"{m}-{o.get('preset', 'default')}" for m, o in LRP_METHODS]

def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("case", params(CASES))
@pytest.mark.parametrize("run", LRP_METHODS, ids=RUN_IDS)
def test_lrp_methods_run(case, run):
    method, options = run
    model = case.model()
    x = case.inputs([9, 6, 4])
    e = quiet(attnx.explain, model, x, method=method, **options)  # strict: every op has a rule
    assert e.scores.shape == (3, 9) and torch.isfinite(e.scores).all()
    assert (e.scores[x["attention_mask"] == 0] == 0).all()
    assert e.coverage.complete


@pytest.mark.parametrize("case", params(EAGER))
@pytest.mark.parametrize("run", LRP_METHODS, ids=RUN_IDS)
def test_lrp_batched_equals_alone(case, run):
    """Each sample alone (keeping its padding: the rules' per-sample sums include it) gets the
    scores it gets in the batch. float32: in float64, Hugging Face's RoPE decoders return NaN
    logits for left-padded inputs (attnx then raises, see test_non_finite_output)."""
    method, options = run
    model = case.model()
    x = case.inputs([9, 6, 4])
    explainer = attnx.Explainer(model)
    batch = quiet(explainer, x, method=method, **options)
    scale = max(1.0, batch.scores.abs().max().item())
    for b in range(3):
        alone = quiet(explainer, {k: v[b : b + 1] for k, v in x.items()}, method=method, **options)
        assert alone.targets.tolist() == batch.targets[b : b + 1].tolist()
        # float32 rounding, amplified by chefer2021's divisions (1.04e-5 measured on an AMD EPYC)
        tol = 3e-5 if options.get("preset") == "chefer2021" else 1e-5
        assert max_abs_diff(alone.scores[0], batch.scores[b]) <= tol * scale, f"sample {b}"


def test_non_finite_output():
    """A model output that is NaN (here: a float64 Llama on a left-padded batch, as transformers
    computes it) is an error, not a NaN map."""
    case = next(c for c in EAGER if c.family == "llama" and c.is_lm)
    model = case.model(torch.float64)
    x = case.inputs([9, 6])
    with torch.no_grad():
        assert model(**x).logits[1].isnan().all()  # transformers' own output
    with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) for sample\(s\) \[1\]"):
        attnx.explain(model, x, method="rollout")


@pytest.mark.parametrize("case", params(EAGER))
@pytest.mark.parametrize("run", LRP_METHODS, ids=RUN_IDS)
def test_lrp_callable_equals_id(case, run):
    """A callable returning the logit of token c at the explained position gives the map of target=c."""
    method, options = run
    model = case.model()
    x = case.inputs([9, 6])
    explainer = attnx.Explainer(model)
    c = torch.tensor([7, 11]) if case.is_lm else torch.tensor([1, 3])
    rows = torch.arange(2)
    pos = explainer.capture(x).layout.readout

    def logit(out):
        return out.logits[rows, pos, c] if case.is_lm else out.logits[rows, c]

    a = quiet(explainer, x, method=method, target=c, **options)
    b = quiet(explainer, x, method=method, target=logit, **options)
    assert max_abs_diff(a.scores, b.scores) <= 1e-6 * max(1.0, a.scores.abs().max().item())


@pytest.mark.parametrize("case", params([c for c in EAGER if c.is_lm]))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_gradient_x_input_continuation(case, dtype):
    """gradient × input of a continuation's summed log-probability: the input relevance of each
    prompt token is the gradient computed here by autograd on the prompt + continuation alone.
    Padded prompts in float32 only (in float64 transformers' RoPE decoders give NaN with padding)."""
    model = case.model(dtype)
    x = case.inputs([9, 9] if dtype == torch.float64 else [9, 6], side="right")
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    cont = [[5, 9], [30]]
    e = attnx.explain(model, x, method="gradient_x_input", target=attnx.core.targets.Continuation(cont))
    assert e.scores.shape == (2, 9)
    for b in range(2):
        prompt = x["input_ids"][b][x["attention_mask"][b].bool()].tolist()
        ids = torch.tensor([prompt + cont[b]])
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logp = model(inputs_embeds=emb).logits[0].log_softmax(-1)
        P = len(prompt)
        s = sum(logp[P - 1 + k, t] for k, t in enumerate(cont[b]))
        (g,) = torch.autograd.grad(s, emb)
        ref = (emb * g).sum(-1)[0, :P].detach()
        assert max_abs_diff(e.scores[b][x["attention_mask"][b].bool()], ref) <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("case", params([c for c in EAGER if c.is_lm]))
@pytest.mark.parametrize("preset", ["attnlrp", "chefer2021"])
def test_strict_coverage(case, preset):
    """Every relevance-carrying op of every decoder language model has a rule (strict=True)."""
    attnx.explain(case.model(), case.inputs([9, 6]), method="lrp", preset=preset, strict=True)
