"""Decoder language models and decoder classifiers (GPT-2, Llama, Mistral, Qwen2/3, Gemma/2/3, Phi-3).

The contract: attention is observed in every family and kernel, the readout row is the position
where the model decides (the last real token of a causal language model, the token a decoder
classifier pools), padding on either side changes nothing on the real tokens, batched results
equal per-sample ones, and the model is left as found. The readout and the targets are checked
against computations written here from the model's own outputs (``output_attentions=True``,
``torch.autograd.grad``), not against attnx.

The LRP methods on the same models: every op covered (strict), every contract that does not depend
on the rules kept with ``strict=False`` too (finite, padding 0, batched = alone, callable = id, the
readout position); the rules themselves are checked in ``test_lrp_rules.py``, the presets on the
decoder classifiers of every family (and against the authors' lxt) in ``test_lrp_registry.py``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import attnx
from attnx.core.targets import Continuation
from conftest import max_abs_diff
from decoder_models import CASES, CLASSIFIERS, EAGER, LM, PAD, params, real_tokens, word_tokenizer
from contracts import assert_unchanged, mixed_mode, snapshot

pytestmark = pytest.mark.matrix  # the decoder matrix: one decoder per family in the fast tier (decoder_models.FAST)

ATTENTION_METHODS = ["raw_attention", "rollout", "grad_rollout", "generic", "attn_gradcam", "attention_flow", "random"]
GRADIENT = ["grad_rollout", "generic", "attn_gradcam"]
TOL = 1e-5


def positions_like_generate(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch as ``generate`` builds them (written here, not imported)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def hf_pooled(ids: torch.Tensor) -> torch.Tensor:
    """The token a Hugging Face decoder classifier pools: the rightmost one that is not PAD."""
    idx = torch.arange(ids.shape[1])
    return (idx * (ids != PAD)).argmax(-1)


def readout_positions(case, x) -> torch.Tensor:
    if case.is_lm:
        mask = x["attention_mask"].bool()
        return torch.tensor([int(torch.nonzero(m).max()) for m in mask])
    return hf_pooled(x["input_ids"])


def manual_forward(case, model, x):
    """The model's own forward with attentions (eager kernel), as the library's users call it."""
    model.set_attn_implementation("eager")
    kw = dict(x)
    if case.is_lm and not bool(x["attention_mask"].all()):
        kw["position_ids"] = positions_like_generate(x["attention_mask"])
    return model(**kw, output_attentions=True, use_cache=False)


# --------------------------------------------------------------------------------------------
# adapter, layout, every attention method
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", params(CASES))
def test_layout_and_logits(case):
    """hf_decoder is chosen; the readout is the last real token (LM) or what HF pools (classifier);
    the explained logits are the model's own at that position."""
    model = case.model()
    x = case.inputs([9, 6, 4])
    e = attnx.Explainer(model)
    assert e.adapter.name == "hf_decoder"
    trace = e.capture(x)
    layout = trace.layout
    assert layout.prefix_tokens == 0 and layout.grid is None and layout.causal
    assert layout.readout.tolist() == readout_positions(case, x).tolist()
    if case.is_lm:
        assert layout.readout.tolist() == [8, 8, 8]  # left padding: the last position
    else:
        assert layout.readout.tolist() == [8, 5, 3]  # right padding: per sample
    with torch.no_grad():
        ref = manual_forward(case, case.model(), x).logits
    if case.is_lm:
        ref = ref[torch.arange(3), readout_positions(case, x)]
    assert max_abs_diff(trace.logits, ref) < TOL
    assert len(trace.attentions) == 3 and trace.attentions[0].shape == (3, 4, 9, 9)
    if case.is_lm:
        assert trace.targets.tolist() == ref.argmax(-1).tolist()
        assert trace.explained_tokens.tolist() == ref.argmax(-1)[:, None].tolist()


@pytest.mark.parametrize("case", params(CASES))
@pytest.mark.parametrize("method", ATTENTION_METHODS)
def test_attention_methods_run(case, method):
    """Every attention method gives finite (B, T) scores, 0 on padding, and not the readout-at-token-0
    map of a causal model (all mass on the first token)."""
    model = case.model()
    x = case.inputs([9, 6, 4])
    e = attnx.explain(model, x, method=method)
    assert e.scores.shape == (3, 9) and torch.isfinite(e.scores).all()
    assert (e.scores[x["attention_mask"] == 0] == 0).all()
    for b in range(3):
        real = e.scores[b][x["attention_mask"][b].bool()]
        if method == "attn_gradcam":  # (mean_h w_h A_h)⁺ is 0 wherever the weighted sum is negative
            continue
        assert real.max() > real.min(), f"sample {b}: a constant map"
        if method != "random":
            assert real[1:].abs().sum() > 0.01 * real.abs().sum(), f"sample {b}: everything on the first token"


