"""``python -m attnx.cli ...`` (e.g. under ``torchrun``): the ``attnx`` command."""
import sys

from .parser import command

sys.exit(command())
