"""Models run through ``accelerate`` (CPU / disk offload, ``dispatch_model``) and models with
gradient checkpointing explain as the plain model does.

``accelerate`` keeps the weights of an offloaded model on the ``meta`` device and moves them in
around each module's forward; gradient checkpointing re-runs blocks during the backward. Both
are checked against the same model built plainly (float64, every attention method,
``transformer_attribution`` and ``lrp``), and the model's hooks, forwards and flags must be
left as found.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import attnx
from conftest import CASES
from decoder_models import DecoderCase

accelerate = pytest.importorskip("accelerate")

METHODS = ["raw_attention", "rollout", "grad_rollout", "generic", "attn_gradcam", "attention_flow",
           "transformer_attribution", "lrp"]
TOL = 1e-6
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_backward_hooks", "_forward_hooks_always_called")


def llama():
    case = DecoderCase("llama", "lm", "sdpa")
    return (lambda: case.model(torch.float64)), case.inputs(batch=2)


def bert():
    case = CASES["hf_bert_sdpa"]
    return (lambda: case.model(torch.float64)), case.inputs(batch=2, lengths=[8, 5])


def timm_vit():
    case = CASES["timm_vit"]
    return (lambda: case.model(torch.float64)), case.inputs(batch=2, dtype=torch.float64)


MODELS = {"llama": llama, "bert": bert, "timm_vit": timm_vit}


def explain_all(model, x) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate-map warnings of random tiny models are not the point
        return {m: attnx.explain(model, x, method=m).scores for m in METHODS}


_reference: dict[str, dict] = {}


def reference(name: str) -> dict[str, torch.Tensor]:
    if name not in _reference:
        build, x = MODELS[name]()
        _reference[name] = explain_all(build(), x)
    return _reference[name]


def state(model) -> dict:
    """What explaining must leave alone: every module's hooks, (wrapped) forward, accelerate hook,
    flags and parameters (their device: offloaded ones stay on ``meta``)."""
    out = {}
    for name, m in model.named_modules():
        out[name] = (
            {h: dict(getattr(m, h, None) or {}) for h in HOOK_DICTS},
            m.__dict__.get("forward"),
            m.__dict__.get("_hf_hook"),
            m.training,
            m.__dict__.get("gradient_checkpointing"),
            m.__dict__.get("grad_checkpointing"),
            # accelerate puts a new meta parameter back after every call of an offloaded module
            {n: (None if p.device.type == "meta" else id(p), p.device, p.requires_grad, p.grad)
             for n, p in m.named_parameters(recurse=False)},
            set(m.__dict__),
        )
    return out


def offloaded(build, kind: str, tmp_path):
    model = build()
    if kind == "cpu_offload":
        accelerate.cpu_offload(model, execution_device="cpu")
    elif kind == "disk_offload":
        accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    else:  # a device map over cpu and disk: every other top-level child to disk
        children = [n for n, _ in model.named_children()]
        leaves = []
        for n in children:
            sub = dict(model.get_submodule(n).named_children())
            leaves += [f"{n}.{s}" for s in sub] if sub else [n]
        device_map = {n: ("disk" if i % 2 else "cpu") for i, n in enumerate(leaves)}
        device_map.update({n: "cpu" for n, _ in model.named_parameters(recurse=False)})  # timm's cls_token
        accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "map"), main_device="cpu")
    return model


@pytest.mark.parametrize("kind", ["cpu_offload", "disk_offload", "dispatch_model"])
@pytest.mark.parametrize("name", list(MODELS))
def test_offloaded_model_explains_as_the_plain_model(name, kind, tmp_path):
    build, x = MODELS[name]()
    model = offloaded(build, kind, tmp_path)
    assert any(p.device.type == "meta" for p in model.parameters()), "the weights should be offloaded"
    before = state(model)
    got = explain_all(model, x)
    ref = reference(name)
    for method in METHODS:
        assert got[method].device == (x["input_ids"] if isinstance(x, dict) else x).device
        diff = float((got[method] - ref[method]).abs().max())
        assert diff <= TOL, f"{method}: {diff}"
    after = state(model)
    assert after.keys() == before.keys()
    for n in before:
        assert after[n] == before[n], f"{n or 'model'} changed"
    assert torch._C._len_torch_function_stack() == 0


def hf_checkpointing(use_reentrant: bool):
    def enable(model):
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return enable


def timm_checkpointing(model):
    model.set_grad_checkpointing(True)


@pytest.mark.parametrize(
    "name, enable",
    [
        pytest.param("llama", hf_checkpointing(True), id="llama-reentrant"),
        pytest.param("llama", hf_checkpointing(False), id="llama-non-reentrant"),
        pytest.param("bert", hf_checkpointing(False), id="bert-non-reentrant"),
        # timm checkpoints in eval mode too: the backward would re-run the blocks
        pytest.param("timm_vit", timm_checkpointing, id="timm_vit"),
    ],
)
def test_gradient_checkpointing_explains_as_the_plain_model(name, enable):
    build, x = MODELS[name]()
    model = build()
    enable(model)
    model.train()
    flags = {n: (m.__dict__.get("gradient_checkpointing"), m.__dict__.get("grad_checkpointing"))
             for n, m in model.named_modules()}
    assert any(v != (None, None) for v in flags.values()), "checkpointing should be on"
    before = state(model)
    got = explain_all(model, x)
    ref = reference(name)
    for method in METHODS:
        diff = float((got[method] - ref[method]).abs().max())
        assert diff <= TOL, f"{method}: {diff}"
    after = state(model)
    for n in before:
        assert after[n] == before[n], f"{n or 'model'} changed"
    # the user's training run checkpoints as before
    out = model(**x) if isinstance(x, dict) else model(x)
    logits = out.logits if hasattr(out, "logits") else out
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_switches_restore_on_error(tmp_path):
    from attnx.adapters.switches import plain_execution

    build, x = MODELS["llama"]()
    model = offloaded(build, "cpu_offload", tmp_path)
    hf_checkpointing(False)(model)
    before = state(model)
    with pytest.raises(KeyError):
        with plain_execution(model):
            assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
            assert all("_old_forward" not in m.__dict__ or m.forward == m._old_forward for m in model.modules())
            raise KeyError("boom")
    after = state(model)
    for n in before:
        assert after[n] == before[n], f"{n or 'model'} changed"
