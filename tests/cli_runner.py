"""Run the ``attnx`` command line in-process, as the shell would see it (shared by the CLI tests)."""
from __future__ import annotations

import sys

from attnx import cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``attnx ARGV`` in-process: (exit status, stdout, stderr), as the shell would see them."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:  # argparse, --help and the CLI's own one-line errors
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            status = 1
        else:
            status = 0 if exc.code is None else exc.code
    out, err = capsys.readouterr()
    return status, out, err
