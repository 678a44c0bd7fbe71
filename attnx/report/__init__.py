"""Interactive, self-contained HTML views of explanations and of evaluation leagues.

Every page works opened from disk, offline: styles and scripts are inline, the numbers are embedded
as JSON and the maps are drawn from them in the browser.

* :func:`explanation_html` / :func:`write_report`: images or texts, every method x target, two methods
  side by side, opacity and colour map controls, the value under the pointer
  (``Explanation._repr_html_`` shows the same view in a notebook).
* :func:`league_html`: a league table with sortable columns and its mean curves.
* :func:`answer_html` / :func:`write_answer_page`: a language model's answer, each answer token's
  relevance over the context before it (:func:`attnx.explain_generation`).
"""
from __future__ import annotations

from .answer import answer_html, write_answer_page
from .explanations import explanation_html, report_page, target_name, write_report
from .league import league_html

__all__ = ["answer_html", "explanation_html", "league_html", "report_page", "target_name", "write_answer_page", "write_report"]
