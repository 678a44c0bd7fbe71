"""attnx.metrics on text (token deletion, rationale F1) against values computed by hand on a toy
bag-of-words model, then on a tiny real BERT with real explanations.

The expected numbers are written as fractions with the arithmetic beside them; none is
obtained by calling the code under test.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import attnx
from attnx import metrics as M
from conftest import CASES, text_inputs
from metrics_toys import close


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
TOK = SimpleNamespace(all_special_ids=[PAD, CLS, SEP, MASK, UNK], mask_token_id=MASK, unk_token_id=UNK,
                      pad_token_id=PAD)


class BagOfWords(nn.Module):
    """Logit 0 = Σ weight[id] over attended tokens; [CLS] weighs 10 so that removing it would show."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(10, dtype=torch.float64)
        w[CLS], w[5], w[6], w[7] = 10, 3, 2, 1
        self.register_buffer("w", w)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        s = (self.w[input_ids] * mask).sum(dim=1)
        return SimpleNamespace(logits=torch.stack([s, torch.zeros_like(s)], dim=1))


def toy_batch(special_mask: bool = True) -> dict:
    ids = torch.tensor([[CLS, 5, 6, 7, 8, SEP, PAD], [CLS, 7, 5, SEP, PAD, PAD, PAD]])
    batch = {"input_ids": ids, "attention_mask": (ids != PAD).long(), "token_type_ids": torch.zeros_like(ids)}
    if special_mask:
        batch["special_tokens_mask"] = torch.isin(ids, torch.tensor([PAD, CLS, SEP])).long()
    return batch


# sample 0 in perfect order (CLS, SEP and PAD get huge scores that must be ignored); sample 1: 5 before 7
TOY_REL = torch.tensor([[100, 3, 2, 1, 0, 50, 99], [100, 0, 1, 60, 70, 80, 90]], dtype=torch.float64)


def test_token_deletion_by_hand():
    model = BagOfWords()
    c = M.token_deletion_curve(model, toy_batch(), TOY_REL, target=0, steps=4, measure="logit", tokenizer=TOK)
    # sample 0: 10 + 3 + 2 + 1 + 0 = 16; 4 content tokens, floor(i * 4 / 4) = i removed: 5, 6, 7, 8
    #           -> 16, 13, 11, 10, 10;  AUC 1/4 * ((16 + 10)/2 + 13 + 11 + 10) = 47/4
    # sample 1: 10 + 1 + 3 = 14; 2 content tokens, floor(i * 2 / 4) = 0, 0, 1, 1, 2 removed: 5 then 7
    #           -> 14, 14, 11, 11, 10;  AUC 1/4 * ((14 + 10)/2 + 14 + 11 + 11) = 12
    assert close(c.values, [[16, 13, 11, 10, 10], [14, 14, 11, 11, 10]])
    assert close(c.fractions, [0, .25, .5, .75, 1]) and close(c.auc(), [47 / 4, 12])
    # "pad" drops the tokens from attention: the same values; "unk" and a raw id too (weight 0)
    for repl in ("pad", "unk", 9):
        ci = M.token_deletion_curve(model, toy_batch(), TOY_REL, target=0, steps=4, measure="logit",
                                    tokenizer=TOK, replacement=repl)
        assert torch.equal(ci.values, c.values), repl
    # least relevant first, sample 0: 8, 7, 6, 5 -> 16, 16, 15, 13, 10; AUC 1/4 * (13 + 16 + 15 + 13) = 57/4
    lr = M.token_deletion_curve(model, toy_batch(), TOY_REL, target=0, steps=4, measure="logit", tokenizer=TOK,
                                most_relevant_first=False)
    assert close(lr.values[0], [16, 16, 15, 13, 10]) and close(lr.auc()[0], 57 / 4)
    # special tokens from the tokenizer instead of the batch's special_tokens_mask
    ct = M.token_deletion_curve(model, toy_batch(False), TOY_REL, target=0, steps=4, measure="logit", tokenizer=TOK)
    assert torch.equal(ct.values, c.values)


def test_token_deletion_errors():
    model = BagOfWords()
    with pytest.raises(ValueError, match="special_tokens_mask|tokenizer"):
        M.token_deletion_curve(model, toy_batch(False), TOY_REL, replacement=9)
    with pytest.raises(ValueError, match="mask_token_id"):
        M.token_deletion_curve(model, toy_batch(), TOY_REL)  # no tokenizer for [MASK]
    with pytest.raises(ValueError, match="one value per token"):
        M.token_deletion_curve(model, toy_batch(), TOY_REL[:, :5], tokenizer=TOK)
    with pytest.raises(TypeError, match="input_ids"):
        M.token_deletion_curve(model, torch.zeros(2, 7), TOY_REL, tokenizer=TOK)
    with pytest.raises(ValueError, match="replacement"):
        M.token_deletion_curve(model, toy_batch(), TOY_REL, tokenizer=TOK, replacement="drop")


