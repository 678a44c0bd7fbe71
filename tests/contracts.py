"""The contract helpers the test modules share: the state of a model, and its attention read by hand.

* :func:`snapshot` / :func:`assert_unchanged`: everything a call may not leave changed on a model
  (parameter and buffer values, ``training`` flags, timm ``fused_attn``, Hugging Face
  ``config._attn_implementation``, every hook dictionary, every plain attribute, parameters'
  ``.grad``, ``requires_grad`` and tensor hooks; globally: module hooks, the torch function mode
  stack and the grad mode); :func:`mixed_mode` puts a model in mixed train/eval mode first.
* :func:`attention_layers` / :func:`grab_layer_inputs`: every attention module of a model of the
  matrix (``conftest.CASES``) with its own q, k projections, written from each library's layer
  definition, and the hidden states that reach it: the references of the capture contract.
* :data:`KINDS`: one tiny random model of every kind attnx explains (ViT, BERT, GPT-2, Llama, Swin,
  CLIP and OpenCLIP through the dual-encoder path), with its inputs: the state contract runs on
  all of them (``test_contract_state.py``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from conftest import CASES, randomize_


# --------------------------------------------------------------------------------------------
# the state of a model
# --------------------------------------------------------------------------------------------
HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
GLOBAL_HOOKS = sorted(k for k in dir(module_globals) if k.startswith("_global_") and k.endswith("hooks"))
PLAIN = (bool, int, float, str, type(None))


#: methods that read every block's tokens (attcat), values through the output projection (bt_t) or both
#: and the feed-forward sublayers (tokentm):
#: an adapter that does not name a model's blocks (or its value and output projections) refuses them
#: with :class:`attnx.errors.UnsupportedModelError`
BLOCK_METHODS = ("attcat", "bt_t", "tokentm")
#: methods that read each layer's score through the model's head (legrad below the last layer): an
#: adapter that cannot read intermediate layers (research models) refuses them in one line
LAYER_READOUT_METHODS = ("legrad",)


def explained_or_refused(explain: Callable, method: str):
    """``explain(method)``, or ``None`` when ``method`` is a :data:`BLOCK_METHODS` or
    :data:`LAYER_READOUT_METHODS` method the adapter refuses in one line (any other error, or a
    refusal of another method, fails the test)."""
    from attnx.errors import UnsupportedModelError

    if method not in BLOCK_METHODS + LAYER_READOUT_METHODS:
        return explain(method)
    try:
        return explain(method)
    except UnsupportedModelError as err:
        assert "\n" not in str(err) and "do not apply" in str(err), str(err)
        return None


def snapshot(model: nn.Module) -> dict:
    s = {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {n: (id(p), p.requires_grad, p.grad, p._backward_hooks) for n, p in model.named_parameters()},
        "modules": {},
        "globals": {k: dict(getattr(module_globals, k)) for k in GLOBAL_HOOKS},
        "function_modes": torch._C._len_torch_function_stack(),
        "grad_enabled": torch.is_grad_enabled(),
    }
    for name, m in model.named_modules():
        s["modules"][name] = {
            "type": type(m),
            "hooks": {h: dict(getattr(m, h, None) or {}) for h in HOOK_DICTS},
            "attributes": {k: v for k, v in m.__dict__.items() if isinstance(v, PLAIN)},
            "keys": set(m.__dict__),
            "attn_implementation": getattr(getattr(m, "config", None), "_attn_implementation", None),
        }
    return s


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert after["function_modes"] == before["function_modes"] == 0, "a torch function mode is still active"
    assert after["grad_enabled"] == before["grad_enabled"]
    assert after["globals"] == before["globals"], "global module hooks were left"
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), f"{k} changed"
    assert after["params"].keys() == before["params"].keys()
    for n, (pid, req, grad, hooks) in after["params"].items():
        assert pid == before["params"][n][0], f"parameter {n} was replaced"
        assert req == before["params"][n][1], f"requires_grad of {n} changed"
        assert grad is None, f"{n}.grad was left"
        assert not hooks, f"a tensor hook is left on {n}"
    assert after["modules"].keys() == before["modules"].keys()
    for name, m in after["modules"].items():
        b = before["modules"][name]
        assert m["type"] is b["type"]
        for h in HOOK_DICTS:
            assert m["hooks"][h] == b["hooks"][h], f"{name or 'model'}.{h} changed: {m['hooks'][h]}"
        assert m["keys"] == b["keys"], f"{name or 'model'} attributes added/removed: {m['keys'] ^ b['keys']}"
        assert m["attributes"] == b["attributes"], f"{name or 'model'} attributes changed"
        assert m["attn_implementation"] == b["attn_implementation"]


def mixed_mode(model: nn.Module) -> nn.Module:
    """model.train() with every third module (and the head-side last one) back in eval mode."""
    model.train()
    mods = list(model.modules())
    for i, m in enumerate(mods):
        if i % 3 == 1:
            m.eval()
    mods[-1].eval()
    assert any(m.training for m in mods) and not all(m.training for m in mods)
    return model


# --------------------------------------------------------------------------------------------
# attention modules and their q, k projections, written from each library's layer definition
# --------------------------------------------------------------------------------------------
def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, D = t.shape
    return t.view(B, N, heads, D // heads).transpose(1, 2)


def attention_layers(case, model):
    """``[(module, qk(x) -> (q, k) as (B, H, N, d), scale)]`` per layer, in forward order."""
    if case.family == "timm":
        layers = []
        for block in model.blocks:
            attn = block.attn
            assert isinstance(attn.q_norm, torch.nn.Identity) and isinstance(attn.k_norm, torch.nn.Identity)

            def qk(x, attn=attn):
                B, N, _ = x.shape
                qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
                return qkv[0], qkv[1]

            layers.append((attn, qk, attn.head_dim ** -0.5))
        return layers
    if case.family == "torchvision":
        layers = []
        for layer in model.encoder.layers:
            mha = layer.self_attention
            D, H = mha.embed_dim, mha.num_heads

            def qk(x, mha=mha, D=D, H=H):
                w, b = mha.in_proj_weight, mha.in_proj_bias
                q = F.linear(x, w[:D], b[:D])
                k = F.linear(x, w[D : 2 * D], b[D : 2 * D])
                return split_heads(q, H), split_heads(k, H)

            layers.append((mha, qk, (D // H) ** -0.5))
        return layers
    base = getattr(model, model.base_model_prefix)
    heads = model.config.num_attention_heads if hasattr(model.config, "num_attention_heads") else model.config.n_heads
    if case.family == "hf_vision":
        mods = [(l.attention, "q_proj", "k_proj") for l in base.layers]
    elif "distilbert" in case.name:
        mods = [(l.attention, "q_lin", "k_lin") for l in base.transformer.layer]
    else:
        mods = [(l.attention.self, "query", "key") for l in base.encoder.layer]
    layers = []
    for mod, qn, kn in mods:
        def qk(x, mod=mod, qn=qn, kn=kn):
            return split_heads(getattr(mod, qn)(x), heads), split_heads(getattr(mod, kn)(x), heads)

        d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.dim
        layers.append((mod, qk, (d // heads) ** -0.5))
    return layers


@contextlib.contextmanager
def grab_layer_inputs(layers):
    """Record the first positional input (the hidden states) of every attention module."""
    seen = []
    handles = [
        mod.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
                                      with_kwargs=True)
        for mod, _, _ in layers
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# one model of every kind
# --------------------------------------------------------------------------------------------
@dataclass
class Kind:
    """A tiny random model of one kind, its inputs, and the extra arguments ``attnx.explain`` takes.

    ``build()`` returns the model in eval mode; ``inputs()`` fresh inputs (a tensor or a dict of
    tensors); ``call()`` the keyword arguments of the call besides ``method`` (the prompts and the
    tokenizer of a dual encoder).
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    call: Callable[[], dict] = field(default=lambda: {})


