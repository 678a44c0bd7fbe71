"""Fashion-MNIST (Xiao et al. 2017) from local IDX files: no network, numpy + gzip only.

The files are looked up, in order, in the directory named by the environment variable
``ATTNX_FASHION_MNIST``, in ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package
``dataset-fashion-mnist``) and in the ``FashionMNIST/raw`` folder torchvision downloads to
(``~/.cache/attnx``, ``./data``). Either gzipped (``train-images-idx3-ubyte.gz``) or plain files work.
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import AttnxValueError

__all__ = ["CLASS_NAMES", "ENV_VAR", "FashionMNISTNotFound", "find_fashion_mnist", "load_fashion_mnist"]

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
ENV_VAR = "ATTNX_FASHION_MNIST"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}


class FashionMNISTNotFound(FileNotFoundError):
    """The Fashion-MNIST IDX files are nowhere attnx looks."""


def _candidates() -> list[Path]:
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs.append(DEBIAN_DIR)
    for root in (Path.home() / ".cache" / "attnx", Path("data")):
        dirs += [root / "FashionMNIST" / "raw", root]
    return dirs


def _file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist() -> Path:
    """The first directory holding all four Fashion-MNIST IDX files.

    Raises
    ------
    FashionMNISTNotFound
        With instructions to install the files.
    """
    searched = _candidates()
    stems = [f"{p}-{k}" for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    for d in searched:
        if all(_file(d, s) is not None for s in stems):
            return d
    raise FashionMNISTNotFound(
        "Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) not found in: "
        + ", ".join(str(d) for d in searched)
        + ".\nGet them with one of:\n"
        "  sudo apt-get install dataset-fashion-mnist            # Debian/Ubuntu, offline mirrors\n"
        "  python -c \"import torchvision; torchvision.datasets.FashionMNIST("
        "'~/.cache/attnx', download=True)\"   # needs a network\n"
        f"or point {ENV_VAR} at a directory that holds them. The held-out scenes shipped with attnx "
        "(attnx.zoo.scenes()) need none of this."
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # unsigned byte data
        raise AttnxValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise AttnxValueError(f"{path}: truncated IDX file ({array.size} bytes for shape {shape})")
    return array.reshape(shape)


@lru_cache(maxsize=2)
def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28) uint8`` and labels ``(N,) int64`` of a split.

    Parameters
    ----------
    split:
        ``"train"`` (60 000 images) or ``"test"`` / ``"t10k"`` (10 000 images).
    """
    if split not in _PREFIX:
        raise AttnxValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = find_fashion_mnist()
    prefix = _PREFIX[split]
    images = _read_idx(_file(directory, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_file(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise AttnxValueError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels
