"""The factual-recall league (``attnx evaluate --task llm``) on a tiny random Llama with a tiny fact set.

Every metric is checked against a hand computation or an independent one: subject ranks of
hand-made maps, the exact chance level against a Monte Carlo draw, the removal curves against
forwards of each shortened prompt alone (no padding), the correctness filter against
``model.generate``.
"""
from __future__ import annotations

import copy
import math
import types

import numpy as np
import pytest
import torch

from attnx import zoo
from attnx.data.facts import RELATIONS, FactPrompt, fact_prompts, facts
from attnx.evaluate import facts as F
from attnx.evaluate import llm_league
from attnx.zoo import lm as embedded_lm

tr = pytest.importorskip("transformers")

SUBJECTS = ["film", "movie", "story", "plot", "script", "comedy", "drama", "music", "actor", "director",
            "character", "ending", "scene", "funny movie", "bad script", "good story"]
TEMPLATES = ["the {subject} is", "i think the {subject} was", "and the {subject} of this"]


@pytest.fixture(scope="module")
def tok():
    return embedded_lm.load_tokenizer()  # word level, [BOS] prepended: the first token is a special one


@pytest.fixture(scope="module")
def model(tok):
    cfg = tr.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    return tr.LlamaForCausalLM(cfg).double().eval()


def prompt(template: str, subject: str, answers=("x",), relation="r") -> FactPrompt:
    return FactPrompt(template.format(subject=subject), subject, relation, 0, tuple(answers), template.index("{subject}"))


def greedy_word(model, tok, text: str, n: int = 1) -> list[str]:
    """The model's greedy next ``n`` words for ``text`` alone, with ``model.generate``."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return [tok.decode([t]) for t in out[0, ids.shape[1]:].tolist()]


def answered_prompts(model, tok) -> list[FactPrompt]:
    """Prompts whose accepted answer is the model's own greedy word (a plain word)."""
    out = []
    for s in SUBJECTS:
        for t in TEMPLATES:
            word = greedy_word(model, tok, t.format(subject=s))[0]
            if word.isalpha():
                out.append(prompt(t, s, (word,)))
    return out


# ------------------------------------------------------------------ the fact table
def test_the_table_gives_enough_prompts_with_the_subject_never_first():
    table = facts()
    assert len(table) >= 150 and len({s for s, _ in table}) == len(table)
    prompts = fact_prompts()
    assert len(prompts) == sum(len(RELATIONS[r]) for _, answers in table for r in answers)
    for p in prompts:
        assert p.text[p.subject_start:p.subject_end] == p.subject and p.subject_start > 0 and p.answers
    assert len(prompts) >= 1500 and len({p.relation for p in prompts}) >= 7


def test_the_table_has_no_duplicate_prompts_and_clean_answers():
    prompts = fact_prompts()
    assert len({p.text for p in prompts}) == len(prompts)
    for subject, answers in facts():
        assert subject == subject.strip() and subject and "|" not in subject
        assert answers and set(answers) <= set(RELATIONS)
        for relation, accepted in answers.items():
            # each accepted answer: one non-empty string, no separator left in it, no repeat
            assert accepted and len(set(accepted)) == len(accepted), (subject, relation)
            assert all(a and a == a.strip() and "/" not in a and "|" not in a for a in accepted), (subject, relation)
    for relation, templates in RELATIONS.items():
        assert len(set(templates)) == len(templates)
        assert all(t.count("{subject}") == 1 and not t.startswith("{subject}") for t in templates), relation
        assert any(relation in a for _, a in facts()), relation  # every relation is asked of some subject
    by_relation = {r: sum(p.relation == r for p in prompts) for r in RELATIONS}
    assert min(by_relation.values()) >= 40, by_relation
    # spot checks of the facts themselves
    table = dict(facts())
    assert table["France"]["capital"] == ("Paris",) and table["Japan"]["currency"] == ("yen",)
    assert table["Lyon"] == {"city_country": ("France",)} and table["Taj Mahal"]["landmark_city"] == ("Agra",)
    assert "landmark_city" not in table["Great Wall"]  # an empty cell: not asked


# ------------------------------------------------------------------ encoding
def test_encode_left_pads_and_marks_the_subject_tokens(tok):
    batch = F.encode(tok, [prompt("the {subject} is", "funny movie"), prompt("i think the {subject} was", "film")])
    ids, mask, subject = batch["input_ids"], batch["attention_mask"], batch["subject"]
    # [BOS] the funny movie is / [BOS] i think the film was: lengths 5 and 6, left padding
    assert mask.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["first"].tolist() == [1, 0]
    assert subject.tolist() == [[False, False, False, True, True, False], [False, False, False, False, True, False]]
    assert tok.decode(ids[0, 3:5].tolist()) == "funny movie"


