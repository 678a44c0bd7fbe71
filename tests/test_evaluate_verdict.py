"""The verdict: winners, leads and their standard errors read from league CSVs, checked against
hand-computed values; the README block replaced in a sample text (never in README.md itself)."""
from __future__ import annotations

import math

import pytest

from attnx.errors import AttnxValueError
from attnx.evaluate import verdict

# text columns: del. most (lower is better), del. least (higher), rand. ρ (best at 0), ms/text (timing, left out)
HEADER = "method,del_most_auc,del_most_auc_se,del_least_auc,del_least_auc_se,rand_spearman,rand_spearman_se,ms_per_text,ms_per_text_se\n"


def write(tmp_path, rows: str, task: str = "text"):
    (tmp_path / f"league_{task}.csv").write_text(HEADER + rows)
    return verdict.read_table(tmp_path / f"league_{task}.csv")


def test_winner_lead_and_reference(tmp_path):
    table = write(tmp_path, "\n".join([
        "transformer_attribution,0.50,0.01,0.80,0.01,0.30,0.02,100,1",
        "lrp,0.40,0.01,0.81,0.01,-0.05,0.02,40,1",
        "generic,0.45,0.03,0.70,0.01,0.10,0.02,20,1",
        "random,0.10,0.01,0.99,0.01,1.0,0.0,1,0",  # a reference: never the winner
        "transformer_attribution@random_weights,0.05,0.01,0.99,0.01,nan,nan,100,1",
    ]) + "\n")
    specs = verdict.column_specs("text")
    most = verdict.judge_column(specs["del_most_auc"], table)
    assert most.winner == "lrp" and most.runner_up == "generic"
    d, se = most.lead
    assert d == pytest.approx(0.05) and se == pytest.approx(math.sqrt(0.01 ** 2 + 0.03 ** 2))
    assert d < 2 * se and most.top == ("lrp", "generic")  # 0.05 < 2 * 0.0316: not separable
    assert "lrp beats transformer_attribution by 0.100 ± 0.014" == most.versus_reference
    least = verdict.judge_column(specs["del_least_auc"], table)
    assert least.winner == "lrp" and least.versus_reference.startswith("no method beats transformer_attribution by 2 SE")
    rho = verdict.judge_column(specs["rand_spearman"], table)
    assert rho.winner == "lrp"  # |-0.05| is nearest 0

    lines, rec = verdict.task_verdict("text", table)
    assert not any(line.startswith("| ms/text") for line in lines)  # timing: left out
    # top groups: del. most {lrp, generic}; del. least {lrp, transformer_attribution}; rand. ρ {lrp}
    assert rec.startswith("**lrp**: in the top group (best, or within 2 SE of the best) on 3 of 3 columns; "
                          "transformer_attribution: 1 of 3.")


def test_reference_wins_and_missing_standard_errors(tmp_path):
    (tmp_path / "league_text.csv").write_text("method,del_most_auc\ntransformer_attribution,0.3\nlrp,0.4\n")
    table = verdict.read_table(tmp_path / "league_text.csv")
    v = verdict.judge_column(verdict.column_specs("text")["del_most_auc"], table)
    assert v.winner == "transformer_attribution" and v.versus_reference == "no method beats transformer_attribution"
    assert "no standard error" in verdict._lead_text(v) and v.top == ("transformer_attribution",)
    _, rec = verdict.task_verdict("text", table)
    assert rec.startswith("**transformer_attribution**: best on 1 of 1 columns; transformer_attribution: 1 of 1 (this table "
                          "has no standard errors yet")


def test_markdown_and_files(tmp_path):
    write(tmp_path, "transformer_attribution,0.5,0.01,0.8,0.01,0.3,0.02,1,0\nlrp,0.4,0.01,0.9,0.01,0.0,0.02,1,0\n")
    md = verdict.verdict_markdown(tmp_path)
    assert "BERT-family text classifiers (`text`): **lrp**" in md and "| del. most ↓ | lrp | 0.400 ± 0.010 |" in md
    sample = "# title\n\ntext\n<!-- verdict:start -->\nold\nlines\n<!-- verdict:end -->\nafter\n"
    readme = tmp_path / "README.md"
    readme.write_text(sample)
    path = verdict.write_verdict(tmp_path, readme)
    assert path.read_text().endswith(md)
    assert readme.read_text() == "# title\n\ntext\n<!-- verdict:start -->\n" + md + "<!-- verdict:end -->\nafter\n"
    assert verdict.block_of(readme.read_text()) == md
    with pytest.raises(AttnxValueError, match="no league table"):
        verdict.verdict_markdown(tmp_path / "empty")


def test_replace_block():
    text = "a\n<!-- verdict:start -->\nold\n<!-- verdict:end -->\nb"
    assert verdict.replace_block(text, "new\nblock\n") == "a\n<!-- verdict:start -->\nnew\nblock\n<!-- verdict:end -->\nb"
    assert verdict.replace_block(verdict.replace_block(text, "x\n"), "x\n") == verdict.replace_block(text, "x\n")
    for bad in ("no markers", "<!-- verdict:end -->\n<!-- verdict:start -->",
                "<!-- verdict:start -->\n<!-- verdict:start -->\n<!-- verdict:end -->"):
        with pytest.raises(AttnxValueError, match="verdict:start"):
            verdict.replace_block(bad, "x")


@pytest.mark.parametrize("task", ["text", "clip", "llm"])
def test_the_completeness_error_is_not_judged(tmp_path, task):
    """It checks a method's own claim of conservation: a method with a small error does not win a column."""
    key = "del_most_auc" if task == "text" else "deletion_auc" if task == "clip" else "auc_most"
    (tmp_path / f"league_{task}.csv").write_text(
        f"method,{key},{key}_se,completeness,completeness_se\n"
        f"transformer_attribution,0.50,0.01,nan,nan\nlrp,0.60,0.01,0.001,0.0001\n")
    assert "completeness" in verdict.column_specs(task)
    lines, rec = verdict.task_verdict(task, verdict.read_table(tmp_path / f"league_{task}.csv"))
    assert len(lines) == 3 and "complete. err." not in "\n".join(lines)  # one judged column
    assert rec.startswith("**transformer_attribution**: in the top group") and "on 1 of 1 columns" in rec
