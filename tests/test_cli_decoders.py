"""``attnx explain --text ... --model <causal LM folder>``: the next token, or a --continuation,
explained and marked after the prompt in the terminal and in the HTML page."""
from __future__ import annotations

import pytest

from cli_runner import run
from decoder_models import LM, word_tokenizer


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    case = next(c for c in LM if c.family == "llama" and c.impl == "sdpa")
    model = case.model()
    model.config.architectures = [case.class_name]
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return str(folder)


def test_next_token(capsys, tmp_path, lm_folder):
    out = tmp_path / "lm.html"
    status, stdout, err = run(capsys, "explain", "--text", "w5 w7 w9 w11", "--text", "w20 w3", "--model", lm_folder,
                              "--method", "generic", "--out", str(out), "--no-color")
    assert status == 0, err
    lines = stdout.splitlines()
    rows = [line for line in lines if line.startswith("next token")]
    assert len(rows) == 2 and all(" -> [[w" in r for r in rows), stdout
    assert "w5[" in rows[0] and "w20[" in rows[1] and "<pad>" not in stdout  # left padding dropped
    page = out.read_text()
    assert page.count('class="explained"') == 2 and "predicted next token" in page


def test_target_and_continuation(capsys, tmp_path, lm_folder):
    status, stdout, err = run(capsys, "explain", "--text", "w5 w7 w9", "--model", lm_folder, "--method", "grad_rollout",
                              "--target", "w42", "--out", str(tmp_path / "a.html"), "--no-color")
    assert status == 0, err
    assert "next token 'w42'" in stdout and "-> [[w42]]" in stdout
    status, stdout, err = run(capsys, "explain", "--text", "w5 w7 w9", "--model", lm_folder, "--method", "grad_rollout",
                              "--continuation", "w42 w43", "--out", str(tmp_path / "b.html"), "--no-color")
    assert status == 0, err
    assert "continuation 'w42 w43' (log p=" in stdout and "-> [[w42 w43]]" in stdout
    assert 'class="explained"' in (tmp_path / "b.html").read_text()
    status, _, err = run(capsys, "explain", "--text", "w5", "--model", lm_folder, "--continuation", "w1",
                         "--target", "w2", "--out", str(tmp_path / "c.html"))
    assert status != 0 and "not both" in err
