"""Models from files, loaded as data: state dicts and checkpoints never run code unless asked to.

The policy (``attnx.zoo.load(path, ...)`` and ``attnx explain --model PATH``):

* ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` files are read with ``torch.load(weights_only=True)``,
  which accepts tensors, numbers, strings and containers of them, and refuses anything else
  without running it;
* ``.safetensors`` files are read with the ``safetensors`` library (tensors only, by design);
* a state dict builds its model from ``arch``: a timm architecture name
  (``timm.create_model(arch, pretrained=False, num_classes=<rows of the state dict's head>)``)
  or a Hugging Face folder or ``config.json`` (``from_config``), then ``load_state_dict``, strict;
* a whole pickled model (``torch.save(model)``) is unpickled only with ``trust_pickle=True``
  (``--trust-pickle``), with a warning: unpickling can execute arbitrary code from the file;
* a Hugging Face folder's own Python code (``auto_map``) runs only with ``trust_remote_code=True``
  (``--trust-remote-code``), and a zip archive that would unpack to more than ``max_expansion``
  times its size is refused before unpacking (:mod:`attnx.zoo.safety`).

Preprocessing (images): ``mean`` / ``std`` / ``size`` given by the caller win; else the model's own
(timm ``pretrained_cfg``, the image processor config of a Hugging Face folder); what is still
missing makes :func:`require_preprocessing` raise one line naming the options.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import AttnxTypeError, AttnxValueError
from .bundle import ImagePreprocess, ZooModel
from .safety import check_zip_expansion, read_safetensors, refusing_remote_code

__all__ = ["CHECKPOINT_SUFFIXES", "MODEL_FILE_SUFFIXES", "load_model_file", "pil_transform", "require_preprocessing"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
MODEL_FILE_SUFFIXES = CHECKPOINT_SUFFIXES + (".safetensors",)
#: keys under which training scripts nest the state dict of the model
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")


def pil_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Callable:
    """PIL image -> ``(3, H, W)`` tensor: RGB, resized to ``size`` ``(H, W)``, normalised with ``mean`` / ``std``."""
    from torchvision.transforms import functional as TF

    def f(img):
        img = img.convert("RGB").resize((size[1], size[0]))
        return TF.normalize(TF.to_tensor(img), mean, std)

    return f


def is_model_file(spec: str) -> bool:
    """Whether ``spec`` names a model file by its suffix (whether or not it exists)."""
    return spec.lower().endswith(MODEL_FILE_SUFFIXES)


def read_checkpoint(path: str, trust_pickle: bool, max_expansion: int | None = None) -> Any:
    """The object in a torch file: weights only, or unpickled when the caller trusts the file."""
    check_zip_expansion(path, max_expansion)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as exc:  # not a torch file at all (text, truncated, another format)
        raise AttnxValueError(f"{path} is not a file torch.load can read ({type(exc).__name__}: {exc})") from None
    if not trust_pickle:
        try:
            needs = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))  # (a set: a stable order)
        except Exception:  # a legacy (non-zip) pickle: the globals are not listed without reading it
            needs = []
        what = f" ({', '.join(needs[:3])}{', ...' if len(needs) > 3 else ''})" if needs else ""
        raise AttnxValueError(
            f"{path} needs unpickling of Python objects{what}, which can run code from the file; save a state dict "
            "instead (torch.save(model.state_dict(), path)) and give its architecture (--arch / arch=), or pass "
            "--trust-pickle (trust_pickle=True) if you trust the file"
        )
    warnings.warn(
        f"unpickling {path} (trust_pickle=True): a pickle can execute arbitrary code on this machine; "
        "load only files you trust",
        UserWarning,
        stacklevel=4,
    )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # e.g. a plain pickle.dump file: unpickled, but not a torch file
        raise AttnxValueError(f"{path} is not a file torch.load can read ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, nn.Module):
        restore_output_recording(obj)
    return obj


def restore_output_recording(model: nn.Module) -> None:
    """Register the unpickled Hugging Face models' output recorders again.

    transformers 5 records attentions (``output_attentions=True``) through a table keyed by model
    class that ``post_init`` fills when a model is built; unpickling builds nothing, so a
    ``torch.save(model)`` copy loaded in a new process returns no attentions until its classes
    are registered again.
    """
    try:
        from transformers.utils import output_capturing
    except ImportError:  # another transformers: nothing to restore
        return
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    if registry is None:
        return
    for module in model.modules():
        recorders = getattr(type(module), "_can_record_outputs", None)
        if recorders is not None and hasattr(module, "config") and not registry.get(module):
            registry[module] = recorders


def as_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` state dict in ``obj`` (also nested under ``state_dict`` / ``model``,
    and with the ``module.`` prefix of ``nn.DataParallel`` removed)."""
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = next((obj[k] for k in NESTED_STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
        obj = nested if nested is not None else obj
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AttnxTypeError(
            f"{path} holds a {type(obj).__name__}, expected a state dict {{name: tensor}} "
            "(torch.save(model.state_dict(), path)) or a whole nn.Module"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def timm_model(arch: str, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A timm ``arch`` with as many classes as the head rows of ``state``, weights loaded."""
    import timm

    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise AttnxValueError(f"--arch {arch!r} is not a timm architecture or a Hugging Face folder / config.json{hint}")
    head = timm.models.get_pretrained_cfg_value(arch, "classifier") or "head"
    head = head[0] if isinstance(head, (tuple, list)) else head
    weight = state.get(f"{head}.weight")
    num_classes = 0 if weight is None else int(weight.shape[0])
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    load_strict(model, state, arch)
    return model


def hf_model(arch: str, state: Mapping[str, torch.Tensor] | None, trust_remote_code: bool = False) -> tuple[nn.Module, str]:
    """The Hugging Face model of a folder or ``config.json`` (its weights: ``state``, or the
    folder's own when ``state`` is ``None``) and the folder, for the processor and tokenizer."""
    import transformers as tr

    folder = str(Path(arch).parent if arch.endswith(".json") else Path(arch))
    with refusing_remote_code(folder):
        config = tr.AutoConfig.from_pretrained(arch if arch.endswith(".json") else folder, trust_remote_code=trust_remote_code)
    names = " ".join(getattr(config, "architectures", None) or [])
    if "ForCausalLM" in names or "LMHeadModel" in names:
        auto = tr.AutoModelForCausalLM
    elif "SequenceClassification" in names:
        auto = tr.AutoModelForSequenceClassification
    else:
        auto = tr.AutoModelForImageClassification
    with refusing_remote_code(folder):
        if state is None:
            return auto.from_pretrained(folder, trust_remote_code=trust_remote_code).eval(), folder
        model_class = auto._model_mapping.get(type(config), None)  # noqa: SLF001 (the class from_config builds)
        if model_class is None:  # the folder's own code (trusted): build it once to learn its class
            model_class = type(auto.from_config(config, trust_remote_code=trust_remote_code))
        # transformers' own loading renames the keys of checkpoints saved by other versions; its
        # report of misfits is replaced by one line below
        verbosity = tr.logging.get_verbosity()
        tr.logging.set_verbosity_error()
        try:
            model, loading = model_class.from_pretrained(
                None, config=config, state_dict=dict(state), output_loading_info=True, ignore_mismatched_sizes=True
            )
        finally:
            tr.logging.set_verbosity(verbosity)
    refuse_misfit(loading, arch)
    return model, folder


def refuse_misfit(loading: Mapping[str, Any], arch: str) -> None:
    """One line naming the keys of a state dict that do not fit a Hugging Face model (from
    ``from_pretrained(..., output_loading_info=True)``): the model would run with random weights."""
    parts = []
    for what, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("of another shape", "mismatched_keys")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in loading.get(key) or ())
        if keys:
            parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if parts:
        raise AttnxValueError(f"the state dict does not fit --arch {arch!r}: keys {'; '.join(parts)}")


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """``model.load_state_dict(state)``, strict, with one line naming the keys that do not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise AttnxValueError(f"the state dict does not fit --arch {arch!r}: keys {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def own_preprocessing(model: nn.Module, folder: str | None, trust_remote_code: bool = False) -> dict[str, Any]:
    """``mean`` / ``std`` / ``size`` the model carries: timm's ``pretrained_cfg``, the image
    processor config of a Hugging Face folder, or a Hugging Face config's ``image_size``."""
    found: dict[str, Any] = {}
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping):
        if cfg.get("mean") is not None and cfg.get("std") is not None:
            found.update(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
        if cfg.get("input_size") is not None:
            found["size"] = tuple(cfg["input_size"][-2:])
    # the size the model is built for beats the config of the weights it was derived from
    # (timm keeps the default cfg's input_size when created with another img_size)
    for obj, attr in ((getattr(model, "patch_embed", None), "img_size"), (model, "image_size")):
        built = getattr(obj, attr, None) if obj is not None else None
        if isinstance(built, int):
            found["size"] = (built, built)
        elif isinstance(built, (tuple, list)) and len(built) == 2:
            found["size"] = (int(built[0]), int(built[1]))
    if folder is not None and (Path(folder) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        with refusing_remote_code(folder):
            proc = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if getattr(proc, "image_mean", None) is not None and getattr(proc, "image_std", None) is not None:
            found.update(mean=tuple(proc.image_mean), std=tuple(proc.image_std))
        size = getattr(proc, "size", None) or {}
        if "height" in size and "width" in size:
            found["size"] = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            found["size"] = (int(size["shortest_edge"]),) * 2
    image_size = getattr(getattr(model, "config", None), "image_size", None)
    if "size" not in found and image_size is not None:
        found["size"] = tuple(image_size) if isinstance(image_size, (tuple, list)) else (int(image_size),) * 2
    return found


def require_preprocessing(loaded: ZooModel) -> None:
    """Raise one line naming the options when an image model has no complete preprocessing."""
    if loaded.preprocess is not None:
        return
    missing = loaded.info.get("missing_preprocessing") or ["mean", "std", "size"]
    raise AttnxValueError(
        f"no preprocessing is known for {loaded.info.get('name', 'this model')} ({', '.join(missing)} missing): give "
        + " ".join(f"--{m}" for m in missing) + " (Python: " + ", ".join(f"{m}=" for m in missing) + ")"
    )


def load_model_file(
    path: str,
    arch: str | None = None,
    trust_pickle: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    size: int | Sequence[int] | None = None,
    trust_remote_code: bool = False,
    max_expansion: int | None = None,
) -> ZooModel:
    """A model from a file (see the module docstring for the policy).

    Parameters
    ----------
    path:
        A ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` torch file or a ``.safetensors`` file.
    arch:
        For a state dict: a timm architecture name (``"vit_small_patch16_224"``) or a Hugging
        Face model folder or ``config.json``.
    trust_pickle:
        Unpickle a whole model saved with ``torch.save(model)`` (can execute code from the file).
    mean, std, size:
        Image preprocessing (per-channel mean and std of inputs in ``[0, 1]``; ``size`` an int or
        ``(H, W)``); they win over the model's own.
    trust_remote_code:
        Run the Python code of an ``arch`` folder whose ``config.json`` has ``auto_map``
        (refused by default, without a prompt).
    max_expansion:
        Refuse a zip archive unpacking to more than this many times its size (default
        :data:`attnx.zoo.safety.MAX_EXPANSION`).
    """
    if not os.path.isfile(path):
        raise AttnxValueError(f"no such model file: {path}" + (" (it is a folder)" if os.path.isdir(path) else ""))
    if path.lower().endswith(".safetensors"):
        obj: Any = read_safetensors(path)
    else:
        obj = read_checkpoint(path, trust_pickle, max_expansion)
    folder = None
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise AttnxValueError(f"{path} holds a whole {type(obj).__name__}, not a state dict: leave out --arch (arch=)")
        model = obj
    else:
        state = as_state_dict(obj, path)
        if arch is None:
            raise AttnxValueError(
                f"{path} is a state dict (weights only): give its architecture with --arch (arch=), a timm name "
                "such as vit_small_patch16_224 or a Hugging Face model folder / config.json"
            )
        if os.path.isdir(arch) or arch.endswith(".json"):
            model, folder = hf_model(arch, state, trust_remote_code)
        else:
            model = timm_model(arch, state)
    model.eval()
    name = f"{Path(path).name}" + (f" ({arch})" if arch else "")
    labels = class_names_of(model)
    info: dict[str, Any] = {"name": name, "file": str(path), "arch": arch}
    if getattr(model, "main_input_name", None) == "input_ids":
        tokenizer = None
        if folder is not None:
            from transformers import AutoTokenizer

            with refusing_remote_code(folder):
                tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        names = " ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
        info["language_model"] = "ForCausalLM" in names or "LMHeadModel" in names
        return ZooModel(model, "text", None if info["language_model"] else labels, tokenizer=tokenizer, info=info)
    return image_bundle(model, labels, folder, dict(mean=mean, std=std, size=size), info, trust_remote_code)


def image_bundle(
    model: nn.Module,
    labels: list[str] | None,
    folder: str | None,
    given: Mapping[str, Any],
    info: dict[str, Any],
    trust_remote_code: bool = False,
) -> ZooModel:
    """An image classifier's bundle: its preprocessing from the ``mean`` / ``std`` / ``size`` given
    (``None`` values ignored), which win over the model's own (:func:`own_preprocessing`); without
    a complete set, ``preprocess`` is ``None`` and ``info["missing_preprocessing"]`` names the gaps."""
    given = {k: v for k, v in given.items() if v is not None}
    if "size" in given:
        s = given["size"]
        given["size"] = (int(s), int(s)) if isinstance(s, int) else tuple(int(v) for v in s)
    prep = {**own_preprocessing(model, folder, trust_remote_code), **given}
    missing = [k for k in ("mean", "std", "size") if k not in prep]
    if missing:
        info["missing_preprocessing"] = missing
        return ZooModel(model, "image", labels, None, info=info)
    for k in ("mean", "std"):
        if len(prep[k]) != 3:
            raise AttnxValueError(f"{k} must give one value per RGB channel (3 numbers), got {list(prep[k])}")
    return ZooModel(model, "image", labels, ImagePreprocess(pil_transform(prep["size"], prep["mean"], prep["std"])),
                    mean=tuple(prep["mean"]), std=tuple(prep["std"]), info=info)


def class_names_of(model: nn.Module) -> list[str] | None:
    """The class names a loaded model carries (see :func:`attnx.core.labels.class_names`)."""
    from ..core.labels import class_names

    return class_names(model)
