"""The league of an evaluation as an interactive page: the table with sortable columns (best values
in bold, each column's definition on its header) and the mean curves drawn from the numbers."""
from __future__ import annotations

from typing import Any, Mapping

from .page import fragment

__all__ = ["league_html"]


def league_html(league: Any) -> str:
    """The league as an HTML fragment (for a page, :func:`attnx.report.report_page`, or a notebook).

    Parameters
    ----------
    league:
        An :class:`attnx.evaluate.League`, or the plain data of its ``report_data()``.
    """
    data: Mapping[str, Any] = league.report_data() if hasattr(league, "report_data") else league
    return fragment("league", dict(data, kind="league"), "league.js")
