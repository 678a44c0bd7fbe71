"""Every code block of README.md and docs/*.md runs as written (tests/docs_blocks.py says how).

One test per page runs its blocks in order in a fresh process; a block marked
``<!-- skip: REASON -->`` is reported as a skipped test of its own, named by page, line and reason.
Pages marked ``<!-- docs-test: slow -->`` (the demo, the evaluations) run in the slow tier.
"""
from __future__ import annotations

import pytest

from docs_blocks import ROOT, SKIP_REASONS, blocks, is_slow, pages, problems, run_in_subprocess

PAGES = pages()
#: seconds per page (a page runs several processes: on a loaded two-core machine that takes minutes)
FAST_TIMEOUT, SLOW_TIMEOUT = 840, 1500


def page_param(path):
    """Every page runs in the slow tier (one fresh process per page, several seconds each); pages
    marked slow (demos, evaluations, real models) get the longer timeout."""
    name = path.relative_to(ROOT).as_posix()
    timeout = SLOW_TIMEOUT if is_slow(path) else FAST_TIMEOUT
    return pytest.param(path, id=name, marks=[pytest.mark.slow, pytest.mark.timeout(timeout + 60)])


def skipped_blocks():
    return [pytest.param(b, id=f"{b.page}:{b.line} [{b.skip}]") for p in PAGES for b in blocks(p) if b.skip]


def test_the_pages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/usage.md"} <= names, sorted(names)


@pytest.mark.parametrize("path", [page_param(p) for p in PAGES])
def test_the_blocks_of_the_page_run_as_written(path):
    found = blocks(path)
    wrong = [msg for b in found for msg in problems(b)]
    assert not wrong, "\n".join(wrong)
    if not any(b.kind for b in found):
        return
    proc = run_in_subprocess(path, timeout=SLOW_TIMEOUT if is_slow(path) else FAST_TIMEOUT)
    assert proc.returncode == 0, f"{path.name}: a block failed\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ran = [f"--- {b.page}:{b.line} ({b.lang})" for b in found if b.kind]
    assert proc.stdout.count("--- ") >= len(ran) and all(r in proc.stdout for r in ran), proc.stdout[-3000:]


@pytest.mark.parametrize("block", skipped_blocks())
def test_a_skipped_block_says_why(block):
    assert block.skip.startswith(SKIP_REASONS), block.skip
    pytest.skip(f"{block.page}:{block.line}: {block.skip}")


def test_the_block_reader_follows_the_conventions(tmp_path):
    """The reader on a page written for it: languages, skips, console prompts, indented fences."""
    page = tmp_path / "page.md"
    text = ("# t\n\n```python\nx = 1\n```\n\n<!-- skip: needs a GPU -->\n```python\nx.cuda()\n```\n\n"
            "```console\n$ echo hi\nhi\n```\n\n- item\n\n  ```bash\n  echo a\n  ```\n\n```text\nout\n```\n\n```\nbare\n```\n")
    page.write_text(text)
    found = blocks(page)
    assert [b.lang for b in found] == ["python", "python", "console", "bash", "text", ""]
    assert found[1].skip == "needs a GPU" and found[1].kind is None and found[0].kind == "python"
    assert found[2].commands() == "echo hi\n" and found[3].commands() == "echo a\n"
    assert found[4].kind is None and problems(found[5]) and not problems(found[4])