def test_rationale_f1_by_hand():
    scores = torch.tensor([[9, 5, 4, 3, 1, 8], [0, 1, 2, 3, 0, 0]], dtype=torch.float64)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    special = torch.tensor([[1, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]])
    rationale = torch.tensor([[0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]]).bool()
    r = M.rationale_f1(scores, rationale, 2, attention_mask=attention, special_tokens_mask=special)
    # sample 0: candidates 1..4 (scores 5 4 3 1) -> top-2 {1, 2}; hits {1}: P 1/2, R 1/3,
    #           F1 = 2 * 1/2 * 1/3 / (1/2 + 1/3) = (1/3) / (5/6) = 2/5
    # sample 1: candidates 1..3 -> top-2 {3, 2}; both in the rationale: P = R = F1 = 1
    assert close(r.precision, [1 / 2, 1]) and close(r.recall, [1 / 3, 1]) and close(r.f1, [2 / 5, 1])
    # k per sample; sample 1 with k = 5 has only 3 candidates: P 2/3, R 1, F1 = 2 * 2/3 / (5/3) = 4/5
    r = M.rationale_f1(scores, rationale, [2, 5], attention_mask=attention, special_tokens_mask=special)
    assert close(r.f1, [2 / 5, 4 / 5])
    # no rationale -> 0; without masks every token is a candidate: top-2 of sample 0 = {0, 5}: no hit
    r = M.rationale_f1(scores, torch.zeros(2, 6, dtype=torch.bool), 2)
    assert close(r.f1, [0, 0])
    assert close(M.rationale_f1(scores, rationale, 2).precision, [0, 1])
    with pytest.raises(ValueError, match="rationale_mask"):
        M.rationale_f1(scores, rationale[:, :4], 2)


# --------------------------------------------------------------------------------------------
# real explanations on a tiny model
# --------------------------------------------------------------------------------------------
def test_text_metrics_on_a_real_bert():
    case = CASES["hf_bert_sdpa"]
    model = case.model()
    batch = text_inputs(2, torch.Generator().manual_seed(5), 0, lengths=[9, 6])
    batch["input_ids"][1, 5] = 1  # a [SEP]-like last real token
    batch["input_ids"][0, 8] = 1
    batch["special_tokens_mask"] = torch.isin(batch["input_ids"], torch.tensor([0, 1, 2])).long()
    e = attnx.explain(model, {k: v for k, v in batch.items() if k != "special_tokens_mask"}, method="generic")
    c = M.token_deletion_curve(model, batch, e, replacement=3, steps=5)
    assert c.values.shape == (2, 6)
    assert close(c.values[:, 0], e.probabilities.gather(1, e.targets[:, None])[:, 0], 1e-6)
    cp = M.token_deletion_curve(model, batch, e, replacement="pad", steps=5, batch_size=3)
    assert cp.values.shape == (2, 6) and close(cp.values[:, 0], c.values[:, 0])
    rationale = torch.zeros(2, 9, dtype=torch.bool)
    rationale[:, 1:3] = True
    r = M.rationale_f1(e, rationale, 2, attention_mask=batch["attention_mask"],
                       special_tokens_mask=batch["special_tokens_mask"])
    assert r.f1.shape == (2,) and ((r.f1 >= 0) & (r.f1 <= 1)).all()
    # the explanation's padding mask is used by default; k = 9 selects all real tokens of sample 1
    everything = M.rationale_f1(e, torch.ones(2, 9, dtype=torch.bool), 9)
    assert close(everything.precision, [1, 1]) and close(everything.recall, [1, 6 / 9])
    # randomisation compares the real tokens only (sample 1 has 6 of 9)
    inputs = {k: v for k, v in batch.items() if k != "special_tokens_mask"}
    rnd = M.parameter_randomisation(model, inputs, "generic", layers=["bert.encoder.layer.2"])
    assert rnd.valid.sum(dim=1).tolist() == [9, 6] and close(rnd.spearman[0], [1, 1])
    want = M.spearman(rnd.maps[1, 1:, :6], rnd.maps[0, 1:, :6])
    assert close(rnd.spearman[1, 1:], want)
