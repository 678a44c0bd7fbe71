"""The code blocks of README.md and docs/*.md: found, and run as a reader would run them.

A page's blocks run in their order, in one process per page:

* ```` ```python ```` blocks in one namespace (``exec``), as one Python session;
* ```` ```bash ````, ```` ```sh ```` and ```` ```console ```` blocks in ``bash -e``: every line of a
  bash/sh block is a command; in a console block the lines starting with ``$ `` are the commands
  and the others are their output;
* output and data blocks (```` ```text ````, ```` ```json ````, ...) are not run.

Every fence names its language. A block preceded, on the line right before its fence, by
``<!-- skip: REASON -->`` is not run; REASON starts with one of :data:`SKIP_REASONS`. A page that
contains ``<!-- docs-test: slow -->`` belongs to the slow tier.

The process runs in a scratch folder that holds a link to every top-level entry of the
repository, so a block reads ``docs/...`` or ``benchmarks/...`` as from the repository root while
the files it writes stay out of the repository; offline (``HF_HUB_OFFLINE=1``) and with
``MPLBACKEND=Agg``. ``python tests/docs_blocks.py PAGE`` runs one page.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the reasons a block may be left out for, each the start of a ``<!-- skip: ... -->`` comment
SKIP_REASONS = ("needs a network", "needs a GPU", "installs packages", "takes minutes")
#: languages that are run
RUN = {"python": "python", "bash": "shell", "sh": "shell", "console": "console"}
#: languages that are shown, never run (program output, data, other languages' snippets)
SHOWN = {"text", "json", "yaml", "toml", "ini", "csv", "html", "diff", "markdown"}
SLOW_MARK = "<!-- docs-test: slow -->"

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<lang>[^`\s]*)\s*$")
SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: its language, its text, the line of its opening fence and,
    when it is marked so, why it is not run."""

    page: str
    line: int
    lang: str
    code: str
    skip: str | None = None

    @property
    def kind(self) -> str | None:
        """``"python"``, ``"shell"``, ``"console"`` or ``None`` (not run)."""
        return None if self.skip else RUN.get(self.lang)

    def commands(self) -> str:
        """The shell text of a bash/sh/console block: ``$ `` prompts removed, console output dropped."""
        lines = []
        for line in self.code.splitlines():
            if line.startswith("$ "):
                lines.append(line[2:])
            elif self.kind == "shell":
                lines.append(line)
        return "\n".join(lines) + "\n"


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/, in a fixed order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one page, in order (a fence without a closing fence is an error)."""
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, lang = m["indent"], m["ticks"], m["lang"]
        skip = SKIP.match(lines[i - 1]) if i > 0 else None
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{ticks}`*\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{name}:{i + 1}: a ``` fence that is never closed")
        found.append(Block(name, i + 1, lang, "\n".join(body) + "\n", skip["reason"] if skip else None))
        i = j + 1
    return found


def is_slow(path: Path) -> bool:
    return SLOW_MARK in path.read_text(encoding="utf-8")


def problems(block: Block) -> list[str]:
    """What is wrong with how a block is written down (not whether it runs)."""
    where = f"{block.page}:{block.line}"
    if not block.lang:
        return [f"{where}: the fence names no language (```text for output, ```python / ```bash for code)"]
    if block.lang not in RUN and block.lang not in SHOWN:
        return [f"{where}: unknown block language {block.lang!r} (run: {sorted(RUN)}; shown: {sorted(SHOWN)})"]
    if block.skip is not None and not block.skip.startswith(SKIP_REASONS):
        return [f"{where}: skip reason {block.skip!r} is none of {SKIP_REASONS}"]
    return []


def scratch_folder(parent: Path) -> Path:
    """A folder that shows the repository's top-level entries (as links) and takes new files."""
    work = parent / "work"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".venv"}:
            (work / entry.name).symlink_to(entry)
    return work


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_page(path: Path) -> None:
    """Run the page's blocks in order in this process's scratch folder; raise at the first failure."""
    namespace: dict = {"__name__": "__main__"}
    for block in blocks(path):
        if block.kind is None:
            continue
        print(f"--- {block.page}:{block.line} ({block.lang})", flush=True)
        if block.kind == "python":
            exec(compile(block.code, f"{block.page}:{block.line}", "exec"), namespace)
            import matplotlib.pyplot as plt

            plt.close("all")
        else:
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.commands()], env=environment())
            if proc.returncode:
                raise SystemExit(f"{block.page}:{block.line}: the shell block exited with status {proc.returncode}")


def run_in_subprocess(path: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run one page in a fresh Python process, in a scratch folder (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="attnx-docs-") as tmp:
        work = scratch_folder(Path(tmp))
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), str(path)], cwd=work,
                              env=environment(), capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":
    run_page(Path(sys.argv[1]).resolve())
