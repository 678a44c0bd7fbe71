"""Runs the LibraGrad authors' timm fork (NightMachinery/pytorch-image-models-libragrad-v1) on a
state dict of a stock timm ViT and saves what attnx's ``libragrad`` option must reproduce.

Run in a subprocess of its own (the fork is imported as ``timm``)::

    python tests/libragrad_reference.py FORK_DIR STATE_DICT.pt ARGS.json OUT.pt

The fork imports the authors' helper package ``pynight`` and plotting libraries that are not
installed here; the few helpers its ViT forward and backward run are written out below from
what the fork does with them, everything else it imports is an inert stand-in (never called on
the path measured). The configuration is the authors' ``LibraGrad`` gradient brand ``LX1``:
``layer_norm_gradient_mode = attention_gradient_mode = "LineX_1"``, ``gelu_gradient_mode =
"LineX_ZO"``, with the logit as the explained score (``S0``) and no patch-embedding
dissent suppression.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import json
import sys
import types

import torch

STUBBED = ("pynight", "IPython", "skimage", "blend_modes", "kornia", "brish", "einops", "icecream", "pytz", "decompv")


class _Inert:
    """Stands for anything the fork imports but the measured path never uses."""

    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return _Inert()

    def __getattr__(self, name):
        return _Inert()

    def __mro_entries__(self, bases):
        return (object,)


class _DynamicObject:
    """An attribute store whose unknown attributes read as ``None`` (pynight's DynamicObject)."""

    def __init__(self, store=None, default_to_none_p=True):
        object.__setattr__(self, "_store", {} if store is None else store)

    def __getattr__(self, name):
        return self._store.get(name)

    def __setattr__(self, name, value):
        self._store[name] = value

    def get(self, name, default=None):
        return self._store.get(name, default)


@contextlib.contextmanager
def _dynamic_variables(obj, **values):
    store = obj if isinstance(obj, dict) else obj._store
    old = {k: store.get(k) for k in values}
    store.update(values)
    try:
        yield
    finally:
        store.update(old)


def _swap_backward(forward, backward):
    """The value of ``forward`` with the gradient of ``backward``."""
    return forward.detach() + (backward - backward.detach())


def _tensor_register_hook(t, hook):
    if t.requires_grad:
        t.register_hook(hook)


def _delattr_force(obj, name):
    if hasattr(obj, name):
        delattr(obj, name)


KNOWN = {
    "swap_backward": _swap_backward,
    "tensor_register_hook": _tensor_register_hook,
    "decomposed_inputs_p": lambda x: not isinstance(x, torch.Tensor),
    "no_grad_maybe": lambda flag: torch.no_grad() if flag else contextlib.nullcontext(),
    "delattr_force": _delattr_force,
    "DynamicObject": _DynamicObject,
    "DynamicVariables": _dynamic_variables,
    "dynamic_set": lambda obj, name, value: setattr(obj, name, value),
    "dynamic_get": lambda store, name, default=None: store.get(name, default),
    "simple_obj": types.SimpleNamespace,
    "to_iterable": lambda x: x if isinstance(x, (list, tuple)) else [x],
    "lst_filter_out": lambda items, out: [i for i in (items or []) if i not in out],
}


class _StubModule(types.ModuleType):
    __path__: list = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return KNOWN.get(name, _Inert())


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def main(fork: str, state_path: str, args_path: str, out_path: str) -> None:
    sys.meta_path.insert(0, _StubFinder())
    sys.path.insert(0, fork)
    import timm
    from timm.models import decomposition as D
    from timm.models.vision_transformer import VisionTransformer

    assert timm.__file__.startswith(fork), timm.__file__
    cfg = D.dynamic_obj
    cfg.print_diag_enabled_groups = []
    cfg.layer_norm_gradient_mode = "LineX_1"
    cfg.attention_gradient_mode = "LineX_1"
    cfg.gelu_gradient_mode = "LineX_ZO"
    cfg.raw_attention_grad_store_p = True
    cfg.raw_attention_store_p = True
    spec = json.loads(open(args_path).read())
    torch.set_default_dtype(torch.float64)
    model = VisionTransformer(**spec["model"]).eval()
    model.load_state_dict(torch.load(state_path), strict=False)
    x = torch.load(state_path.replace(".pt", "_x.pt")).requires_grad_(True)
    block_inputs = []

    def keep(module, args):
        args[0].retain_grad()
        block_inputs.append(args[0])

    for block in model.blocks:
        block.register_forward_pre_hook(keep)
    logits = model(x)
    target = logits.argmax(-1)
    logits.gather(1, target[:, None]).sum().backward()
    torch.save({
        "logits": logits.detach(),
        "target": target,
        "gradient_x_input": (x * x.grad).detach(),
        "attentions": [b.attn.stored_rawattn for b in model.blocks],
        "attention_gradients": [b.attn.stored_rawattn_grad for b in model.blocks],
        "block_inputs": [h.detach() for h in block_inputs],
        "block_gradients": [h.grad for h in block_inputs],
    }, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:5])
