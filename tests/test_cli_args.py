"""The values of the ``attnx`` command's arguments (attnx.cli.args): counts out of range are one line
with exit 2, and nothing is written.
"""
from __future__ import annotations

import pytest

from cli_runner import run


@pytest.mark.parametrize("n", ["0", "-1", "97", "1000"])
def test_num_scenes_out_of_range(capsys, tmp_path, n):
    out = tmp_path / "x.png"
    status, _, err = run(capsys, "explain", "--num-scenes", n, "--out", str(out), "--quiet")
    assert status == 2
    assert err.strip() == f"attnx: error: --num-scenes must be between 1 and 96 (the shipped held-out scenes), got {n}"
    assert not out.exists()
