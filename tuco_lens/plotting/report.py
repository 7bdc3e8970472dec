"""Standalone offline HTML reports from figures and HTML fragments."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.plotting.tokens import TokenHTML

__all__ = ["save_report"]

_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:2em auto;"
    "padding:0 1em;color:#222}section{margin:2em 0}h1{font-size:1.6em}"
)


def save_report(
    figures: Sequence[go.Figure | TokenHTML | str],
    path: str | Path,
    title: str = "tuco_lens report",
) -> Path:
    """Write figures and HTML fragments to one self-contained HTML file that works offline.

    plotly.js is embedded inline exactly once (before the first figure, about 4.8 MB); no
    ``<script src=...>`` points to a CDN. Items appear in order, one ``<section>`` each.

    Args:
        figures: ``plotly.graph_objects.Figure`` objects, :class:`TokenHTML` fragments (from
            :func:`token_html`), or ``str`` holding trusted HTML (inserted as is, e.g.
            ``"<p>notes</p>"`` or ``dec.summary().to_html()``).
        path: Output file (``.html``); parent directories must exist.
        title: Page title and heading (escaped).

    Returns:
        The path written.

    Raises:
        InputError: If ``figures`` is empty.
        InputTypeError: If an item is neither a figure, a ``TokenHTML`` nor a string.

    Example:
        >>> save_report([plot_layers(dec), plot_token_heatmap(dec), token_html(dec),
        ...              dec.summary().to_html()], "report.html", title="Llama 2 chat vs base")
    """
    if isinstance(figures, (go.Figure, TokenHTML, str)):
        figures = [figures]
    if len(figures) == 0:
        raise InputError("save_report needs at least one figure or HTML fragment.")
    parts = []
    plotlyjs_included = False
    for k, item in enumerate(figures):
        if isinstance(item, go.Figure):
            height = item.layout.height
            fragment = item.to_html(
                full_html=False,
                include_plotlyjs=not plotlyjs_included,  # True = the full plotly.js source inline
                include_mathjax=False,
                default_width="100%",
                default_height=f"{height}px" if height else "500px",
                config={"responsive": True, "displaylogo": False},
            )
            plotlyjs_included = True
        elif isinstance(item, TokenHTML):
            fragment = item.html
        elif isinstance(item, str):
            fragment = item
        else:
            raise InputTypeError(
                f"figures[{k}] is a {type(item).__name__}; expected a plotly Figure, a TokenHTML or an HTML str."
            )
        parts.append(f"<section>{fragment}</section>")
    heading = html.escape(title)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{heading}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{heading}</h1>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
