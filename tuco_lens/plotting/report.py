"""Standalone offline HTML reports: figures, HTML fragments, and sections that explain them."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import plotly.graph_objects as go

from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.plotting._util import figure_height
from tuco_lens.plotting.tokens import TokenHTML

__all__ = ["ReportSection", "save_report"]

Item = go.Figure | TokenHTML | str

_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;"
    "padding:0 1em;color:#222;line-height:1.5}section{margin:2.5em 0}h1{font-size:1.6em;margin-bottom:.3em}"
    "h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
    "table{border-collapse:collapse;margin:.8em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;"
    "vertical-align:top}th{background:#f4f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    "code{background:#f4f4f8;padding:0 .2em;border-radius:3px}"
    ".intro{font-size:1.05em}.guidance{background:#f6f8fb;border-left:4px solid #5c6bc0;padding:.5em .9em;"
    "margin:.6em 0}.docs{font-size:.9em;color:#555}nav.toc{font-size:.95em}nav.toc ol{margin:.3em 0}"
)


@dataclass(frozen=True)
class ReportSection:
    """One section of a report: a heading, what it shows, the figure, how to read it, the docs.

    Text fields hold trusted HTML (inserted as is: escape untrusted text with
    ``html.escape``); the title is plain text.

    Attributes:
        title: The section heading (plain text; also its anchor in the page).
        intro: One or two sentences before the figure: what was measured, on which prompts.
        figure: A ``plotly.graph_objects.Figure``, a :class:`TokenHTML`, an HTML ``str``, or
            a sequence of them (shown in order); ``None`` for a text-only section.
        guidance: Under the figure: how to read it and what it shows here.
        docs: The documentation page of the section: a page of the docs site as in
            ``docs/`` (``"how-to/plots.md#plot_layers-components-per-layer"``), joined to
            ``save_report``'s ``docs_url``, or an absolute URL.

    Example:
        >>> from tuco_lens.plotting import plot_prompt_sets
        >>> sets = demo.prompt_sets()
        >>> scores = {"chat": pair.tuco(sets["chat"][:5]), "web": pair.tuco(sets["web"][:5])}
        >>> section = ReportSection("TuCo per prompt set", intro="<p>5 chat and 5 web prompts.</p>",
        ...               figure=plot_prompt_sets(scores, positive="chat", negative="web"),
        ...               guidance="<p>Chat prompts score higher: fine-tuning acts on them.</p>",
        ...               docs="how-to/plots.md")
        >>> section.title
        'TuCo per prompt set'
    """

    title: str
    intro: str = ""
    figure: Item | Sequence[Item] | None = None
    guidance: str = ""
    docs: str | None = None

    @property
    def anchor(self) -> str:
        """The section's ``id`` in the page (from its title)."""
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "section"

    def items(self) -> list[Item]:
        """The section's figures and fragments, in order."""
        if self.figure is None:
            return []
        if isinstance(self.figure, (go.Figure, TokenHTML, str)):
            return [self.figure]
        return list(self.figure)

    def docs_href(self, docs_url: str | None) -> str | None:
        """The link to :attr:`docs`: absolute as is, a docs page joined to ``docs_url``."""
        if self.docs is None:
            return None
        if re.match(r"^[a-z][a-z0-9+.-]*:", self.docs):
            return self.docs
        if docs_url is None:
            return None
        page, _, anchor = self.docs.partition("#")
        page = re.sub(r"\.md$", ".html", page)  # the site is built with use_directory_urls: false
        return urljoin(docs_url if docs_url.endswith("/") else docs_url + "/", page) + (f"#{anchor}" if anchor else "")


