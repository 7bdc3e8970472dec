"""MkDocs hook: things pages need at build time, so the site never drifts from the code.

* ``<!-- tuco-lens-help: COMMAND -->`` in a page is replaced by the ``--help`` text of
  ``tuco-lens COMMAND`` (``tuco-lens`` alone for ``main``), produced by the installed package.
* plotly.js (from the installed ``plotly`` package, so the figures work offline) is copied to
  ``assets/javascripts/plotly.min.js`` and loaded only on pages that draw a figure.
* MathJax is loaded only on pages with formulas outside the notebooks (the notebook pages bring
  their own MathJax through mkdocs-jupyter's template; two MathJax versions on one page clash).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.utils import get_relative_url

PLOTLY_JS = "assets/javascripts/plotly.min.js"
MATHJAX_URL = "https://unpkg.com/mathjax@3/es5/tex-mml-chtml.js"
MATHJAX_CONFIG = """<script>
window.MathJax = {
  tex: {inlineMath: [["\\\\(", "\\\\)"]], displayMath: [["\\\\[", "\\\\]"]], processEscapes: true, processEnvironments: true},
  options: {ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex"}
};
</script>"""
HELP_MARKER = re.compile(r"<!--\s*tuco-lens-help:\s*(?P<command>[a-z]+)\s*-->")


def on_files(files: Files, config) -> Files:
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    files.append(File.generated(config, PLOTLY_JS, abs_src_path=str(source)))
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


def on_page_content(html: str, page, config, files) -> str:
    if "Plotly.newPlot" in html:
        html = f'<script src="{get_relative_url(PLOTLY_JS, page.url)}"></script>\n' + html
    is_notebook = page.file.src_uri.endswith(".ipynb")
    if 'class="arithmatex"' in html and not is_notebook:
        html += f'\n{MATHJAX_CONFIG}\n<script src="{MATHJAX_URL}"></script>\n'
    return html
