"""Every method against an independent reference written from DESIGN.md §4.

The references take the attentions and gradients of :meth:`attnx.Explainer.capture` and compute
the method with full ``N × N`` matrix products in float64, one sample and one layer at a time
(explicit loops, no attnx helper), then read the readout row: the class token's row, or the mean
of the real content rows for models that pool their patches. Discarding is written out as a
sort of the candidate entries of each sample's fused map.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import attnx
from conftest import ALL, CASES, ids

pytestmark = pytest.mark.matrix  # the model matrix: one model per architecture in the fast tier (conftest.FAST_CASES)

DT = torch.float64
LENGTHS = [9, 6, 4]
TARGETS = [1, 4, 2]


# --------------------------------------------------------------------------------------------
# the references (per sample b; A, G are lists over layers of (H, N, N))
# --------------------------------------------------------------------------------------------
def fuse(a: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return a.sum(0) / a.shape[0]
    if how == "max":
        return a.max(0).values
    if how == "min":
        return a.min(0).values
    raise AssertionError(how)


def readout_vector(case, valid: torch.Tensor) -> torch.Tensor:
    """The readout as a weight vector over the N rows: one-hot at the class token, or the
    uniform mean of the real content (non-prefix) tokens."""
    N = valid.shape[0]
    if case.readout is not None:
        w = torch.zeros(N, dtype=DT)
        w[list(case.readout_rows)] = 1.0 / len(case.readout_rows)
        return w
    content = valid.clone()
    content[: case.prefix_tokens] = False
    return content.to(DT) / content.sum()


def discard(m: torch.Tensor, ratio: float, case, valid: torch.Tensor) -> torch.Tensor:
    """Zero the floor(ratio * #candidates) smallest candidates; candidates are pairs of real
    tokens outside the readout token's row (ties broken by position, row-major)."""
    N = m.shape[0]
    candidates = [
        (m[i, j].item(), i * N + j)
        for i in range(N)
        for j in range(N)
        if valid[i] and valid[j] and i not in case.readout_rows
    ]
    k = math.floor(ratio * len(candidates))
    out = m.clone()
    for _, flat in sorted(candidates)[:k]:
        out[flat // N, flat % N] = 0.0
    return out


def rollout_product(fused_layers, ratio, case, valid) -> torch.Tensor:
    N = valid.shape[0]
    eye = torch.eye(N, dtype=DT)
    C = eye.clone()
    for fused in fused_layers:  # forward order: later layers multiply on the left
        a = (discard(fused, ratio, case, valid) + eye) / 2
        a = a / a.sum(dim=1, keepdim=True)
        C = a @ C
    return C


def ref_raw_attention(case, A, G, valid, layer=-1, head_fusion="mean"):
    return readout_vector(case, valid) @ fuse(A[layer], head_fusion)


def ref_rollout(case, A, G, valid, head_fusion="mean", discard_ratio=0.0, start_layer=0):
    s = start_layer % len(A)
    C = rollout_product([fuse(A[l], head_fusion) for l in range(s, len(A))], discard_ratio, case, valid)
    return readout_vector(case, valid) @ C


def ref_grad_rollout(case, A, G, valid, discard_ratio=0.0, start_layer=0):
    s = start_layer % len(A)
    fused = [torch.clamp((A[l] * G[l]).sum(0) / A[l].shape[0], min=0) for l in range(s, len(A))]
    return readout_vector(case, valid) @ rollout_product(fused, discard_ratio, case, valid)


def ref_generic(case, A, G, valid):
    N = valid.shape[0]
    R = torch.eye(N, dtype=DT)
    for l in range(len(A)):
        abar = torch.clamp(G[l] * A[l], min=0).sum(0) / A[l].shape[0]
        R = R + abar @ R
    return readout_vector(case, valid) @ R


def ref_attn_gradcam(case, A, G, valid, layer=-1):
    w = readout_vector(case, valid)
    content = valid.clone()
    content[: case.prefix_tokens] = False
    H = A[layer].shape[0]
    out = torch.zeros(valid.shape[0], dtype=DT)
    for h in range(H):
        a_row = w @ A[layer][h]
        g_row = w @ G[layer][h]
        weight = g_row[content].sum() / content.sum()
        out = out + weight * a_row / H
    return torch.clamp(out, min=0)


REFERENCES = {
    "raw_attention": ref_raw_attention,
    "rollout": ref_rollout,
    "grad_rollout": ref_grad_rollout,
    "generic": ref_generic,
    "attn_gradcam": ref_attn_gradcam,
}

CONFIGS = [
    ("raw_attention", {}),
    ("raw_attention", {"layer": 0, "head_fusion": "max"}),
    ("raw_attention", {"layer": 1, "head_fusion": "min"}),
    ("rollout", {}),
    ("rollout", {"head_fusion": "max"}),
    ("rollout", {"head_fusion": "min", "discard_ratio": 0.5}),
    ("rollout", {"discard_ratio": 0.3}),
    ("rollout", {"head_fusion": "max", "discard_ratio": 0.9, "start_layer": 1}),
    ("rollout", {"start_layer": -1}),
    ("grad_rollout", {}),
    ("grad_rollout", {"discard_ratio": 0.5}),
    ("grad_rollout", {"start_layer": 2}),
    ("generic", {}),
    ("attn_gradcam", {}),
    ("attn_gradcam", {"layer": 0}),
]


def config_id(c):
    return c[0] + "".join(f"-{k}={v}" for k, v in c[1].items())


def test_every_core_method_has_a_reference():
    core = {"raw_attention", "rollout", "grad_rollout", "generic", "attn_gradcam"}
    assert core <= set(attnx.list_methods())
    assert set(REFERENCES) == core


@functools.lru_cache(maxsize=None)
def prepared(name: str):
    case = CASES[name]
    model = case.model(DT)
    x = case.inputs(3, dtype=DT, lengths=LENGTHS if case.is_text else None)
    explainer = attnx.Explainer(model)
    captured = explainer.capture(x, target=TARGETS, gradients=True)
    return case, explainer, x, captured


@pytest.mark.parametrize("config", CONFIGS, ids=[config_id(c) for c in CONFIGS])
@pytest.mark.parametrize("name", ids(ALL))
def test_method_matches_reference(name, config):
    method, options = config
    case, explainer, x, captured = prepared(name)
    B, N = 3, case.num_tokens
    valid = x["attention_mask"].bool() if case.is_text else torch.ones(B, N, dtype=torch.bool)
    expected = torch.stack([
        REFERENCES[method](
            case,
            [a[b] for a in captured.attentions],
            [g[b] for g in captured.gradients],
            valid[b],
            **options,
        )
        for b in range(B)
    ])
    e = explainer.explain(x, method=method, target=TARGETS, **options)
    assert e.token_relevance.dtype == DT
    tolerance = dict(rtol=1e-9, atol=1e-12)
    if case.attn_implementation == "sdpa" and method in ("generic", "grad_rollout", "attn_gradcam", "rollout",
                                                         "raw_attention"):
        # these keep the model's sdpa kernel and recompute A in float64 (attnx.adapters.fused_kernel);
        # the captured reference A comes from the eager kernel, whose softmax Hugging Face computes
        # in float32 (2e-7 apart)
        tolerance = dict(rtol=1e-5, atol=1e-7 * float(expected.abs().max()))
    torch.testing.assert_close(e.token_relevance, expected, **tolerance)
    # content scores: prefix tokens dropped, padding exactly zero
    content = expected[:, case.prefix_tokens :] * valid[:, case.prefix_tokens :]
    torch.testing.assert_close(e.scores, content, **tolerance)
    assert (e.scores[~valid[:, case.prefix_tokens :]] == 0).all()
    assert e.targets.tolist() == TARGETS
    assert e.method == method and e.options == options


@pytest.mark.parametrize("name", ["timm_vit", "timm_avgpool", "hf_bert_eager"])
def test_discard_never_touches_the_readout_row_and_counts_per_sample(name):
    """The discard rule itself: the readout row is kept whole, and exactly floor(ratio * #pairs)
    entries are dropped per sample (checked on the fused map with a rollout of one layer)."""
    case, explainer, x, captured = prepared(name)
    ratio = 0.6
    B, N = 3, case.num_tokens
    valid = x["attention_mask"].bool() if case.is_text else torch.ones(B, N, dtype=torch.bool)
    for b in range(B):
        fused = fuse(captured.attentions[-1][b], "mean")
        kept = discard(fused, ratio, case, valid[b])
        n_real = int(valid[b].sum())
        n_candidates = n_real * n_real - (n_real if case.readout is not None else 0)
        zeroed = int(((kept == 0) & (fused != 0)).sum())
        assert zeroed == math.floor(ratio * n_candidates)
        if case.readout is not None:
            assert torch.equal(kept[case.readout], fused[case.readout])
    # and the library agrees with this rule on the last layer alone
    e = explainer.explain(x, method="rollout", target=TARGETS, discard_ratio=ratio, start_layer=-1)
    for b in range(B):
        fused = fuse(captured.attentions[-1][b], "mean")
        expected = ref_rollout(case, [captured.attentions[-1][b]], None, valid[b], discard_ratio=ratio)
        torch.testing.assert_close(e.token_relevance[b], expected, rtol=1e-9, atol=1e-12)
        # rollout of one layer with the readout row kept: the readout row of rownorm((A + I)/2)
        if case.readout is not None:
            row = (fused[case.readout] + torch.eye(N, dtype=DT)[case.readout]) / 2
            row = row * valid[b]
            torch.testing.assert_close(e.token_relevance[b], row / row.sum(), rtol=1e-9, atol=1e-12)


def test_mean_readout_is_the_mean_of_patch_rows():
    """Without a class token (global_pool='avg') the readout is the mean of the patch rows."""
    case, explainer, x, captured = prepared("timm_avgpool")
    assert case.prefix_tokens == 0 and captured.layout.readout is None
    e = explainer.explain(x, method="raw_attention", target=TARGETS)
    expected = captured.attentions[-1].mean(1).mean(1)  # heads, then rows (all rows are patches)
    torch.testing.assert_close(e.scores, expected, rtol=1e-9, atol=1e-12)
