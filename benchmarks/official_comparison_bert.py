#!/usr/bin/env python
"""attnx's transformer_attribution against the official Transformer-Explainability BERT code.

Builds the reference's LRP ``BertForSequenceClassification`` and Hugging Face's
``BertForSequenceClassification`` (eager attention) with the same random weights (float64), and
compares attnx's map with the reference's ``Generator.generate_LRP`` (the BERT form: row-normalised
layers, the [CLS] self-relevance set to the row minimum) for both classes, several start layers,
and an input with and without padding. Printed: the maximum relative difference
``max |attnx - reference| / max |reference|`` per case.

The reference is read from ``--reference`` (a checkout of hila-chefer/Transformer-Explainability).
It was written for transformers 3/4: for today's transformers the script gives its classes the
few methods they call (``init_weights`` as a no-op, since the weights are copied in; the
additive attention mask of ``get_extended_attention_mask``; tuple outputs), runs its ``.cuda()``
calls on the CPU, and stands in for ``gensim``, which the reference imports but this path never uses.

Usage::

    python benchmarks/official_comparison_bert.py --reference /tmp/Transformer-Explainability
"""
from __future__ import annotations

import argparse
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tr  # noqa: E402

import attnx  # noqa: E402


def load_reference(path: str):
    """``(BertForSequenceClassification, Generator)`` of the reference, made to run here."""
    if not os.path.isdir(os.path.join(path, "BERT_explainability")):
        raise SystemExit(f"{path} is not a Transformer-Explainability checkout (no BERT_explainability)")
    sys.path.insert(0, os.path.abspath(path))
    gensim = types.ModuleType("gensim")
    gensim.models = types.ModuleType("gensim.models")
    gensim.models.KeyedVectors = object
    sys.modules.setdefault("gensim", gensim)
    sys.modules.setdefault("gensim.models", gensim.models)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the generator moves its one-hot to the GPU

    def extended_mask(self, mask, input_shape, device=None):
        return (1.0 - mask[:, None, None, :].to(torch.float64)) * -10000.0

    tr.PreTrainedModel.init_weights = lambda self: None
    tr.PreTrainedModel.post_init = lambda self: None
    tr.PreTrainedModel.get_extended_attention_mask = extended_mask
    tr.PreTrainedModel.get_head_mask = lambda self, head_mask, n, **k: [None] * n
    from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification
    from BERT_explainability.modules.BERT.ExplanationGenerator import Generator

    return BertForSequenceClassification, Generator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="checkout of hila-chefer/Transformer-Explainability")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    reference_cls, generator_cls = load_reference(args.reference)

    torch.manual_seed(args.seed)
    cfg = tr.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=args.layers, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = tr.BertForSequenceClassification._from_config(cfg, attn_implementation="eager").double().eval()
    with torch.no_grad():  # weights large enough that every layer matters
        for param in model.parameters():
            param.normal_(0, 0.2)
    ref_cfg = tr.BertConfig(**cfg.to_dict())
    ref_cfg.return_dict = False  # the reference builds tuple outputs only
    reference = reference_cls(ref_cfg).double().eval()
    missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        raise SystemExit(f"weights do not match: missing {missing}, unexpected {unexpected}")
    generator = generator_cls(reference)
    explainer = attnx.Explainer(model)

    ids = torch.randint(3, 200, (1, args.tokens))
    ids[0, 0] = 2
    worst = 0.0
    for padded in (False, True):
        mask = torch.ones_like(ids)
        if padded:
            mask[0, -4:] = 0
        for start in sorted({0, args.layers // 2, args.layers - 1}):
            for target in (0, 1):
                expected = generator.generate_LRP(input_ids=ids, attention_mask=mask, index=target, start_layer=start)
                e = explainer.explain({"input_ids": ids, "attention_mask": mask}, method="transformer_attribution",
                                      target=target, start_layer=start)
                got = e.token_relevance
                if padded:
                    # the real tokens other than [CLS]: the reference takes [CLS]'s self-relevance
                    # as the row minimum over every column, padding included (0 there), attnx
                    # over the real tokens
                    keep = mask[0].bool().clone()
                    keep[0] = False
                    got, expected = got[:, keep], expected[:, keep]
                rel = ((got - expected).abs().max() / expected.abs().max()).item()
                worst = max(worst, rel)
                print(f"padding {padded!s:5} start_layer {start:2d} class {target}: max relative difference {rel:.2e}")
    print(f"worst: {worst:.2e} (target <= 1e-4)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
