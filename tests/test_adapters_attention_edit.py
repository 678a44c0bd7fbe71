"""The attention editor: nn.MultiheadAttention written out equals torch's kernel; windows are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnx.adapters.attention_edit import AttentionEditor
from attnx.errors import UnsupportedModelError


def identity(p: torch.Tensor) -> torch.Tensor:
    return p


@pytest.mark.parametrize("setting", ["self", "cross", "separate", "key_padding", "causal_bool", "float_mask", "unbatched"])
def test_written_out_multihead_attention_equals_torch(setting):
    torch.manual_seed(0)
    kdim = 12 if setting == "separate" else None
    mha = nn.MultiheadAttention(16, 4, kdim=kdim, vdim=kdim).double().eval()
    L, S, N = 5, 7 if setting in ("cross", "separate") else 5, 3
    query = torch.randn(L, N, 16, dtype=torch.float64)
    key = query if S == L else torch.randn(S, N, kdim or 16, dtype=torch.float64)
    kwargs = {}
    if setting == "key_padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    if setting == "causal_bool":
        kwargs["attn_mask"] = ~torch.ones(L, S, dtype=torch.bool).tril()
    if setting == "float_mask":
        kwargs["attn_mask"] = torch.randn(N * 4, L, S, dtype=torch.float64)
    if setting == "unbatched":
        query = key = query[:, 0]
    expected = mha(query, key, key, need_weights=True, average_attn_weights=False, **kwargs)
    samples = 1 if setting == "unbatched" else N
    with AttentionEditor(identity, num_tokens=S, samples=samples):
        got = mha(query, key, key, need_weights=True, average_attn_weights=False, **kwargs)
    assert (got[0] - expected[0]).abs().max() < 1e-12
    assert (got[1] - expected[1]).abs().max() < 1e-12
    pooled = mha(query, key, key)[1]
    with AttentionEditor(identity, num_tokens=S, samples=samples):
        assert (mha(query, key, key)[1] - pooled).abs().max() < 1e-12  # average_attn_weights


def test_the_edit_changes_what_the_values_are_multiplied_with():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).double().eval()
    x = torch.randn(4, 1, 8, dtype=torch.float64)
    uniform = lambda p: torch.full_like(p, 1 / p.shape[-1])  # noqa: E731
    editor = AttentionEditor(uniform, num_tokens=4, samples=1)
    with editor:
        out, _ = mha(x, x, x, need_weights=False)
    v = F.linear(x, mha.in_proj_weight[16:], mha.in_proj_bias[16:])  # (4, 1, 8): heads share the mean
    expected = F.linear(v.mean(0, keepdim=True).expand(4, 1, 8), mha.out_proj.weight, mha.out_proj.bias)
    assert (out - expected).abs().max() < 1e-12 and editor.edited == 1


def test_unsupported_multihead_settings_are_refused():
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True).eval()
    x = torch.randn(4, 1, 8)
    with pytest.raises(UnsupportedModelError, match="bias_k"), AttentionEditor(identity, 4, 1):
        mha(x, x, x)


def test_windows_of_as_many_tokens_as_the_layout_are_refused():
    from attnx.adapters.attention_edit import AttentionEditor

    editor = AttentionEditor(lambda p: p, num_tokens=4, samples=2)
    assert editor.edited_probabilities(torch.full((2, 3, 5, 5), 0.2)).shape == (2, 3, 5, 5) and editor.edited == 0
    with pytest.raises(UnsupportedModelError, match="no self-attention"):
        editor.check()
    editor.edited_probabilities(torch.full((8, 3, 4, 4), 0.25))  # inside ``@`` an error would turn into TypeError
    with pytest.raises(UnsupportedModelError, match="windows"):
        editor.check()


