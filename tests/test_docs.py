"""The README's generated sections are the ones the code writes today."""
from __future__ import annotations

import re
from pathlib import Path

import attnx

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def generated(name: str) -> str:
    m = re.search(rf"<!-- {name}:start[^>]*-->\n(.*?)\n<!-- {name}:end -->", README, re.S)
    assert m, f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> section"
    return m.group(1)


def test_methods_table_is_written_from_the_declarations():
    assert generated("methods") == attnx.methods.methods_markdown(), "run `attnx methods --markdown` and paste it"


def test_every_method_is_in_the_table():
    table = generated("methods")
    assert all(f"| `{m}` |" in table for m in attnx.list_methods())
