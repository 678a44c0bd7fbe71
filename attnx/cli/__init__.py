"""The ``attnx`` command: ``explain``, ``methods``, ``models``, ``evaluate`` and ``demo``."""
from .commands import DEFAULT_METHOD, build_parser, command, main

__all__ = ["DEFAULT_METHOD", "build_parser", "command", "main"]
