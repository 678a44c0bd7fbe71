"""Gradient checkpointing kept on while explaining (:mod:`attnx.core.checkpointing`).

1. the checkpointed layers are the user's: Hugging Face layers whose flag is on, timm's blocks;
2. the backward recomputes them (their attention runs again) while every attention is recorded
   once, and the gradients and relevance equal those of the same model without checkpointing
   (float64, every method family: tests/test_adapters_switches.py checks all methods' maps);
3. the peak memory of a call drops (slow: fresh processes of benchmarks/checkpointing_memory.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnx
from attnx.adapters.switches import checkpointed_layers
from attnx.core.checkpointing import recomputing
from conftest import CASES
from contracts import assert_unchanged, snapshot
from decoder_models import DecoderCase

ROOT = Path(__file__).resolve().parents[1]


def llama():
    case = DecoderCase("llama", "lm", "sdpa")
    return case.model(torch.float64), case.inputs(batch=2)


def bert():
    case = CASES["hf_bert_sdpa"]
    return case.model(torch.float64), case.inputs(batch=2, lengths=[8, 5])


def checkpointing_on(model, use_reentrant: bool = False):
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in ("LlamaAttention", "BertSelfAttention")]


def test_checkpointed_layers_are_the_users():
    model, _ = llama()
    assert checkpointed_layers(model) == []
    checkpointing_on(model)
    assert checkpointed_layers(model) == list(model.model.layers)
    bert_model, _ = bert()
    checkpointing_on(bert_model)
    assert checkpointed_layers(bert_model) == list(bert_model.bert.encoder.layer)
    vit = CASES["timm_vit"].model()
    vit.set_grad_checkpointing(True)
    assert checkpointed_layers(vit) == list(vit.blocks)


@pytest.mark.parametrize("build", [llama, bert], ids=["llama", "bert"])
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", ["generic", "transformer_attribution", "lrp"])
def test_layers_recompute_and_attentions_are_recorded_once(build, use_reentrant, method):
    plain, x = build()
    model, _ = build()
    model.load_state_dict(plain.state_dict())
    checkpointing_on(model, use_reentrant)
    model.train()  # a training run's state: attnx explains in eval mode and restores it
    calls, during = {}, []

    def hook(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        during.append(recomputing())

    before = snapshot(model)
    handles = [m.register_forward_hook(hook) for m in attention_modules(model)]
    try:
        got = attnx.explain(model, x, method=method, check_forward="never")
    finally:
        for h in handles:
            h.remove()
    assert_unchanged(before, model)
    layers = attention_modules(model)
    # the explained forward ran each attention once; the backward(s) ran them again (those it
    # reached: Transformer Attribution may start at a later layer), marked as recomputation
    assert during.count(False) == len(layers) and during.count(True) >= 1
    if method == "generic":
        assert all(calls[m] >= 2 for m in layers), calls
    ref = attnx.explain(plain, x, method=method, check_forward="never")
    assert (got.scores - ref.scores).abs().max() <= 1e-10 * (1 + ref.scores.abs().max())
    trace = attnx.Explainer(model).capture(x, gradients=True)
    assert len(trace.attentions) == len(trace.gradients) == len(layers)


def test_lrp_rules_keep_the_checkpointed_layers_tensors_as_autograd_does(monkeypatch):
    """The tensors an LRP rule's backward reads inside a checkpointed layer (each linear layer's
    input and output, the norms', the activation's) are packed by the checkpoint, so they are let
    go after the forward and recomputed with the layer; the map is that of the plain model."""
    from attnx.lrp import relay

    plain, x = llama()
    model, _ = llama()
    model.load_state_dict(plain.state_dict())
    checkpointing_on(model)
    kept = []
    original = relay.Kept.__init__

    def noted(self, *tensors):
        original(self, *tensors)
        kept.append((recomputing(), getattr(self.unpack, "__module__", None)))

    monkeypatch.setattr(relay.Kept, "__init__", noted)
    got = attnx.explain(model, x, method="lrp", preset="attnlrp", check_forward="never")
    by_checkpoint = sum(1 for again, module in kept if not again and module == "torch.utils.checkpoint")
    # per layer: 7 linear layers, 2 RMSNorms, the SiLU
    assert by_checkpoint == 10 * len(model.model.layers), kept
    # the recomputation keeps them again in the same order (stopping once the last one is back)
    assert 0 < sum(1 for again, _ in kept if again) <= by_checkpoint
    monkeypatch.setattr(relay.Kept, "__init__", original)
    ref = attnx.explain(plain, x, method="lrp", preset="attnlrp", check_forward="never")
    assert (got.scores - ref.scores).abs().max() <= 1e-10 * (1 + ref.scores.abs().max())


@pytest.mark.slow  # four fresh processes at 1,024 tokens (~2 min on a loaded machine)
@pytest.mark.parametrize("method", ["gradient_x_input", "lrp"])
def test_checkpointing_lowers_the_peak_memory(method):
    """gradient_x_input keeps no attention maps: the layers' activations are what checkpointing drops
    (measured 241 MB -> 85 MB; the model's own forward + backward 250 MB -> 93 MB); lrp keeps its
    rules' tensors as saved tensors, recomputed too (300 MB -> 195 MB)."""
    script = ROOT / "benchmarks" / "checkpointing_memory.py"
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to read one call's peak")

    def peak(checkpointing: bool) -> dict:
        spec = json.dumps({"method": method, "checkpointing": checkpointing, "length": 1024})
        out = subprocess.run([sys.executable, str(script), "--worker", spec], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    plain, ckpt = peak(False), peak(True)
    assert plain["exact"] and ckpt["exact"]
    assert ckpt["peak_mb"] < 0.8 * plain["peak_mb"], (plain["peak_mb"], ckpt["peak_mb"])
    assert torch.allclose(torch.tensor(ckpt["map"]), torch.tensor(plain["map"]), rtol=1e-4, atol=1e-6)
