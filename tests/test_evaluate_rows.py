"""League rows: ``method(option=value, ...)`` parsed by the option's declaration (a bool option as
``true`` / ``false``), comma lists that keep the commas of options, one-line refusals."""
from __future__ import annotations

import pytest

from attnx import Needs, Option, register_method
from attnx.errors import AttnxError
from attnx.evaluate.rows import parse_row, split_rows
from attnx.methods.registry import unregister_method


def test_split_rows_keeps_the_commas_of_options():
    assert split_rows("lrp, integrated_gradients(n_steps=8, baseline=pad),rollout,") == [
        "lrp", "integrated_gradients(n_steps=8, baseline=pad)", "rollout"]


def test_a_row_with_a_bool_option():
    @register_method("_test_flagged", needs=Needs(attentions=True),
                     options=[Option("libragrad", False, "a bool option", kind=bool), Option("k", 2, "", kind=int)])
    def flagged(trace, readout, *, libragrad: bool = False, k: int = 2):
        return readout.row(trace.attentions[-1].mean(1))

    try:
        assert parse_row("_test_flagged(libragrad=true)") == ("_test_flagged", {"libragrad": True})
        assert parse_row(" _test_flagged( libragrad = False , k=3 ) ") == ("_test_flagged", {"libragrad": False, "k": 3})
        assert parse_row("_test_flagged") == ("_test_flagged", {})
        for bad, message in (("_test_flagged(libragrad=maybe)", "true or false"), ("_test_flagged(nope=1)", "unknown option"),
                             ("_test_flagged(libragrad)", "option=value"), ("_test_flagged(k=1", "method\\(option=value"),
                             ("no_such_method(k=1)", "unknown method")):
            with pytest.raises(AttnxError, match=message):
                parse_row(bad)
    finally:
        unregister_method("_test_flagged")