class _Renderer:
    """Turns items into HTML, embedding plotly.js once (before the first figure)."""

    def __init__(self) -> None:
        self.plotlyjs_included = False

    def item(self, item: object, where: str) -> str:
        if isinstance(item, go.Figure):
            height = figure_height(item)
            fragment = item.to_html(
                full_html=False,
                include_plotlyjs=not self.plotlyjs_included,  # True = the full plotly.js source inline
                include_mathjax=False,
                default_width="100%",
                default_height=f"{height}px" if height else "500px",
                config={"responsive": True, "displaylogo": False},
            )
            self.plotlyjs_included = True
            return fragment
        if isinstance(item, TokenHTML):
            return item.html
        if isinstance(item, str):
            return item
        raise InputTypeError(
            f"{where} is a {type(item).__name__}; expected a plotly Figure, a TokenHTML, an HTML str "
            "or a ReportSection."
        )

    def section(self, section: ReportSection, where: str, docs_url: str | None) -> str:
        parts = [f'<h2 id="{section.anchor}">{html.escape(section.title)}</h2>']
        if section.intro:
            parts.append(f'<div class="intro">{section.intro}</div>')
        parts += [self.item(item, f"{where}.figure[{k}]") for k, item in enumerate(section.items())]
        if section.guidance:
            parts.append(f'<div class="guidance"><strong>How to read it.</strong> {section.guidance}</div>')
        docs, href = section.docs, section.docs_href(docs_url)
        if docs is not None and href is not None:
            parts.append(f'<p class="docs">Documentation: <a href="{html.escape(href)}">{html.escape(docs)}</a></p>')
        elif docs is not None:
            parts.append(f'<p class="docs">Documentation: <code>docs/{html.escape(docs)}</code></p>')
        return f'<section id="section-{section.anchor}">' + "\n".join(parts) + "</section>"


def save_report(
    figures: Sequence[Item | ReportSection] | Item | ReportSection,
    path: str | Path,
    title: str = "tuco_lens report",
    *,
    intro: str | None = None,
    docs_url: str | None = None,
) -> Path:
    """Write figures, HTML fragments and sections to one self-contained HTML file (offline).

    plotly.js is embedded inline exactly once (before the first figure, about 4.8 MB); no
    ``<script src=...>`` points to a CDN. Items appear in order, one ``<section>`` each. With
    at least two :class:`ReportSection` items, a table of contents follows the intro.

    Args:
        figures: ``plotly.graph_objects.Figure`` objects, :class:`TokenHTML` fragments (from
            :func:`token_html`), ``str`` holding trusted HTML (inserted as is, e.g.
            ``"<p>notes</p>"`` or ``dec.summary().to_html()``), or :class:`ReportSection`
            objects that wrap a figure in a heading, an intro, reading guidance and a docs link.
        path: Output file (``.html``); parent directories must exist.
        title: Page title and heading (escaped).
        intro: Trusted HTML under the heading: what the report is about (models, prompts).
        docs_url: Base URL of the documentation site, for sections whose ``docs`` names a
            page of it (``"https://example.org/tuco_lens/"`` or a ``file://`` URL of a local
            build). Without it such pages are named, not linked.

    Returns:
        The path written.

    Raises:
        InputError: If ``figures`` is empty.
        InputTypeError: If an item is neither a figure, a ``TokenHTML``, a string nor a
            ``ReportSection``.

    Example:
        >>> from tuco_lens.plotting import plot_layers, plot_token_heatmap, token_html
        >>> dec = pair.decompose(prompts, chat_template=True)
        >>> save_report([plot_layers(dec), plot_token_heatmap(dec), token_html(dec),
        ...              dec.summary().to_html()], "report.html", title="Demo chat vs base")
        PosixPath('report.html')
        >>> save_report([ReportSection("Per layer", figure=plot_layers(dec),
        ...                            guidance="<p>Dashed lines are FTC.</p>")],
        ...             "report.html", title="My pair", intro="<p>The demo pair.</p>")
        PosixPath('report.html')
    """
    if isinstance(figures, (go.Figure, TokenHTML, str, ReportSection)):
        figures = [figures]
    if len(figures) == 0:
        raise InputError("save_report needs at least one figure, HTML fragment or ReportSection.")
    renderer = _Renderer()
    parts = []
    sections = []
    for k, item in enumerate(figures):
        if isinstance(item, ReportSection):
            sections.append(item)
            parts.append(renderer.section(item, f"figures[{k}]", docs_url))
        else:
            parts.append(f"<section>{renderer.item(item, f'figures[{k}]')}</section>")
    anchors = [s.anchor for s in sections]
    if len(set(anchors)) != len(anchors):
        raise InputError(f"Two report sections have the same title (anchors {anchors}); give each its own title.")
    heading = html.escape(title)
    head = [f"<h1>{heading}</h1>"]
    if intro:
        head.append(f'<div class="intro">{intro}</div>')
    if len(sections) >= 2:
        entries = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
        head.append(f'<nav class="toc"><strong>Contents</strong><ol>{entries}</ol></nav>')
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{heading}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(head)
        + "\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
