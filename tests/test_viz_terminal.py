"""Text shown in a terminal is escaped (attnx.viz.terminal): class names, token strings and file names
from a model or the user's disk never act on the terminal."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

from attnx.viz.terminal import escape
from cli_runner import run

HOSTILE = "coat\x1b]0;owned\x07\x1b[2J\u202egnp.exe\r\n"


def test_escape_writes_acting_characters_visibly():
    assert escape(HOSTILE) == "coat\\x1b]0;owned\\x07\\x1b[2J\\u202egnp.exe\\x0d\\x0a"
    assert escape("line\nnext", keep_newlines=True) == "line\nnext"
    assert escape("\x9b31m") == "\\x9b31m"  # the one-byte C1 control sequence introducer
    assert escape("\U000e0041") == "\\U000e0041"  # a tag character (format, invisible)
    plain = "Ärmel-Shirt 猫 ▁token Ġword"  # printable text, word-piece markers included, is kept
    assert escape(plain) is plain
    assert escape(escape(HOSTILE)) == escape(HOSTILE)  # escaping twice changes nothing more


def _hostile_text_classifier(folder: Path) -> Path:
    """A tiny BERT sentiment folder (config, weights, word-piece vocabulary) whose class names carry
    terminal escape sequences."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "fine", "film", "dull"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2,
                     id2label={0: HOSTILE, 1: "pos\x1b[31m"}, label2id={HOSTILE: 0, "pos\x1b[31m": 1})
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).eval().save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("target", ["0", "1"])
def test_class_names_printed_by_explain_are_escaped(capsys, tmp_path, target):
    folder = _hostile_text_classifier(tmp_path / "bert")
    status, stdout, err = run(capsys, "explain", "--text", "a fine film", "--model", str(folder), "--method", "rollout",
                              "--target", target, "--no-color", "--out", str(tmp_path / "t.html"))
    assert status == 0, err
    assert "\x1b" not in stdout and "\u202e" not in stdout and "\r" not in stdout and "\x07" not in stdout
    assert (escape(HOSTILE) if target == "0" else "pos\\x1b[31m") in stdout


def test_class_names_in_error_lines_are_escaped(capsys, tmp_path):
    folder = _hostile_text_classifier(tmp_path / "bert")
    status, _, err = run(capsys, "explain", "--text", "a fine film", "--model", str(folder), "--target", "coat owned")
    line = err.strip().splitlines()[-1]  # (transformers' weight-loading progress bar comes before it)
    assert status == 2 and line.startswith("attnx: error: ") and "\x1b" not in err and "\u202e" not in err
    assert "matches no class name" in line and "\\x1b]0;owned" in line


def test_file_names_in_error_lines_are_escaped(capsys, tmp_path):
    name = tmp_path / "photo\x1b[2J\u202egnp.png"
    status, _, err = run(capsys, "explain", str(name), "--out", str(tmp_path / "x.png"))
    line = err.strip()
    assert status == 2 and "\x1b" not in line and "\u202e" not in line
    assert line.endswith("photo\\x1b[2J\\u202egnp.png")
