#!/usr/bin/env python
"""Do attnx's explanations of the default text model make sense?

Runs transformer_attribution, generic, grad_rollout, lrp (preset attnlrp) and rollout on held-out
Rotten Tomatoes snippets (every ``--stride``-th test snippet, ``--n`` of them), prints the first
``--show`` with their word pieces and scores, and measures one simple thing per method: among the
snippets that contain a word of a small sentiment lexicon (defined below), the fraction whose
top-3 word pieces (special tokens excluded) include one, against the fraction expected if the top
3 were 3 random word pieces of the same snippet. It also explains the *other* class (target = 1 -
prediction) with transformer_attribution: the maps should differ, and words of the predicted
polarity should rank lower there.

    HF_HUB_OFFLINE=1 nice -n 19 python training/check_text_explanations.py
"""
from __future__ import annotations

import argparse
import os
from math import comb

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import attnx
from attnx import zoo
from attnx.data import rotten_tomatoes as rt

POSITIVE = set("""
great good best better funny fun wonderful beautiful beautifully brilliant brilliantly excellent charming
delightful entertaining enjoyable love loved lovely perfect perfectly fascinating moving powerful
remarkable smart witty terrific superb engaging compelling gripping touching hilarious satisfying
solid strong impressive amazing masterpiece pleasure sweet warm clever intelligent thoughtful rich
memorable stunning success worth treat joy effective engrossing riveting haunting exhilarating
winning charm wit well fine finest affecting refreshing inventive original accomplished funniest
""".split())
NEGATIVE = set("""
bad worst dull boring bore tedious stupid predictable awful lame flat lacks lacking mess messy fails
failure fail mediocre silly poor poorly weak tired unfunny pointless forgettable bland waste wasted
annoying dumb ridiculous clumsy disappointing disappointment empty shallow cliched cheap sloppy slow
worse unfortunately overlong numbing tiresome lifeless pretentious incoherent hollow mindless sadly
labored contrived muddled uninspired unpleasant excruciating mess junk trite misfire
""".split())
LEXICON = POSITIVE | NEGATIVE
METHODS = [
    ("transformer_attribution", {}),
    ("generic", {}),
    ("grad_rollout", {}),
    ("lrp", {"preset": "attnlrp"}),
    ("rollout", {}),
]


def top_k(scores: torch.Tensor, keep: list[int], k: int = 3) -> list[int]:
    return sorted(keep, key=lambda i: -scores[i].item())[:k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--stride", type=int, default=10)
    p.add_argument("--show", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    bert = zoo.text_model()
    model, tokenizer = bert.model, bert.tokenizer
    reviews = rt.load_split("test")[:: args.stride][: args.n]
    explainer = attnx.Explainer(model)
    special = set(tokenizer.all_special_ids)

    rows = []  # per snippet: tokens, keep, label, pred, {method: scores}, other-class scores
    for s in range(0, len(reviews), args.batch_size):
        chunk = reviews[s : s + args.batch_size]
        x = tokenizer([r.text for r in chunk], padding=True, truncation=True, return_tensors="pt")
        results = {m: explainer.explain(x, method=m, **o) for m, o in METHODS}
        pred = results["transformer_attribution"].targets
        other = explainer.explain(x, method="transformer_attribution", target=(1 - pred).tolist())
        for b, r in enumerate(chunk):
            ids = x["input_ids"][b][x["attention_mask"][b].bool()].tolist()
            tokens = tokenizer.convert_ids_to_tokens(ids)
            keep = [i for i, t in enumerate(ids) if t not in special]
            rows.append({
                "text": r.text, "label": r.label, "pred": int(pred[b]), "tokens": tokens, "keep": keep,
                "scores": {m: e.scores[b, : len(ids)] for m, e in results.items()},
                "other": other.scores[b, : len(ids)],
            })

    acc = sum(r["label"] == r["pred"] for r in rows) / len(rows)
    print(f"{len(rows)} held-out snippets, accuracy {acc:.3f}\n")
    for r in rows[: args.show]:
        ta = r["scores"]["transformer_attribution"]
        mx = max(ta.abs().max().item(), 1e-12)
        print(f"[{rt.LABELS[r['label']]} -> predicted {bert.class_names[r['pred']]}] {r['text']}")
        print("  transformer_attribution: " + " ".join(f"{r['tokens'][i]}({ta[i] / mx:.2f})" for i in r["keep"]))
        for m, _ in METHODS:
            top = top_k(r["scores"][m], r["keep"], 5)
            print(f"  top-5 {m:<24} " + ", ".join(r["tokens"][i] for i in top))
        top = top_k(r["other"], r["keep"], 5)
        print("  top-5 other class (transformer_attribution): " + ", ".join(r["tokens"][i] for i in top))
        print()

    def hits(scores_of, lexicon, subset):
        got, chance, n = 0, 0.0, 0
        for r in subset:
            lex = [i for i in r["keep"] if r["tokens"][i] in lexicon]
            if not lex:
                continue
            n += 1
            got += any(r["tokens"][i] in lexicon for i in top_k(scores_of(r), r["keep"]))
            m, k = len(r["keep"]), len(lex)
            chance += 1 - comb(m - k, 3) / comb(m, 3) if m >= 3 else 1.0
        return (got / n if n else float("nan")), (chance / n if n else float("nan")), n

    def cell(h, c, n):
        return f"{h:.2f} ({c:.2f}) n={n}".rjust(26)

    print("top-3 word pieces include a sentiment-lexicon word (snippets that contain one):")
    print(f"  {'method':<26}{'any pred., any word':>26}{'pos. pred., pos. word':>26}{'neg. pred., neg. word':>26}")
    positive = [r for r in rows if r["pred"] == 1]
    negative = [r for r in rows if r["pred"] == 0]
    for m, _ in METHODS:
        f = lambda r, m=m: r["scores"][m]  # noqa: E731
        cells = [hits(f, LEXICON, rows), hits(f, POSITIVE, positive), hits(f, NEGATIVE, negative)]
        print(f"  {m:<26}" + "".join(cell(*c) for c in cells))
    other = lambda r: r["other"]  # noqa: E731
    cells = [hits(other, LEXICON, rows), hits(other, POSITIVE, positive), hits(other, NEGATIVE, negative)]
    print(f"  {'TA, other class':<26}" + "".join(cell(*c) for c in cells))
    print("  cells: fraction (fraction expected for a random top 3) n = snippets counted")

    # predicted vs other class with transformer_attribution
    corr, differ = [], 0
    for r in rows:
        a, b = r["scores"]["transformer_attribution"][r["keep"]], r["other"][r["keep"]]
        if len(r["keep"]) > 1:
            corr.append(torch.corrcoef(torch.stack([a, b]))[0, 1].item())
        differ += top_k(r["scores"]["transformer_attribution"], r["keep"], 1) != top_k(r["other"], r["keep"], 1)
    corr_t = torch.tensor(corr).nan_to_num(0.0)
    print(f"\ntransformer_attribution, predicted vs other class: mean Pearson r {corr_t.mean():.2f}, "
          f"top-1 word piece differs in {differ}/{len(rows)} snippets")


if __name__ == "__main__":
    main()