# ------------------------------------------------------------------ subject rank
def test_subject_rank_of_hand_made_maps():
    subject = torch.tensor([[False, False, True, True, False], [False, True, False, False, False]])
    cand = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]])
    on_subject = subject.double()  # all relevance on the subject: rank 1
    assert F.subject_rank(on_subject, subject, cand).tolist() == [1, 1]
    scores = torch.tensor([[9.0, 5.0, 1.0, 4.0, 3.0], [9.0, 2.0, 3.0, 2.0, 1.0]])
    # sample 0: the first token (9) is not a candidate; 5 > 4 (subject's best): rank 2
    # sample 1: 9 and 3 above 2, and a tie at 2 counts against the subject: rank 4
    assert F.subject_rank(scores, subject, cand).tolist() == [2, 4]
    constant = torch.ones(2, 5)  # a constant map ranks the subject last
    assert F.subject_rank(constant, subject, cand).tolist() == [3, 5]


def test_chance_rank_is_exact():
    top1, rr = F.chance_rank(torch.tensor([4, 4]), torch.tensor([1, 2]))
    assert top1.tolist() == pytest.approx([1 / 4, 1 / 2])
    assert rr.tolist() == pytest.approx([(1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, 1 / 2 + (1 / 3) / 2 + (1 / 6) / 3])
    g = torch.Generator().manual_seed(0)  # a random map's mean reciprocal rank: the same within sampling error
    subject = torch.tensor([[False, True, True, False, False, False, False]]).expand(40000, -1)
    cand = torch.ones_like(subject)
    rank = F.subject_rank(torch.rand(40000, 7, generator=g), subject, cand).double()
    top1, rr = F.chance_rank(torch.tensor([7]), torch.tensor([2]))
    assert abs((1 / rank).mean().item() - rr.item()) < 0.01
    assert abs((rank == 1).double().mean().item() - top1.item()) < 0.01


# ------------------------------------------------------------------ faithfulness
def independent_log_prob(model, ids: list[int], target: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return float(logits.double().log_softmax(-1)[target])


@pytest.mark.parametrize("replacement", ["delete", 7])
def test_removal_curves_equal_forwards_of_each_shortened_prompt(model, tok, replacement):
    prompts = [prompt("i think the {subject} was", "funny movie"), prompt("the {subject} is", "plot")]
    batch = F.encode(tok, prompts)
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(batch["input_ids"].shape, generator=g, dtype=torch.float64)
    targets = torch.tensor([11, 12])
    curves = F.removal_curves(model, batch, scores, targets, tok.pad_token_id, replacement=replacement)
    for b in range(2):
        real = torch.nonzero(batch["attention_mask"][b]).flatten().tolist()
        ids = [int(batch["input_ids"][b, i]) for i in real]
        sc = [float(scores[b, i]) for i in real]
        rest = list(range(1, len(real)))  # the first token is never removed
        for name, most in (("most", True), ("least", False)):
            order = sorted(rest, key=lambda i: -sc[i] if most else sc[i])
            for j, f in enumerate(F.FRACTIONS):
                gone = set(order[:round(f * len(rest))])
                row = ([t for i, t in enumerate(ids) if i not in gone] if replacement == "delete"
                       else [replacement if i in gone else t for i, t in enumerate(ids)])
                want = independent_log_prob(model, row, int(targets[b]))
                assert curves[name][b, j] == pytest.approx(want, abs=1e-9)
    assert curves["most"][:, 0].tolist() == pytest.approx(curves["least"][:, 0].tolist())


# ------------------------------------------------------------------ the correctness filter
def test_answered_keeps_exactly_the_prompts_the_model_completes(model, tok):
    texts = [t.format(subject=s) for s in SUBJECTS[:6] for t in TEMPLATES[:2]]
    two = [greedy_word(model, tok, t, 2) for t in texts]
    other = {w: next(c for c in ("film", "movie") if c != w) for pair in two for w in pair}
    prompts, expect = [], []
    for t, (w1, w2) in zip(texts, two):
        s = next(s for s in SUBJECTS if f" {s} " in f" {t} ")
        template = t.replace(s, "{subject}", 1)
        prompts += [prompt(template, s, (w1,)), prompt(template, s, (other[w1],)),
                    prompt(template, s, (f"{w1} {w2}",)), prompt(template, s, (f"{w1} {other[w2]}",)),
                    prompt(template, s, (other[w1], w1))]  # any accepted answer counts
        expect += [True, False, True, False, True]
    correct, target = F.answered(model, tok, prompts, F.encode(tok, prompts))
    assert correct.tolist() == expect
    first = [tok(" " + w1, add_special_tokens=False)["input_ids"][0] for w1, _ in two]
    assert target.tolist() == [x for f in first for x in (f, -1, f, -1, f)]


def test_the_batched_answer_check_equals_one_prompt_at_a_time(model, tok):
    texts = [t.format(subject=s) for s in SUBJECTS for t in TEMPLATES]  # 3 to 6 tokens: left padding
    prompts = []
    for t in texts:
        s = next(s for s in sorted(SUBJECTS, key=len, reverse=True) if f" {s} " in f" {t} ")
        w1, w2 = greedy_word(model, tok, t, 2)
        prompts.append(prompt(t.replace(s, "{subject}", 1), s, (f"{w1} {w2}" if len(prompts) % 2 else "film",)))
    batched, target = F.answered(model, tok, prompts, F.encode(tok, prompts))
    alone = [F.answered(model, tok, [p], F.encode(tok, [p])) for p in prompts]
    assert batched.tolist() == [bool(c[0]) for c, _ in alone]
    assert target.tolist() == [int(t[0]) for _, t in alone]
    assert 0 < int(batched.sum()) < len(prompts)

    class NoGenerate(torch.nn.Module):  # the same model without generate(): the plain greedy loop
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    plain, plain_target = F.answered(NoGenerate(model), tok, prompts, F.encode(tok, prompts))
    assert plain.tolist() == batched.tolist() and plain_target.tolist() == target.tolist()


def test_select_prompts_keeps_the_given_order_whatever_the_batching(model, tok):
    prompts = answered_prompts(model, tok)[:12]
    wrong = [prompt(TEMPLATES[1], s, ("zzzznotaword",)) for s in SUBJECTS[:4]]
    mixed = [x for pair in zip(prompts[:4], wrong) for x in pair] + prompts[4:]
    kept, targets, counts = llm_league.select_prompts(model, tok, mixed, batch_size=5)  # length-sorted batches
    assert kept == prompts and counts["tried"] == len(mixed) and counts["answered"] == len(prompts)
    kept2, targets2, _ = llm_league.select_prompts(model, tok, mixed, batch_size=3, needed=len(prompts))
    assert kept2 == kept and targets2 == targets
    assert targets == [tok(" " + p.answers[0], add_special_tokens=False)["input_ids"][0] for p in prompts]


def test_one_pass_for_every_methods_rows_equals_each_curve_alone(model, tok):
    prompts = [prompt("i think the {subject} was", "funny movie"), prompt("the {subject} is", "plot"),
               prompt("and the {subject} of this", "bad script")]
    batch = F.encode(tok, prompts)
    g = torch.Generator().manual_seed(3)
    maps = [torch.rand(batch["input_ids"].shape, generator=g, dtype=torch.float64) for _ in range(3)]
    targets = torch.tensor([11, 12, 13])
    wheres = [F.removal_rows(batch, s, targets) for s in maps]
    keys = [key for w in wheres for rows in w.values() for _, _, key in rows]
    calls = []

    def forward(**kw):
        calls.append(kw["input_ids"].shape)
        return model(**kw)

    counting = torch.nn.Module()
    counting.forward = forward
    cache = F.measure_rows(counting, keys, tok.pad_token_id, batch_size=1000)
    assert len(calls) == 1 and calls[0][0] == len(set(keys)) < len(keys)  # distinct rows, one forward
    for s, w in zip(maps, wheres):
        together = F.curves_from(w, cache, 3, len(F.FRACTIONS))
        alone = F.removal_curves(model, batch, s, targets, tok.pad_token_id, batch_size=4)
        for name in ("most", "least"):
            assert np.allclose(together[name], alone[name], atol=1e-9)
        for b, j, (row, t) in w["most"][::7]:  # and a forward of the shortened prompt alone
            assert together["most"][b, j] == pytest.approx(independent_log_prob(model, list(row), t), abs=1e-9)


# ------------------------------------------------------------------ the league
def test_the_league_on_a_tiny_llama(model, tok, monkeypatch, tmp_path):
    # float32: transformers' float64 Llama attention turns the fully masked rows of left padding into NaN
    model = copy.deepcopy(model).float()
    prompts = answered_prompts(model, tok)
    assert len(prompts) >= 30
    decoy = [prompt(TEMPLATES[0], "film", ("zzzznotaword",))]  # never answered: filtered out
    bundle = zoo.ZooModel(model, "text", None, tokenizer=tok, info={"name": "tiny llama"})
    partial = []
    league = llm_league.evaluate_facts(bundle, ["random", "rollout", "lrp-attnlrp"], prompts=prompts + decoy,
                                       batch_size=8, progress=False, on_chunk=partial.append)
    # after every batch, the league of the prompts so far: a prefix of the final one
    assert [len(x) for x in partial] == [min(8 * (i + 1), len(prompts)) for i in range(len(partial))]
    assert len(partial[-1]) == len(prompts) and "the first 8 (shuffled order)" in partial[0].describe()
    for m in league.methods:
        assert np.array_equal(partial[0].samples[m]["rank"], league.samples[m]["rank"][:8])
        assert np.array_equal(partial[0].samples[m]["most"], league.samples[m]["most"][:8])
    assert len(league) == len(prompts) and league.meta["answered"] == len(prompts) and league.meta["tried"] == len(prompts) + 1
    # the curves start at the unperturbed prompt's log-probability, the same for every method
    by_text = {p.text: p for p in prompts}
    first = league.samples["random"]["most"][:, 0]
    for i in (0, len(league) - 1):
        p = by_text[league.items["text"][i]]
        ids = tok(p.text)["input_ids"]
        target = tok(" " + p.answers[0], add_special_tokens=False)["input_ids"][0]
        assert first[i] == pytest.approx(independent_log_prob(model, ids, target), abs=1e-4)
    for m in league.methods:
        assert np.allclose(league.samples[m]["most"][:, 0], first, atol=1e-5)
    # the table's numbers follow from the per-prompt ranks, with standard errors
    r = league.row("random")
    rank = league.samples["random"]["rank"].astype(float)
    assert r["mrr"][0] == pytest.approx((1 / rank).mean())
    assert r["mrr"][1] == pytest.approx((1 / rank).std(ddof=1) / math.sqrt(len(rank)))
    chance = league.chance()["mrr"][0]
    assert abs(r["mrr"][0] - chance) < 3 * r["mrr"][1] + 0.02  # random is at chance level
    assert r["abc"][0] == pytest.approx(r["auc_least"][0] - r["auc_most"][0])
    md = league.to_markdown()
    assert all(f"| {m} |" in md for m in league.methods) and "±" in md and "chance" in md
    assert league.to_csv().splitlines()[0].startswith("method,top1,top1_se,mrr,mrr_se")

    # the command writes the table, the curves and the per-prompt results
    monkeypatch.setattr(llm_league.zoo, "load", lambda spec, kind: bundle)
    monkeypatch.setattr(llm_league, "fact_prompts", lambda: prompts)
    args = types.SimpleNamespace(out=str(tmp_path), model="tiny", methods="random,rollout", limit=10, batch_size=4, quiet=True)
    lines = []
    assert llm_league.run_cli(args, lines.append) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"league_llm.md", "league_llm.csv", "curves_llm.png", "samples_llm.json"}
    assert len((tmp_path / "league_llm.csv").read_text().splitlines()) == 4  # random, rollout and the sanity row
    md = (tmp_path / "league_llm.md").read_text()
    assert "the first 10 (shuffled order)" in md and "Wall time" in md and "so far" not in md
    back = llm_league.FactLeague.load(tmp_path / "samples_llm.json")
    assert back.to_csv() == (tmp_path / "league_llm.csv").read_text()
    from attnx.errors import AttnxValueError

    with pytest.raises(AttnxValueError, match="--data"):  # options of the other tasks are refused, not ignored
        llm_league.run_cli(types.SimpleNamespace(**{**vars(args), "data": "texts.csv"}), lines.append)


def test_unknown_methods_are_refused_in_one_line():
    from attnx.errors import AttnxValueError

    with pytest.raises(AttnxValueError, match="unknown method 'nonsense'"):
        llm_league.evaluate_facts("smollm2", ["nonsense"])
    with pytest.raises(AttnxValueError, match="unknown LRP preset|preset"):
        llm_league.evaluate_facts("smollm2", ["lrp-nonsense"])


def test_default_rows_are_the_registry_with_a_row_per_lrp_preset():
    import attnx

    rows = llm_league.default_rows()
    assert [r for r in rows if r.startswith("lrp")] == ["lrp-attnlrp", "lrp-cplrp"]
    assert {r for r in rows if not r.startswith("lrp")} == set(attnx.list_methods()) - {"lrp"} - set(llm_league.NOT_FOR_DECODERS)
    assert llm_league.row_method("lrp-cplrp") == ("lrp", {"preset": "cplrp"})
    assert llm_league.row_method("integrated_gradients(n_steps=4)") == ("integrated_gradients", {"n_steps": 4})


@pytest.mark.slow  # about 4 s: three league runs
def test_rows_put_into_a_saved_league_with_the_sanity_row_and_completeness(model, tok, monkeypatch, tmp_path):
    model = copy.deepcopy(model).float()
    prompts = answered_prompts(model, tok)[:6]
    bundle = zoo.ZooModel(model, "text", None, tokenizer=tok, info={"name": "tiny llama"})
    monkeypatch.setattr(llm_league.zoo, "load", lambda spec, kind: bundle)
    monkeypatch.setattr(llm_league, "fact_prompts", lambda: prompts)
    args = types.SimpleNamespace(out=str(tmp_path), model="tiny", methods="rollout,random", limit=4, batch_size=2, quiet=True)
    assert llm_league.run_cli(args, lambda line: None) == 0
    one_run = llm_league.evaluate_facts(bundle, ["rollout", "lrp-cplrp", "random"], limit=4, batch_size=2, progress=False)
    assert one_run.methods[-1] == "transformer_attribution@random_weights"
    lines = []
    update = types.SimpleNamespace(**{**vars(args), "methods": "rollout,lrp-cplrp", "update": True, "limit": None,
                                      "batch_size": None})
    assert llm_league.run_cli(update, lines.append) == 0
    up = llm_league.FactLeague.load(tmp_path / "samples_llm.json")
    assert up.methods == ["rollout", "lrp-cplrp", "random", "transformer_attribution@random_weights"]
    for m in one_run.methods:  # the numbers of one run of every row (the timings aside)
        a, b = up.row(m), one_run.row(m)
        for key in a:
            if key != "ms":
                np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-9, err_msg=f"{m} {key}")
    # CP-LRP claims the answer's logit: its error per prompt, recomputed from an explanation here
    err = up.samples["lrp-cplrp"]["completeness"]
    assert np.isfinite(err).all() and np.isnan(up.samples["rollout"]["completeness"]).all()
    assert "complete. err." in (tmp_path / "league_llm.md").read_text()
    from attnx.errors import AttnxValueError

    # a league without the sanity row gains it when it is named
    bare = types.SimpleNamespace(**{**vars(args), "out": str(tmp_path / "bare"), "methods": "rollout"})
    monkeypatch.setattr(llm_league, "evaluate_facts", _without_sanity(llm_league.evaluate_facts))
    assert llm_league.run_cli(bare, lines.append) == 0
    monkeypatch.undo()
    monkeypatch.setattr(llm_league.zoo, "load", lambda spec, kind: bundle)
    monkeypatch.setattr(llm_league, "fact_prompts", lambda: prompts)
    assert llm_league.FactLeague.load(tmp_path / "bare" / "samples_llm.json").methods == ["rollout"]
    named = types.SimpleNamespace(**{**vars(update), "out": str(tmp_path / "bare"),
                                     "methods": "transformer_attribution@random_weights"})
    assert llm_league.run_cli(named, lines.append) == 0
    gained = llm_league.FactLeague.load(tmp_path / "bare" / "samples_llm.json")
    assert gained.methods == ["rollout", "transformer_attribution@random_weights"]
    sanity = "transformer_attribution@random_weights"
    assert np.array_equal(gained.samples[sanity]["rank"], up.samples[sanity]["rank"])
    assert "a sanity row" in (tmp_path / "bare" / "league_llm.md").read_text()
    with pytest.raises(AttnxValueError, match="--limit 4, not 3"):
        llm_league.run_cli(types.SimpleNamespace(**{**vars(update), "limit": 3}), lines.append)
    with pytest.raises(AttnxValueError, match="no llm league"):
        llm_league.run_cli(types.SimpleNamespace(**{**vars(update), "out": str(tmp_path / "none")}), lines.append)


def _without_sanity(evaluate_facts):
    """``evaluate_facts`` as a version without the sanity row ran it (a league written before the row existed)."""
    def run(*args, **kwargs):
        league = evaluate_facts(*args, **dict(kwargs, sanity=False))
        league.meta.pop("sanity", None)
        league.meta.pop("failed", None)
        return league
    return run