@pytest.mark.parametrize("case", params(CASES))
@pytest.mark.parametrize("method", ATTENTION_METHODS)
def test_batched_equals_alone(case, method):
    """A padded batch (left padding for language models, right for classifiers) gives each sample
    the scores of the sample alone without padding."""
    model = case.model()
    x = case.inputs([9, 6, 4])
    explainer = attnx.Explainer(model)
    batched = explainer(x, method=method)
    for b in range(3):
        alone = explainer(real_tokens(x, b), method=method)
        keep = x["attention_mask"][b].bool()
        assert alone.targets is None or alone.targets.tolist() == batched.targets[b : b + 1].tolist()
        assert max_abs_diff(batched.scores[b][keep], alone.scores[0]) <= TOL, f"sample {b}"


@pytest.mark.parametrize("case", params([c for c in CASES if c.impl == "eager" and c.name != "gpt2_cls_eager"]))
def test_either_padding_side(case):
    """Left and right padding give the same scores on the real tokens (per-sample readout).

    Not for GPT-2's classifier: called as users call it (no position ids), left padding shifts its
    absolute positions and so changes its output; the language models get generate's positions.
    """
    model = case.model()
    explainer = attnx.Explainer(model)
    left = case.inputs([9, 6, 4], side="left")
    right = case.inputs([9, 6, 4], side="right")
    for method in ("rollout", "generic"):
        a, b = explainer(left, method=method), explainer(right, method=method)
        for i in range(3):
            assert max_abs_diff(a.scores[i][left["attention_mask"][i].bool()], b.scores[i][right["attention_mask"][i].bool()]) <= TOL


@pytest.mark.parametrize("case", params([c for c in EAGER if c.family in ("mistral", "qwen2", "gemma2", "gemma3")]))
def test_sliding_window_layers(case):
    """Sliding-window layers are recorded with their window (4 keys: zero further back), full
    layers without; every layer is causal. (GQA: one map per query head.)"""
    model = case.model()
    types = getattr(model.config, "layer_types", None) or ["sliding_attention"] * 3
    trace = attnx.Explainer(model).capture(case.inputs([9, 9]))
    i = torch.arange(9)[:, None]
    j = torch.arange(9)[None, :]
    assert any(t == "sliding_attention" for t in types)
    for layer, (a, kind) in enumerate(zip(trace.attentions, types)):
        assert a.shape == (2, 4, 9, 9)
        assert (a[..., j > i] == 0).all(), f"layer {layer} is not causal"
        far = a[..., (i - j) >= 4]
        if kind == "sliding_attention":
            assert (far == 0).all(), f"layer {layer}: attention outside the window"
        else:
            assert (far > 0).any(), f"layer {layer}: a full layer looks windowed"


@pytest.mark.parametrize("case", params([c for c in CASES if c.impl == "sdpa"]))
def test_sdpa_model_equals_eager_model(case):
    """A model loaded with sdpa is switched to eager while explained: the same maps as the same
    weights loaded with eager, and the intercept adapter (SDPA written out) sees the same attentions."""
    sdpa = case.model()
    eager = type(case)(case.family, case.head, "eager").model()
    x = case.inputs([9, 6, 4])
    a = attnx.Explainer(sdpa).capture(x, gradients=True)
    b = attnx.Explainer(eager).capture(x, gradients=True)
    c = attnx.Explainer(sdpa, adapter="intercept").capture(x, gradients=True)
    for la, lb, lc in zip(a.attentions, b.attentions, c.attentions):
        assert max_abs_diff(la, lb) <= TOL
        mask = (x["attention_mask"].bool()[:, None, :, None] & x["attention_mask"].bool()[:, None, None, :])
        assert max_abs_diff(la * mask, lc * mask) <= TOL  # padding rows differ by the kernel's choice
    for ga, gb in zip(a.gradients, b.gradients):
        assert max_abs_diff(ga, gb) <= 1e-4
    assert sdpa.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("case", params(CASES))
