"""What a model file or folder may make attnx do: read tensors, never run code or fill the memory
unasked.

* **Remote code.** A Hugging Face folder or id whose ``config.json`` carries ``auto_map`` ships
  Python files for its model. transformers runs them with ``trust_remote_code=True``, and when the
  argument is left out it *asks* in a terminal ("run the custom code? [y/N]"). attnx always
  passes it explicitly, ``False`` unless the caller says ``trust_remote_code=True``
  (``--trust-remote-code``): no prompt, and a refused folder is one line naming the option.
* **Zip bombs.** ``torch.save`` writes a zip archive whose entries are stored, not compressed (the
  unpacked size equals the file size). A file whose entries unpack to more than
  :data:`MAX_EXPANSION` times its size (and more than :data:`UNPACKED_ALLOWANCE` bytes) is refused
  from the zip directory, before anything is unpacked.
* **Corrupt safetensors** files are one line (:class:`~attnx.errors.AttnxValueError`).
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from typing import Any, Iterator

from ..errors import AttnxValueError

__all__ = ["MAX_EXPANSION", "UNPACKED_ALLOWANCE", "check_zip_expansion", "read_safetensors", "refusing_remote_code"]

#: how many times its own size a zipped model file may unpack to (``torch.save`` archives: 1)
MAX_EXPANSION = 10
#: unpacked bytes every file may reach whatever its size (small files with a few zero tensors)
UNPACKED_ALLOWANCE = 64 * 2**20


def check_zip_expansion(path: str, max_expansion: int | None = None) -> None:
    """Refuse a zip archive (a ``torch.save`` file) that unpacks to more than ``max_expansion``
    times its size, reading only the archive's directory.

    Parameters
    ----------
    path:
        The file; one that is not a zip archive (a legacy pickle, safetensors) passes.
    max_expansion:
        The largest ratio of unpacked to file size; default :data:`MAX_EXPANSION`.
    """
    limit = MAX_EXPANSION if max_expansion is None else max_expansion
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise AttnxValueError(f"{path} is a damaged zip archive ({exc})") from None
    size = os.path.getsize(path)
    if unpacked > max(limit * size, UNPACKED_ALLOWANCE):
        raise AttnxValueError(
            f"{path} unpacks to {unpacked / 2**20:.0f} MB from {size / 2**20:.1f} MB ({unpacked / max(size, 1):.0f}x, "
            f"more than {limit}x): refused before unpacking (torch.save files are not compressed); if you trust the "
            "file, raise the limit with --max-expansion N (max_expansion=N)"
        )


def read_safetensors(path: str) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file; a damaged file is one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AttnxValueError(f"{path} is not a safetensors file the safetensors library can read "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


@contextlib.contextmanager
def refusing_remote_code(source: str) -> Iterator[None]:
    """Turn transformers' refusal of a model's custom code (``trust_remote_code=False``) into one
    line naming the option that allows it."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise AttnxValueError(
            f"{source} contains custom code (auto_map in its config.json), which attnx does not run unless asked: "
            "pass --trust-remote-code (trust_remote_code=True) if you trust it"
        ) from None
