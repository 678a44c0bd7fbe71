"""The data an evaluation reads (attnx/evaluate/datasets.py): a ``data`` path is checked by one
function, for the library and for ``attnx evaluate`` alike, as one-line AttnxValueErrors."""
from __future__ import annotations

import pytest

from attnx.errors import AttnxValueError
from attnx.evaluate.datasets import check_data, read_texts


def test_check_data_names_what_is_expected(tmp_path):
    table = tmp_path / "reviews.csv"
    table.write_text("text,label\na fine film,1\n")
    check_data("text", table)
    check_data("vision", tmp_path)
    with pytest.raises(AttnxValueError, match=r"^no such folder: /no/such/folder$"):
        check_data("vision", "/no/such/folder")
    with pytest.raises(AttnxValueError, match=r"^no such file: /no/such\.csv$"):
        check_data("vision", "/no/such.csv")
    with pytest.raises(AttnxValueError, match="one sub-folder of images per class"):
        check_data("vision", table)
    with pytest.raises(AttnxValueError, match="CSV or TSV file with a text column"):
        check_data("text", tmp_path)


def test_read_texts_checks_its_file_by_check_data(tmp_path):
    with pytest.raises(AttnxValueError, match=r"^no such file: .*missing\.tsv$"):
        read_texts(str(tmp_path / "missing.tsv"), None)
    table = tmp_path / "reviews.tsv"
    table.write_text("text\tlabel\na fine film\t1\ndull\t0\n")
    texts, labels, _ = read_texts(str(table), None)
    assert texts == ["a fine film", "dull"] and labels == [1, 0]
