"""Inline-SVG charts shared by the report pages.

Every report page must open offline from the file system, alone, so charts are
matplotlib figures serialised to SVG markup and written into the HTML; each sits
in a `<figure class="chart">` with its title and the question it answers, which
the browser test and the screenshots rely on.
"""

from __future__ import annotations

import html
import io

from matplotlib.figure import Figure


def svg(fig: Figure) -> str:
    """The figure as inline SVG markup (no file, no network)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def figure_html(title: str, question: str, body: str, points: int | None = None) -> str:
    """One chart with its title and one-line question; `points` (data points drawn) lets tests see it is not empty."""
    count = "" if points is None else f' data-points="{int(points)}"'
    return (f'<figure class="chart" data-chart="{html.escape(title)}"{count}><h2>{html.escape(title)}</h2>'
            f"<p class=q>{html.escape(question)}</p>{body}</figure>")
