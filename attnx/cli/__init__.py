"""The ``attnx`` command: ``explain``, ``methods``, ``models``, ``evaluate`` and ``demo``.

:mod:`.parser` builds the parser and runs a command (:func:`main`, the entry point
:func:`command`); each subcommand lives in its own module: :mod:`.explain` (images, texts, dual
encoders; :mod:`.generation` for a language model's answer), :mod:`.evaluate`, :mod:`.catalogue`
(``methods``, ``models``). Shared by them: :mod:`.args` (argument values), :mod:`.loading` (the
model and the input files), :mod:`.paths` (``--out``), :mod:`.help` (the examples).
"""
from .explain import DEFAULT_METHOD
from .parser import build_parser, command, main

__all__ = ["DEFAULT_METHOD", "build_parser", "command", "main"]
