"""Sub-batches (attnx.core.sub_batches): a large CPU batch explained in shares whose temporaries glibc reuses.

* The share: the largest even share whose largest block temporary (an MLP activation or a
  layer's attention map, per sample from the model's shape) stays within ``SHARE_BYTES``; none on a
  device other than the CPU, after ``reuse_freed_memory`` or with glibc's thresholds in the
  environment; ``sub_batch=None`` never splits, an int always does.
* The same explanation: every per-sample field of a split call (scores, token / input relevance,
  logits, targets, the readout, the layout's per-sample tensors, the conservation claim) equals the
  whole batch's, on an image model, a padded text classifier and a padded decoder language model;
  the LRP coverage counts of the shares add up.
* Only what splits: a callable target or a continuation is explained whole; bad ``sub_batch`` gets
  one line; a warning about a degenerate map names the sample's index in the user's batch.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import attnx
from attnx.core import sub_batches
from attnx.errors import AttnxValueError
from attnx.core.sub_batches import split, sub_batch_size
from attnx.core.targets import Continuation
from attnx.methods import unregister_method
from conftest import CASES

DT = torch.float64


def forwarded_batch_sizes(model):
    """The batch sizes of the model's forwards while the returned list is alive (a pre-hook)."""
    sizes: list[int] = []

    def hook(module, args, kwargs):
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        sizes.append(int(x.shape[0]))

    return sizes, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture
def fresh_pages(monkeypatch):
    """The allocator as glibc leaves it (whatever this test process set before)."""
    monkeypatch.setattr(sub_batches, "pages_are_fresh", lambda: True)


def per_sample_bytes(model, inputs):
    return sub_batches.largest_block_temporary(model, inputs)[1]


def test_the_share_keeps_the_largest_block_temporary_within_share_bytes(fresh_pages, monkeypatch):
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(batch=16)
    per_sample = per_sample_bytes(model, x)
    # the MLP activation: 17 tokens x 128 wide (mlp_ratio 4 of 32) x 4 bytes; the attention map is smaller
    assert per_sample == 17 * 128 * 4
    monkeypatch.setattr(sub_batches, "SHARE_BYTES", 13 * per_sample)
    assert sub_batch_size(model, x, "auto") == 8  # 13 fit: two even shares of 8, not 13 + 3
    monkeypatch.setattr(sub_batches, "SHARE_BYTES", 5 * per_sample)
    assert sub_batch_size(model, x, "auto") == 4
    monkeypatch.setattr(sub_batches, "SHARE_BYTES", 16 * per_sample)
    assert sub_batch_size(model, x, "auto") is None  # the whole batch fits
    monkeypatch.setattr(sub_batches, "SHARE_BYTES", per_sample // 2)
    assert sub_batch_size(model, x, "auto") == 1
    assert sub_batch_size(model, x, None) is None and sub_batch_size(model, x, 3) == 3


def test_the_attention_map_counts_when_it_is_the_larger(fresh_pages):
    case = CASES["hf_bert_eager"]
    model = case.model()
    long = {"input_ids": torch.ones(2, 100, dtype=torch.long), "attention_mask": torch.ones(2, 100, dtype=torch.long)}
    assert per_sample_bytes(model, long) == 4 * 100 * 100 * 4  # 4 heads x 100 x 100 > 100 x 64


def test_no_split_where_freed_pages_are_reused_or_not_on_the_cpu(monkeypatch):
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(batch=16)
    monkeypatch.setattr(sub_batches, "SHARE_BYTES", 1)
    monkeypatch.setattr(sub_batches.allocator, "reusing", lambda: False)
    monkeypatch.setattr(sub_batches.allocator, "glibc", lambda: object())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert sub_batch_size(model, x, "auto") == 1
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "2147483647")
    assert sub_batch_size(model, x, "auto") is None
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(sub_batches.allocator, "reusing", lambda: True)
    assert sub_batch_size(model, x, "auto") is None
    monkeypatch.setattr(sub_batches.allocator, "reusing", lambda: False)
    monkeypatch.setattr(sub_batches.allocator, "glibc", lambda: None)  # macOS, musl: another allocator
    assert sub_batch_size(model, x, "auto") is None
    monkeypatch.setattr(sub_batches.allocator, "glibc", lambda: object())
    meta = CASES["timm_vit"].model().to("meta")
    assert sub_batch_size(meta, x, "auto") is None


def test_auto_splits_the_call_into_the_shares(fresh_pages, monkeypatch):
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(batch=6)
    monkeypatch.setattr(sub_batches, "SHARE_BYTES", 3 * per_sample_bytes(model, x))
    sizes, handle = forwarded_batch_sizes(model)
    try:
        e = attnx.explain(model, x, method="grad_rollout", check_forward="never")
    finally:
        handle.remove()
    assert sizes == [3, 3] and e.scores.shape == (6, 16)


