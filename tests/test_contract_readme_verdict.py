"""README.md's verdict block is what ``attnx evaluate`` generates from docs/league/*.csv."""
from __future__ import annotations

from pathlib import Path

import pytest

from attnx.evaluate import verdict

ROOT = Path(__file__).resolve().parents[1]


def test_readme_verdict_is_generated_from_the_league_tables():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = verdict.block_of(readme)
    if block is None:
        pytest.skip(f"README.md has no {verdict.START} ... {verdict.END} block yet; this check runs once it has one")
    assert block == verdict.verdict_markdown(ROOT / "docs" / "league"), (
        "README.md's verdict is out of date: regenerate it with "
        "python -c 'from attnx.evaluate import verdict; verdict.write_verdict(\"docs/league\", \"README.md\")'"
    )


def test_verdict_page_is_generated_from_the_league_tables():
    page = (ROOT / "docs" / "league" / "verdict.md").read_text(encoding="utf-8")
    assert page.endswith(verdict.verdict_markdown(ROOT / "docs" / "league"))
