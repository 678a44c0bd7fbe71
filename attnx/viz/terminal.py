"""Text for a terminal: what a model or a file provides (class names, token strings, file names) is
shown, never obeyed.

A class name in a downloaded ``config.json`` can carry terminal escape sequences (``\\x1b]...``
rewrites the window title, ``\\x1b[2J`` clears the screen, a bidirectional override reverses
what follows). :func:`escape` writes every such character as a visible escape (``\\x1b``,
``\\u202e``); the ``attnx`` command prints through :func:`say` and escapes its error lines, so
every line it prints goes through the one function.
"""
from __future__ import annotations

import os
import sys
import unicodedata

__all__ = ["escape", "say", "silence_stdout"]

#: Unicode categories a terminal acts on instead of showing: controls, format characters
#: (bidirectional overrides, zero-width marks), line and paragraph separators
_ACTING = ("Cc", "Cf", "Zl", "Zp")


def _visible(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: object, keep_newlines: bool = False) -> str:
    """``text`` with every character a terminal would act on written as a visible escape.

    Parameters
    ----------
    text:
        Anything; ``str(text)`` is escaped.
    keep_newlines:
        Keep ``"\\n"`` (multi-line output the command composed itself); by default a newline is
        escaped too, so that a name can never start a line of its own.

    Returns
    -------
    str
        Printable text: ``escape("cat\\x1b[31m")`` is ``"cat\\\\x1b[31m"``.
    """
    s = str(text)
    if s.isprintable():  # the common case, no copy
        return s
    return "".join(
        ch if (ch == "\n" and keep_newlines) or unicodedata.category(ch) not in _ACTING else _visible(ch) for ch in s
    )


def say(text: object, *, escaped: bool = False, stderr: bool = False) -> None:
    """Print a line (or lines) to stdout, escaped for the terminal (:func:`escape`, newlines kept).

    ``escaped=True`` prints ``text`` as it is: for output that carries the command's own colour
    codes and has escaped its model-provided parts already. ``stderr=True`` prints to stderr (the
    command's error line). A reader that went away (``| head -1``) silences the rest, and the
    command goes on writing its files.
    """
    try:
        print(text if escaped else escape(text, keep_newlines=True), file=sys.stderr if stderr else sys.stdout, flush=True)
    except BrokenPipeError:
        if not stderr:
            silence_stdout()


def silence_stdout() -> None:
    """Point stdout at the null device: nothing buffered can fail again at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
