"""The ``attnx`` command: its parser, its one error path and its entry point.

Every user mistake is an :class:`~attnx.errors.AttnxError` (argparse's own complaints included),
said as one line (escaped, see :mod:`attnx.viz.terminal`) with exit status 2; anything else is a
bug and keeps its traceback. Each subcommand lives in its own module (:mod:`.explain`,
:mod:`.evaluate`, :mod:`.catalogue`; ``demo`` is here) and imports torch, the zoo and matplotlib
inside its functions: ``attnx --help`` starts at once.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn, Sequence

from ..errors import AttnxError, AttnxValueError
from ..viz.terminal import escape, say, silence_stdout
from . import catalogue, evaluate, explain
from .help import EPILOG
from .paths import check_out

__all__ = ["build_parser", "command", "main"]


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose complaints (an unknown flag, a bad number) take the command's one
    error path: an :class:`~attnx.errors.AttnxValueError`, one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise AttnxValueError(f"{message} (see `{self.prog} --help`)")


def cmd_demo(args: argparse.Namespace) -> int:
    """``attnx demo``: every method on the embedded models, pictures to ``--out``."""
    check_out(args.out, None)
    from .. import demo

    demo.run(args.out, quiet=args.quiet)
    return 0


def _add_demo_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="the main job: every method on the embedded vision and text models, pictures to --out")
    d.add_argument("--out", default="attnx_demo", help="output folder (default attnx_demo/)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)


def build_parser(evaluate_help: bool = True) -> argparse.ArgumentParser:
    """The parser; ``evaluate_help=False`` leaves out ``attnx evaluate --help``'s epilog and
    baselines (read from :mod:`attnx.evaluate`, which imports torch)."""
    p = CommandParser(
        prog="attnx",
        description="Explain stock pretrained Transformers (ViT, DeiT, BERT, ...) with attention rollout, "
        "gradient rollout, Transformer Attribution and LRP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    explain.add_parser(sub)
    catalogue.add_parsers(sub)
    _add_demo_parser(sub)
    evaluate.add_parser(sub, full_help=evaluate_help)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``attnx ARGV``; returns the exit status (0, or 2 for a user's mistake)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(evaluate_help="evaluate" in argv)
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 0
        status = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away is not an error
        return status
    except AttnxError as exc:  # a user's mistake, said in one line; anything else keeps its traceback
        say(f"attnx: error: {escape(exc)}", escaped=True, stderr=True)
        return 2
    except BrokenPipeError:  # e.g. `attnx methods | head`: the reader went away, not an error
        silence_stdout()
        return 0


def command() -> int:
    """The ``attnx`` command: its own process, so freed memory is kept for reuse (batched LRP
    passes on CPU run at full speed with it; see :mod:`attnx.core.allocator`)."""
    import attnx  # light: its names are imported on first use

    attnx.reuse_freed_memory()
    return main()
