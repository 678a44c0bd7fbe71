"""``python -m attnx.cli``: the ``attnx`` command."""
import sys

from .commands import command

sys.exit(command())