def test_model_left_as_found(case):
    """Flags, kernel, training modes, hooks, .grad: everything is restored."""
    model = mixed_mode(case.model())
    x = case.inputs([9, 6])
    before = snapshot(model)
    for method in ("rollout", "generic", "attention_flow"):
        attnx.explain(model, x, method=method)
        assert_unchanged(before, model)
    if case.is_lm:
        attnx.explain(model, x, method="grad_rollout", target=Continuation([5, 7]))
        assert_unchanged(before, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LRP rules for these families are work in progress
        attnx.explain(model, x, method="transformer_attribution")
    assert_unchanged(before, model)


# --------------------------------------------------------------------------------------------
# the readout row, checked by hand
# --------------------------------------------------------------------------------------------
def by_hand_rollout(attentions, gradients, rows, positions):
    """Gradient rollout written out: (A ⊙ ∇A)⁺ head-mean, (Ā + I)/2 row-normalised, full products."""
    N = attentions[0].shape[-1]
    out = []
    for b in range(attentions[0].shape[0]):
        C = torch.eye(N, dtype=torch.float64)
        for a, g in zip(attentions, gradients):
            fused = (a[b].double() * g[b].double()).mean(0).clamp(min=0)
            m = (fused + torch.eye(N, dtype=torch.float64)) / 2
            C = (m / m.sum(-1, keepdim=True)) @ C
        out.append(C[rows[b]].mean(0) if isinstance(rows[b], list) else C[rows[b]])
    return torch.stack(out)


@pytest.mark.parametrize("case", params(EAGER))
def test_readout_row_by_hand(case):
    """grad_rollout's scores are the row of the explained position of a rollout computed here from
    the model's own attentions and the gradient of the model's own logit at that position."""
    x = case.inputs([9, 6, 4])
    model = case.model()
    target = [7, 11, 3] if case.is_lm else [1, 4, 0]
    out = manual_forward(case, model, x)
    pos = readout_positions(case, x)
    logit = out.logits[torch.arange(3), pos] if case.is_lm else out.logits
    score = logit[torch.arange(3), torch.tensor(target)].sum()
    grads = torch.autograd.grad(score, out.attentions)
    ref = by_hand_rollout([a.detach() for a in out.attentions], grads, pos.tolist(), pos)
    ref = ref * x["attention_mask"]
    e = attnx.explain(case.model(), x, method="grad_rollout", target=target)
    assert max_abs_diff(e.scores, ref) <= TOL
    # the readout is not token 0: its row differs from token 0's
    assert max_abs_diff(e.scores, by_hand_rollout([a.detach() for a in out.attentions], grads, [0, 0, 0], None) * x["attention_mask"]) > 1e-3


def test_classifier_padding_warning():
    """A classifier padded with another token than config.pad_token_id reads padding: a warning."""
    case = CLASSIFIERS[0]
    x = case.inputs([9, 6])
    x["input_ids"][1, 6:] = 3  # padding that is not the pad token
    with pytest.warns(UserWarning, match=r"reads sample\(s\) \[1\] at a padding token"):
        attnx.explain(case.model(), x, method="rollout")


# --------------------------------------------------------------------------------------------
# targets: ids, strings, continuations, callables
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", params([c for c in LM if c.impl == "eager"]))
def test_string_and_id_targets_agree(case):
    tok = word_tokenizer()
    model = case.model()
    x = case.inputs([9, 6])
    explainer = attnx.Explainer(model, tokenizer=tok)
    by_id = explainer(x, method="generic", target=[17, 42])
    by_text = explainer(x, method="generic", target=["w17", "w42"])
    assert by_text.targets.tolist() == [17, 42]
    assert max_abs_diff(by_id.scores, by_text.scores) == 0
    one = explainer(x, method="generic", target="w17")
    assert one.targets.tolist() == [17, 17]
    with pytest.warns(UserWarning, match="2 tokens"):
        two = explainer(x, method="generic", target="w17 w42")  # the first token
    assert max_abs_diff(one.scores, two.scores) == 0
    with pytest.raises(ValueError, match="needs a tokenizer"):
        attnx.Explainer(model)(x, method="generic", target="w17")
    with pytest.raises(ValueError, match="out of range: the model has a vocabulary of 60 tokens"):
        explainer(x, method="generic", target=60)


def log_probability_by_hand(model, prompt: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    P = len(prompt)
    return sum(float(logp[P - 1 + k, c]) for k, c in enumerate(continuation))


@pytest.mark.parametrize("case", params(LM))
def test_continuation_target(case):
    """The continuation's score is the summed log-probability of its tokens (computed here on each
    prompt + continuation alone); batched = alone for gradient methods; one forward, one backward."""
    model = case.model()
    x = case.inputs([9, 6, 4])
    conts = [[5, 9, 12], [30], [8, 8]]
    explainer = attnx.Explainer(model, check_forward="never")  # the pass alone (the check adds one plain forward)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        e = explainer(x, method="grad_rollout", target=Continuation(conts))
    finally:
        handle.remove()
    assert len(calls) == 1
    assert e.targets is None and e.scores.shape == (3, 9)
    assert e.explained_tokens.tolist() == [[5, 9, 12], [30, -1, -1], [8, 8, -1]]
    for b in range(3):
        prompt = x["input_ids"][b][x["attention_mask"][b].bool()].tolist()
        assert abs(float(e.target_scores[b]) - log_probability_by_hand(model, prompt, conts[b])) < 1e-4
        alone = explainer(real_tokens(x, b), method="grad_rollout", target=Continuation([conts[b]]))
        keep = x["attention_mask"][b].bool()
        assert max_abs_diff(e.scores[b][keep], alone.scores[0]) <= TOL
        assert (e.scores[b][~keep] == 0).all()
    # the explained logits are the next-token logits of the prompt
    plain = explainer(x, method="raw_attention")
    assert max_abs_diff(e.logits, plain.logits) <= TOL


@pytest.mark.parametrize("case", params([c for c in LM if c.impl == "eager"]))
def test_continuation_readout_by_hand(case):
    """Rollout for a continuation reads the mean of the rows predicting its tokens, over the
    prompt columns; a right-padded prompt gives the same scores in its own layout."""
    model = case.model()
    x = case.inputs([9, 6], side="right")
    conts = [[5, 9], [30, 31, 32]]
    e = attnx.explain(model, x, method="rollout", target=Continuation(conts))
    for b in range(2):
        prompt = x["input_ids"][b][x["attention_mask"][b].bool()].tolist()
        ids = torch.tensor([prompt + conts[b]])
        with torch.no_grad():
            att = model(input_ids=ids, output_attentions=True).attentions
        N = ids.shape[1]
        C = torch.eye(N, dtype=torch.float64)
        for a in att:
            m = (a[0].double().mean(0) + torch.eye(N, dtype=torch.float64)) / 2
            C = (m / m.sum(-1, keepdim=True)) @ C
        P, K = len(prompt), len(conts[b])
        row = C[P - 1 : P - 1 + K].mean(0)[:P]
        keep = x["attention_mask"][b].bool()
        assert max_abs_diff(e.scores[b][keep], row) <= TOL
        assert (e.scores[b][~keep] == 0).all()
    left = attnx.explain(model, case.inputs([9, 6], side="left"), method="rollout", target=Continuation(conts))
    for b in range(2):
        assert max_abs_diff(left.scores[b][left.layout.score_mask(2, torch.device("cpu"))[b]],
                            e.scores[b][x["attention_mask"][b].bool()]) <= TOL


def test_continuation_text_and_errors():
    case = LM[0]
    tok = word_tokenizer()
    model = case.model()
    x = case.inputs([9, 6])
    explainer = attnx.Explainer(model, tokenizer=tok)
    a = explainer(x, method="generic", target=Continuation("w5 w9"))
    b = explainer(x, method="generic", target=Continuation([5, 9]))
    assert max_abs_diff(a.scores, b.scores) == 0 and a.explained_tokens.tolist() == [[5, 9], [5, 9]]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        attnx.explain(model, x, method="generic", target=Continuation("w5"))
    with pytest.raises(ValueError, match="2 continuations for a batch of 3"):
        attnx.explain(model, case.inputs([9, 6, 4]), method="generic", target=Continuation([[5], [6]]))
    with pytest.raises(ValueError, match="must be in 0..59"):
        attnx.explain(model, x, method="generic", target=Continuation([5, 60]))
    with pytest.raises(TypeError, match="needs a causal language model"):
        attnx.explain(CLASSIFIERS[0].model(), CLASSIFIERS[0].inputs([9, 6]), method="generic", target=Continuation([5]))


@pytest.mark.parametrize("case", params(EAGER))
@pytest.mark.parametrize("method", GRADIENT)
def test_callable_target_equals_id(case, method):
    """A callable returning the logit of token (class) c at the explained position gives the map
    of target=c; a logit difference is a different map."""
    model = case.model()
    x = case.inputs([9, 6])
    pos = readout_positions(case, x)
    rows = torch.arange(2)
    c = torch.tensor([7, 11]) if case.is_lm else torch.tensor([1, 3])

    def at(out):
        return out.logits[rows, pos] if case.is_lm else out.logits

    explainer = attnx.Explainer(model)
    by_id = explainer(x, method=method, target=c)
    by_fn = explainer(x, method=method, target=lambda out: at(out)[rows, c])
    assert by_fn.targets is None
    assert max_abs_diff(by_id.scores, by_fn.scores) <= 1e-6
    if method != "attn_gradcam":  # its clamp may zero both maps
        diff = explainer(x, method=method, target=lambda out: at(out)[rows, c] - at(out)[rows, c + 1])
        assert max_abs_diff(diff.scores, by_id.scores) > 1e-4


@pytest.mark.parametrize("case", params([c for c in EAGER if c.family in ("llama", "gpt2")]))
def test_discard_ratio_counts_attending_pairs(case):
    """In a causal model rollout's discard_ratio ranks the pairs that may attend (key <= query),
    outside the readout row: checked against rollout with discarding written out here. (Counting
    the masked future pairs, which are zero anyway, would spend the budget on them: with 0.4 and
    9 tokens nothing real would be discarded.)"""
    model = case.model()
    x = case.inputs([9, 9])
    ratio = 0.4
    e = attnx.explain(model, x, method="rollout", discard_ratio=ratio)
    plain = attnx.explain(model, x, method="rollout")
    assert max_abs_diff(e.scores, plain.scores) > 1e-3
    with torch.no_grad():
        att = manual_forward(case, case.model(), x).attentions
    pos = readout_positions(case, x)
    N = 9
    tril = torch.ones(N, N, dtype=torch.bool).tril()
    for b in range(2):
        cand = tril.clone()
        cand[pos[b]] = False
        k = int(cand.sum().item() * ratio)
        C = torch.eye(N, dtype=torch.float64)
        for a in att:
            fused = a[b].double().mean(0)
            values = fused[cand]
            drop_at = torch.nonzero(cand)[values.argsort()[:k]]
            fused = fused.clone()
            fused[drop_at[:, 0], drop_at[:, 1]] = 0
            m = (fused + torch.eye(N, dtype=torch.float64)) / 2
            C = (m / m.sum(-1, keepdim=True)) @ C
        assert max_abs_diff(e.scores[b], C[pos[b]]) <= TOL


@pytest.mark.parametrize("case", params([c for c in LM if c.impl == "eager" and c.family in ("llama", "gpt2", "gemma2")]))
def test_output_layer_only_at_explained_positions(case):
    """A token or continuation target reads the logits at the explained positions only, so the
    output layer runs on the positions from the first explained one on; a callable sees every
    position. The maps are those of the full computation (the callable's)."""
    model = case.model()
    seen: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        for side in ("left", "right"):
            x = case.inputs([9, 6], side=side)
            pos = readout_positions(case, x)
            rows = torch.arange(2)
            c = torch.tensor([7, 11])
            for method in ("generic", "lrp"):
                seen.clear()
                by_id = attnx.explain(model, x, method=method, target=c)
                assert set(seen) == {9 - int(pos.min())}, (side, method, seen)
                seen.clear()
                # the target is called within this iteration, on its own rows, pos and c
                by_fn = attnx.explain(model, x, method=method, target=lambda out: out.logits[rows, pos][rows, c])  # noqa: B023
                assert set(seen) == {9}
                assert max_abs_diff(by_id.scores, by_fn.scores) <= 1e-6 * (1 + by_fn.scores.abs().max())
        seen.clear()
        attnx.explain(model, case.inputs([9, 6]), method="lrp", target=Continuation([[5, 9, 12], [30]]))
        assert set(seen) == {3 + 1}  # the last prompt position and the continuation's
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# the LRP methods
# --------------------------------------------------------------------------------------------
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
