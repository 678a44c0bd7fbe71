"""The ``attnx`` command's parser (attnx/cli/parser.py): each subcommand built by its own module,
argparse's complaints on the one error path, ``--out`` of ``evaluate`` checked before anything is
read, every line printed through ``say``, a start that loads no torch, ``python -m attnx.cli``."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import run

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
HEAVY = ("matplotlib", "timm", "torch", "transformers")


def one_error_line(status: int, err: str) -> str:
    assert status == 2, err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err and line.startswith("attnx: error: "), err
    return line


def test_each_subcommand_is_built_and_run_by_its_module():
    from attnx.cli import catalogue, evaluate, explain, parser

    p = parser.build_parser(evaluate_help=False)
    sub = next(a for a in p._actions if a.dest == "command")
    owners = {"explain": explain.cmd_explain, "methods": catalogue.cmd_methods, "models": catalogue.cmd_models,
              "evaluate": evaluate.cmd_evaluate, "demo": parser.cmd_demo}
    assert set(sub.choices) == set(owners)
    for name, func in owners.items():
        assert sub.choices[name].get_default("func") is func, name
        assert sub.choices[name].prog == f"attnx {name}"


def test_modules_of_the_command_stay_small():
    for path in sorted((ROOT / "attnx" / "cli").glob("*.py")):
        assert len(path.read_text().splitlines()) <= 400, path.name


def test_help_of_each_subcommand_but_evaluate_imports_no_torch():
    """``python -m attnx.cli`` runs the command; ``--help`` of the command and of explain, methods,
    models and demo loads none of the heavy libraries (evaluate's help lists its columns, from torch)."""
    code = ("import sys\nfrom attnx.cli import main\n"
            "for argv in (['--help'], ['explain', '--help'], ['methods', '--help'], ['models', '--help'], "
            "['demo', '--help'], []):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]"
    proc = subprocess.run([sys.executable, "-m", "attnx.cli", "--help"], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: attnx"), proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["explain", "--nosuch"], "unrecognized arguments: --nosuch (see `attnx --help`)"),
    (["evaluate", "--limit", "0"], "argument --limit: expected a positive integer, got '0' (see `attnx evaluate --help`)"),
    (["evaluate", "--task", "audio"], "argument --task: invalid choice: 'audio'"),
    (["nosuch"], "argument COMMAND: invalid choice: 'nosuch'"),
])
def test_argparse_complaints_are_one_line_exit_2(capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert message in one_error_line(status, err) and "usage:" not in err + out


def test_argparse_complaints_are_escaped(capsys):
    status, _, err = run(capsys, "explain", "--x\x1b[2J")
    line = one_error_line(status, err)
    assert "--x\\x1b[2J" in line and "\x1b" not in err


def test_evaluate_out_is_checked_before_the_shards_are_read(capsys, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "samples_vision.shard-0-of-2.npz").write_bytes(b"not read")  # unreadable: a traceback if read
    status, _, err = run(capsys, "evaluate", "--merge", str(parts), "--out", "/proc/attnx_merged")
    assert "--out /proc/attnx_merged: cannot write in /proc" in one_error_line(status, err)


@pytest.mark.parametrize("package", ["cli", "demo"])
def test_the_command_prints_only_through_say(package):
    """Every line of ``attnx`` (the demo's included) goes through attnx.viz.terminal.say, escaped."""
    for path in sorted((ROOT / "attnx" / package).glob("*.py")):
        tree = ast.parse(path.read_text())
        printed = [n.lineno for n in ast.walk(tree)
                   if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not printed, (path.name, printed)
