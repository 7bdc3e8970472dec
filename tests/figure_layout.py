"""Layout properties every tuco_lens figure must have to fit a 650 px notebook cell.

Shared by ``test_plotting.py`` (every figure function of ``tuco_lens.plotting``) and
``test_demo_report.py`` (every figure of the demo report, the analyses' included). The real
rendered plot area is measured in headless Chromium by ``docs/check_site.py`` (CI's docs step);
these are the layout facts that decide it, checked on the figure object.
"""

from __future__ import annotations

import html
import re

import plotly.graph_objects as go

WIDTH = 650            # a Jupyter output cell / a documentation page
MIN_PLOT_SHARE = 0.6   # of the width, for the plot area
COLORBAR_PX = 80       # a vertical colour bar with its tick labels and title
MAX_TITLE_CHARS = 70   # one title line at plotly's 17 px title font
MAX_SUBTITLE_CHARS = 100  # one <sup> line
MAX_LABEL_CHARS = 40   # a legend entry
MAX_SUBPLOT_TITLE_CHARS = 60


def lines(text: str) -> list[tuple[str, bool]]:
    """The visible lines of a plotly text, each with whether it is a <sup> subtitle."""
    out = []
    for line in re.split(r"<br\s*/?>", text or ""):
        visible = html.unescape(re.sub(r"<[^>]+>", "", line)).strip()
        out.append((visible, "<sup>" in line))
    return out


def legend_entries(fig: go.Figure) -> list[str]:
    shown = [t for t in fig.data if t.showlegend is not False and t.name]
    return [html.unescape(re.sub(r"<[^>]+>", "", t.name)) for t in shown]


def layout_problems(fig: go.Figure, special_tokens: tuple[str, ...] = ()) -> list[str]:
    """Every way ``fig`` would not fit a 650 px cell (empty list: it fits)."""
    problems = []
    layout = fig.layout
    margin_l = layout.margin.l if layout.margin.l is not None else 80  # plotly's defaults
    margin_r = layout.margin.r if layout.margin.r is not None else 80
    colorbars = sum(
        1 for t in fig.data
        if getattr(t, "showscale", None) is not False and isinstance(t, (go.Heatmap, go.Contour))
    )
    plot = WIDTH - margin_l - margin_r - COLORBAR_PX * colorbars
    if plot / WIDTH < MIN_PLOT_SHARE:
        problems.append(f"plot area {plot}/{WIDTH} px < {MIN_PLOT_SHARE:.0%} (margins {margin_l}+{margin_r}, {colorbars} colour bars)")
    entries = legend_entries(fig)
    if len(entries) > 1 and layout.showlegend is not False:
        if layout.legend.orientation != "h" or layout.legend.y is None or layout.legend.y >= 0:
            problems.append(f"legend beside the plot (orientation {layout.legend.orientation!r}, y {layout.legend.y}): put it under")
    for entry in entries:
        if len(entry) > MAX_LABEL_CHARS:
            problems.append(f"legend label of {len(entry)} chars: {entry!r}")
        for token in special_tokens:
            if token in entry:
                problems.append(f"legend label shows the special token {token!r}: {entry!r}")
    title = layout.title.text
    if not title:
        problems.append("no title")
    for line, is_sub in lines(title):
        limit = MAX_SUBTITLE_CHARS if is_sub else MAX_TITLE_CHARS
        if len(line) > limit:
            problems.append(f"title line of {len(line)} chars (> {limit}): {line!r}")
        if re.search(r"\bn = \d+ ?/ ?\d+", line):
            problems.append(f"subtitle counts do not say what they count: {line!r}")
        for token in special_tokens:
            if token in line:
                problems.append(f"title shows the special token {token!r}: {line!r}")
    for annotation in layout.annotations:
        for line, _ in lines(annotation.text):
            if len(line) > MAX_SUBPLOT_TITLE_CHARS:
                problems.append(f"annotation of {len(line)} chars: {line!r}")
    return problems
