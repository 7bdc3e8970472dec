"""MkDocs hook: things pages need at build time, so the site never drifts from the code.

* ``<!-- tuco-lens-help: COMMAND -->`` in a page is replaced by the ``--help`` text of
  ``tuco-lens COMMAND`` (``tuco-lens`` alone for ``main``), produced by the installed package.
* plotly.js (from the installed ``plotly`` package, so the figures work offline) is copied to
  ``assets/javascripts/plotly.min.js`` and loaded only on pages that draw a figure.
* Search from disk: Material's ``offline`` plugin inlines the index, and its web worker runs
  from ``file://`` through the ``iframe-worker`` shim, which the plugin would load from a CDN.
  The shim is copied into the site from the ``iframe-worker`` npm package instead, when it is
  installed (``.ci/docs`` runs ``npm install --prefix .cache/docs-assets iframe-worker@1``;
  ``TUCO_DOCS_NODE_MODULES`` points elsewhere); without it, search from disk needs the network.
* Formulas are pre-rendered to MathML (``latex2mathml``) at build time, so they show without
  MathJax or any network (browsers render MathML natively): ``pymdownx.arithmatex`` marks them
  in the pages, and the notebook hook converts those of the notebooks' markdown cells.
  ``docs/check_site.py`` opens the built site from disk and fails on any raw LaTeX left.
"""

from __future__ import annotations

import contextlib
import html as html_module
import io
import logging
import os
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.utils import get_relative_url

PLOTLY_JS = "assets/javascripts/plotly.min.js"
IFRAME_WORKER = "assets/javascripts/iframe-worker-shim.js"
NODE_MODULES = Path(os.environ.get("TUCO_DOCS_NODE_MODULES", Path(__file__).resolve().parents[2] / ".cache" / "docs-assets" / "node_modules"))
log = logging.getLogger("mkdocs.hooks.pages")
# pymdownx.arithmatex (generic mode) writes \\(...\\) in a span and \\[...\\] in a div.
ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])\s*</(?P=tag)>', re.S
)
HELP_MARKER = re.compile(r"<!--\s*tuco-lens-help:\s*(?P<command>[a-z]+)\s*-->")


def _iframe_worker() -> Path | None:
    shim = NODE_MODULES / "iframe-worker" / "shim" / "index.js"
    return shim if shim.is_file() else None


def on_config(config):
    """Serve the offline plugin's ``iframe-worker`` shim from the site when it is installed."""
    polyfills = config.extra.get("polyfills", [])
    if _iframe_worker() is None:
        log.info("iframe-worker is not installed in %s: search from disk will load its shim from the network", NODE_MODULES)
        return config
    config.extra["polyfills"] = [IFRAME_WORKER if "iframe-worker" in str(url) else url for url in polyfills]
    return config


def on_files(files: Files, config) -> Files:
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    files.append(File.generated(config, PLOTLY_JS, abs_src_path=str(source)))
    shim = _iframe_worker()
    if shim is not None:
        files.append(File.generated(config, IFRAME_WORKER, abs_src_path=str(shim)))
    return files


def _help(command: str) -> str:
    from tuco_lens.cli import build_parser

    os.environ["COLUMNS"] = "100"  # stable wrapping whatever the terminal
    argv = ["--help"] if command == "main" else [command, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args(argv)
    text = out.getvalue().strip()
    if not text.startswith("usage:"):
        raise PluginError(f"tuco-lens-help: no help for command {command!r}")
    return text


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        return "```text\n" + _help(match["command"]) + "\n```"

    return HELP_MARKER.sub(replace, markdown)


def latex_to_mathml(latex: str, display: bool = False) -> str:
    """MathML for one LaTeX formula (``display`` for a block), or a build error naming it."""
    from latex2mathml.converter import convert

    try:
        return convert(latex, display="block" if display else "inline")
    except Exception as error:  # noqa: BLE001 - any converter failure fails the build
        raise PluginError(f"cannot render the formula {latex!r} to MathML: {error}") from error


def _mathml(match: re.Match) -> str:
    display = match["block"] is not None
    latex = html_module.unescape(match["block"] if display else match["inline"])
    return latex_to_mathml(latex, display)


def on_page_content(html: str, page, config, files) -> str:
    if "Plotly.newPlot" in html:
        html = f'<script src="{get_relative_url(PLOTLY_JS, page.url)}"></script>\n' + html
    return ARITHMATEX.sub(_mathml, html)