def _vit_timm() -> nn.Module:
    return CASES["timm_vit"].model()


def _vit_hf() -> nn.Module:
    return CASES["hf_vit_sdpa"].model()


def _swin_timm() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                            num_heads=(2, 4), num_classes=5)
    return randomize_(model, seed=7).eval()


def _swin_hf() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=32, patch_size=4, window_size=4, embed_dim=16, depths=[2, 2],
                                     num_heads=[2, 4], num_labels=5)
    model = transformers.SwinForImageClassification._from_config(config, attn_implementation="sdpa")
    return randomize_(model, seed=7).eval()


def _decoder(family: str):
    from decoder_models import DecoderCase

    return DecoderCase(family, "lm", "sdpa")


def _images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _text() -> dict:
    return CASES["hf_bert_sdpa"].inputs(2, lengths=[9, 5])


def _prompts(open_clip: bool) -> Callable[[], dict]:
    def call() -> dict:
        from clip_models import WordTokenizer

        return {"text": ["a cat", "a big brown dog"], "tokenizer": WordTokenizer(open_clip=open_clip)}

    return call


def _clip(open_clip: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from clip_models import hf_clip, open_clip_model

        return (open_clip_model if open_clip else hf_clip)().eval()

    return build


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("vit_timm", _vit_timm, _images),
    Kind("vit_hf", _vit_hf, _images),
    Kind("bert", lambda: CASES["hf_bert_sdpa"].model(), _text),
    Kind("gpt2", lambda: _decoder("gpt2").model(), lambda: _decoder("gpt2").inputs([9, 6])),
    Kind("llama", lambda: _decoder("llama").model(), lambda: _decoder("llama").inputs([9, 6])),
    Kind("swin_timm", _swin_timm, _images),
    Kind("swin_hf", _swin_hf, _images),
    Kind("clip_hf", _clip(False), _images, _prompts(False)),
    Kind("open_clip", _clip(True), _images, _prompts(True)),
]}


def freeze_some_(model: nn.Module) -> nn.Module:
    """Every third parameter frozen (``requires_grad=False``), as a partly fine-tuned model has them."""
    for i, p in enumerate(model.parameters()):
        if i % 3 == 2:
            p.requires_grad_(False)
    assert any(p.requires_grad for p in model.parameters()) and not all(p.requires_grad for p in model.parameters())
    return model


def tensors_of(inputs) -> dict[str, torch.Tensor]:
    """The tensors of an input (a tensor or a dict of them) by name."""
    return dict(inputs) if isinstance(inputs, dict) else {"input": inputs}


def input_snapshot(inputs) -> dict:
    return {k: (v.detach().clone(), v.requires_grad, v.grad, v.dtype, v.device) for k, v in tensors_of(inputs).items()}


def assert_inputs_unchanged(before: dict, inputs) -> None:
    """The input tensors hold the same values, dtype and device, and got no gradient or ``requires_grad``."""
    after = tensors_of(inputs)
    assert after.keys() == before.keys()
    for k, (value, requires_grad, grad, dtype, device) in before.items():
        t = after[k]
        assert t.dtype == dtype and t.device == device, f"input {k} was converted"
        assert torch.equal(t.detach(), value), f"input {k} was modified"
        assert t.requires_grad == requires_grad, f"requires_grad of input {k} changed"
        assert t.grad is grad, f"input {k} got a .grad"
