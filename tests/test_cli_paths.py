"""Where the ``attnx`` command reads and writes (attnx.cli.paths): an input that is not an image, an
``--out`` that names an existing file or lies under one are one line with exit 2, found before any
work; a stdout that goes away (``| head -1``) keeps the page written, without a traceback.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import attnx
from cli_runner import run


def test_not_an_image_file(capsys, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    status, _, err = run(capsys, "explain", str(fake), "--out", str(tmp_path / "x.png"))
    assert status == 2
    assert err.strip().startswith(f"attnx: error: {fake} is not an image file PIL can read (expected PNG, JPEG, ...)")
    assert "Traceback" not in err and "\n" not in err.strip()

@pytest.mark.parametrize("target", ["file", "/dev/null"])
def test_out_naming_an_existing_file(capsys, tmp_path, target):
    out = tmp_path / "notes" if target == "file" else Path("/dev/null")
    if target == "file":
        out.write_text("keep me")
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--method", "rollout", "--out", str(out), "--quiet")
    assert status == 2
    assert err.strip() == (f"attnx: error: --out {out} is an existing file, not a folder; give a folder or a file name "
                           "ending in .png or .html")
    if target == "file":
        assert out.read_text() == "keep me"
    status, _, err = run(capsys, "explain", "--text", "fine", "--out", str(out))
    assert status == 2 and "is an existing file, not a folder" in err

def test_out_under_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    status, _, err = run(capsys, "explain", "--num-scenes", "1", "--out", str(tmp_path / "f" / "x.png"), "--quiet")
    assert status == 2 and f"{tmp_path / 'f'} is a file, expected a folder there" in err

class ClosedPipe:
    """A stdout whose reader went away; it records whether the page was complete at the first write."""

    def __init__(self, page: Path) -> None:
        self.page, self.complete_at_first_write, self.writes = page, None, 0

    def write(self, text: str) -> int:
        if self.complete_at_first_write is None:
            self.complete_at_first_write = self.page.is_file() and self.page.read_text().rstrip().endswith("</html>")
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self) -> bool:
        return False

def test_closed_stdout_keeps_the_page(monkeypatch, tmp_path):
    page = tmp_path / "r.html"
    pipe = ClosedPipe(page)
    monkeypatch.setattr(sys, "stdout", pipe)
    status = attnx.cli.main(["explain", "--text", "a fine film", "--text", "dull", "--model", "default-lm",
                             "--method", "rollout,generic", "--out", str(page), "--quiet"])
    monkeypatch.undo()
    assert status == 0
    assert pipe.complete_at_first_write is True and pipe.writes >= 1
    assert page.read_text().count('class="explained"') == 4  # two methods x two prompts

@pytest.mark.subprocess
def test_explain_piped_into_head(tmp_path):
    """``attnx explain ... --out r.html | head -1``: the page is complete, no traceback."""
    exe = Path(sys.executable).with_name("attnx")
    exe = str(exe) if exe.is_file() else shutil.which("attnx")
    if exe is None:
        pytest.skip("the attnx console script is not installed (pip install -e .)")
    page = tmp_path / "r.html"
    texts = " ".join(f"--text 'prompt number {i} is'" for i in range(6))
    proc = subprocess.run(f"'{exe}' explain {texts} --model default-lm --method all --out '{page}' --quiet | head -1",
                          shell=True, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg"))
    assert proc.returncode == 0 and proc.stdout.strip() == "[raw_attention]"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert page.read_text().rstrip().endswith("</html>")
    assert page.read_text().count('class="explained"') == 6 * len(attnx.list_methods())