def assert_same_explanation(parts, whole):
    for name in ("scores", "token_relevance", "input_relevance", "pixel_relevance", "logits", "targets",
                 "target_scores", "explained_tokens", "claimed_total", "input_ids"):
        a, b = getattr(parts, name), getattr(whole, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, name
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    assert (parts.readout is None) == (whole.readout is None)
    if whole.readout is not None:
        assert parts.readout.description == whole.readout.description
        assert torch.equal(parts.readout.weights, whole.readout.weights)
    for name in ("readout", "valid", "columns"):
        a, b = getattr(parts.layout, name), getattr(whole.layout, name)
        if isinstance(b, torch.Tensor):
            assert torch.equal(a.to(b.dtype), b), name
        else:
            assert a == b, name
    assert parts.layout.num_tokens == whole.layout.num_tokens and parts.options == whole.options


METHODS = ["transformer_attribution", "generic", "rollout", ("lrp", {"preset": "attnlrp"}), "gradient_x_input",
           "attn_gradcam"]


def method_and_options(m):
    return m if isinstance(m, tuple) else (m, {})


@pytest.mark.parametrize("m", METHODS, ids=lambda m: method_and_options(m)[0])
def test_image_shares_give_the_whole_batch_explanation(m):
    method, options = method_and_options(m)
    case = CASES["timm_deit_distilled"]  # two readout rows
    model, x = case.model(DT), case.inputs(batch=5, dtype=DT)
    targets = [1, 4, 0, 2, 3]
    whole = attnx.explain(model, x, method=method, target=targets, sub_batch=None, **options)
    parts = attnx.explain(model, x, method=method, target=targets, sub_batch=2, **options)
    assert_same_explanation(parts, whole)
    if whole.coverage is not None:  # each share ran every rule once per op: the calls add up
        per_call = attnx.explain(model, x[:1], method=method, target=1, sub_batch=None, **options).coverage
        assert parts.coverage.complete and parts.coverage.preset == whole.coverage.preset
        assert parts.coverage.handled == {k: 3 * v for k, v in per_call.handled.items()}


@pytest.mark.parametrize("method", ["transformer_attribution", "generic", ("lrp", {"preset": "attnlrp"})],
                         ids=lambda m: method_and_options(m)[0])
def test_padded_text_shares_give_the_whole_batch_explanation(method):
    method, options = method_and_options(method)
    case = CASES["hf_bert_eager"]
    model = case.model(DT)
    batch = case.inputs(batch=5, lengths=[12, 5, 16, 9, 3])
    whole = attnx.explain(model, batch, method=method, sub_batch=None, **options)
    parts = attnx.explain(model, batch, method=method, sub_batch=3, **options)
    assert whole.layout.valid is not None and not bool(whole.layout.valid.all())
    assert_same_explanation(parts, whole)


def tiny_llama():
    import transformers as tr

    cfg = tr.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    return tr.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval().to(DT)


def test_padded_decoder_shares_give_the_whole_batch_explanation():
    """The readout moves with the padding (one row per sample): it is joined per sample."""
    model = tiny_llama()
    ids = torch.randint(3, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[3, :7] = 0
    ids[mask == 0] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    for method in ("generic", "gradient_x_input"):
        whole = attnx.explain(model, batch, method=method, sub_batch=None)
        parts = attnx.explain(model, batch, method=method, sub_batch=2)
        assert isinstance(whole.layout.readout, torch.Tensor)
        assert_same_explanation(parts, whole)


def test_targets_that_do_not_split_are_explained_whole():
    x = torch.zeros(4, 3, 8, 8)
    assert split(x, lambda out: out[:, 0], 2) is None
    assert split(x, Continuation([[1, 2]] * 4), 2) is None
    assert split(x, [1, 2, 3], 2) is None  # not one per sample
    assert split([x], None, 2) is None  # not a batch that splits by its first dimension
    shares = split({"input_ids": torch.ones(5, 3), "flag": True}, torch.arange(5), 2)
    assert [s for s, _, _ in shares] == [0, 2, 4]
    assert [t.tolist() for _, _, t in shares] == [[0, 1], [2, 3], [4]]
    assert shares[2][1]["flag"] is True and shares[2][1]["input_ids"].shape == (1, 3)


def test_a_callable_target_runs_the_batch_in_one_pass(fresh_pages, monkeypatch):
    case = CASES["timm_vit"]
    model, x = case.model(), case.inputs(batch=4)
    monkeypatch.setattr(sub_batches, "SHARE_BYTES", 1)
    sizes, handle = forwarded_batch_sizes(model)
    try:
        attnx.explain(model, x, method="grad_rollout", target=lambda out: out[:, 2], check_forward="never")
    finally:
        handle.remove()
    assert sizes == [4]


@pytest.mark.parametrize("bad", [0, -2, "half", 2.5, True])
def test_a_bad_sub_batch_gets_one_line(bad):
    case = CASES["timm_vit"]
    with pytest.raises(AttnxValueError, match="sub_batch must be 'auto', None or a positive int") as info:
        attnx.explain(case.model(), case.inputs(batch=2), method="rollout", sub_batch=bad)
    assert "\n" not in str(info.value)


def test_a_degenerate_map_is_named_by_its_index_in_the_users_batch():
    name = "test_sub_batch_constant_third"

    @attnx.register_method(name, options=())
    def fn(trace, readout):
        # constant where the sample's image is all zero
        x = trace.batch.explained_input
        t = torch.rand(trace.logits.shape[0], trace.layout.num_tokens, dtype=trace.logits.dtype)
        flat = x.flatten(1).abs().sum(1) == 0
        t[flat] = 0.5
        return t

    try:
        case = CASES["timm_vit"]
        x = case.inputs(batch=4)
        x[2] = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attnx.explain(case.model(), x, method=name, sub_batch=2)
        messages = [str(w.message) for w in caught if issubclass(w.category, attnx.DegenerateMapWarning)]
        assert len(messages) == 1 and "sample(s) [2] a constant map" in messages[0]
    finally:
        unregister_method(name)
