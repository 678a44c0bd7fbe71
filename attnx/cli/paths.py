"""Where the ``attnx`` command writes: ``--out`` checked before any work is done.

``--out`` names a folder (existing or new; one file per picture inside) or a file whose suffix
says what is written. Missing folders are created; a suffix the command cannot write, a file
where a folder is needed, or a place nobody can write to (``/proc``, a read-only mount) is one
line and exit status 2, before a model is loaded.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import AttnxValueError

__all__ = ["HTML_SUFFIXES", "PICTURE_SUFFIXES", "check_out", "out_path"]

#: the pictures matplotlib writes for ``attnx explain``
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
#: the interactive page
HTML_SUFFIXES = (".html", ".htm")


def _writable_folder(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried: ``os.access`` says yes to root in ``/proc``)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_out(out: str | None, suffixes: Sequence[str] | None = PICTURE_SUFFIXES + HTML_SUFFIXES, what: str = "") -> None:
    """Raise one line when ``--out`` cannot be written.

    Parameters
    ----------
    out:
        The ``--out`` value; ``None``: the command's default file in the current folder.
    suffixes:
        The file suffixes the command writes (a name without a suffix is a folder); ``None``:
        ``out`` is a folder, whatever its name.
    what:
        What the command writes, for the message (e.g. ``"text explanations"``).
    """
    p = Path(out) if out else Path.cwd()
    suffix = p.suffix.lower() if out and suffixes is not None else ""
    if suffix and suffix not in suffixes:
        forms = [form for form, group in (("a picture (PNG, JPG, JPEG, PDF, SVG)", PICTURE_SUFFIXES),
                                          ("HTML (an .html page)", HTML_SUFFIXES)) if set(group) & set(suffixes)]
        raise AttnxValueError(f"--out {out}: {what or 'the results'} are written as {' or '.join(forms)} or into a folder, "
                              f"not as {suffix}")
    if not suffix and p.exists() and not p.is_dir():
        endings = [s for s in (".png", ".html") if s in (suffixes or ())]
        raise AttnxValueError(f"--out {out} is an existing file, not a folder; give a folder"
                              + (f" or a file name ending in {' or '.join(endings)}" if endings else ""))
    if suffix and p.is_dir():
        raise AttnxValueError(f"--out {out} is an existing folder, expected a file name (or give the folder without a suffix)")
    folder = p if not suffix else p.parent
    for q in (folder, *folder.parents):  # the nearest existing folder: the new ones are made there
        if q.exists():
            if not q.is_dir():
                raise AttnxValueError(f"--out {out}: {q} is a file, expected a folder there")
            if not _writable_folder(q):
                raise AttnxValueError(f"--out {out}: cannot write in {q} (permission denied or a read-only place)")
            break


def out_path(out: str | None, default: str, suffix: str) -> Path:
    """The file to write: ``out`` itself, or ``FOLDER/FOLDER<suffix>`` inside a folder ``out``, or
    ``default`` in the current folder; folders are created."""
    p = Path(out) if out else Path(default)
    if p.suffix == "":
        p.mkdir(parents=True, exist_ok=True)
        p = p / ((p.resolve().name or "attnx") + suffix)  # a folder: FOLDER/FOLDER_<what>.png
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def is_html(out: str | None) -> bool:
    """Whether ``--out`` names an interactive page."""
    return bool(out) and Path(out).suffix.lower() in HTML_SUFFIXES


def existing_files(paths: Sequence[str], what: str = "image file") -> None:
    """Raise one line naming every path that is not a file."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise AttnxValueError(f"no such {what}{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
