"""Whether the Hugging Face Hub can be reached, learnt in a few seconds rather than after a minute
of retries, and what to say when it cannot.

A hub id (``org/name``) is read from the local cache when ``HF_HUB_OFFLINE=1``; otherwise
transformers asks the Hub first and, with no network, retries for about a minute before it
fails. :func:`hub_files_only_locally` answers first: the id is read from the cache when the
Hub cannot be reached (a short HTTP request to ``HF_ENDPOINT``), and an id that is not cached
is one line naming ``HF_HUB_OFFLINE`` and the local-folder alternative.
"""
from __future__ import annotations

import os
import threading
from typing import Sequence

from ..errors import AttnxValueError

__all__ = ["CONNECT_TIMEOUT", "cached_file", "hub_files_only_locally", "hub_offline", "hub_reachable"]

#: seconds the connection check waits for the Hub (name lookup included)
CONNECT_TIMEOUT = 3.0


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for the local cache only."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether the Hub (``HF_ENDPOINT``, default https://huggingface.co) answers an HTTP request
    within ``timeout`` seconds (any answer counts, an error status too; proxies as configured)."""
    import urllib.error
    import urllib.request

    url = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/") + "/"
    result: list[bool] = []

    def ask() -> None:  # a thread: the name lookup itself has no timeout
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:  # it answered
            result.append(True)
        except (OSError, ValueError):  # no name, no route, refused, timed out, a malformed endpoint
            result.append(False)

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def cached_file(repo_id: str, filenames: Sequence[str] = ("config.json",)) -> str | None:
    """The local cache's copy of the first of ``filenames`` in ``repo_id``, or ``None``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers and timm depend on it
        return None
    for name in filenames:
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str):
            return path
    return None


def hub_files_only_locally(repo_id: str, filenames: Sequence[str] = ("config.json",)) -> bool:
    """Whether ``repo_id`` must be read from the local cache (``local_files_only``): the Hub is
    off (``HF_HUB_OFFLINE``) or unreachable. Raises one line when it is not in the cache then
    (none of ``filenames`` cached)."""
    offline = hub_offline()
    if not offline and hub_reachable():
        return False
    if cached_file(repo_id, filenames) is not None:
        return True
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached (no network?)"
    raise AttnxValueError(
        f"{repo_id} is not in the local Hugging Face cache and {why}: download it once with a network, or give a "
        "local folder saved with save_pretrained (--model ./folder); set HF_HUB_OFFLINE=1 to use the cache without "
        "waiting for the network"
    )
