"""MkDocs hook: run the notebooks of ``notebooks/`` and hand the executed copies to mkdocs-jupyter.

The notebooks are stored without outputs (``tests/test_notebooks.py`` enforces it), so the site
build executes them, offline on the embedded demo pair (about a minute on one CPU thread), and
renders the executed copies. The files in ``notebooks/`` are never modified.

* A cell that raises fails the build (``CellExecutionError``), like a warning in strict mode.
* ``stderr`` streams (progress bars of weight loading, library notices) are dropped from the
  rendered pages; they are logged at debug level (``mkdocs build -v``).
* Formulas in markdown cells (``$...$``, ``$$...$$``) become MathML at build time, as on the
  other pages (``pages.latex_to_mathml``): the rendered notebooks need no MathJax.
* plotly figures come out of a kernel as ``application/vnd.plotly.v1+json`` only, which
  nbconvert cannot render: each gets a ``text/html`` twin (a ``<div>`` and a ``Plotly.newPlot``
  call, without plotly.js; ``docs/hooks/pages.py`` loads plotly.js once on the page).
* Executed copies are cached in ``.cache/tuco-docs-notebooks/``, keyed by the notebook, the
  tuco_lens sources and checkpoints, and this file; a fresh clone (CI) always executes.
* ``TUCO_DOCS_EXECUTE=0`` renders the stored notebooks without outputs, for a quick local preview.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.notebooks")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CACHE = ROOT / ".cache" / "tuco-docs-notebooks"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
_USED: set[str] = set()
# Code (fenced blocks, inline spans) is kept as is; $$...$$ and $...$ outside it are formulas.
_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)
_MATH = re.compile(r"\$\$(?P<block>.+?)\$\$|\$(?P<inline>[^$\n]+?)\$", re.S)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pages import latex_to_mathml  # noqa: E402


def markdown_math(source: str) -> str:
    """A markdown cell with its formulas replaced by MathML."""

    def formula(match: re.Match) -> str:
        display = match["block"] is not None
        return latex_to_mathml(match["block"] if display else match["inline"], display)

    parts = _CODE.split(source)
    return "".join(part if k % 2 else _MATH.sub(formula, part) for k, part in enumerate(parts))


def _fingerprint(notebook: Path) -> str:
    digest = hashlib.sha256()
    sources = [notebook, Path(__file__), Path(__file__).with_name("pages.py")]
    sources += sorted(p for p in (ROOT / "tuco_lens").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in sources:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _plotly_html(data: dict) -> str:
    import plotly.io as pio

    figure = pio.from_json(json.dumps({"data": data.get("data", []), "layout": data.get("layout", {})}))
    height = figure.layout.height
    return pio.to_html(
        figure,
        include_plotlyjs=False,
        full_html=False,
        default_width="100%",
        default_height=f"{height}px" if height else "500px",
        config={"responsive": True, "displaylogo": False},
    )


def _clean(notebook, name: str):
    """Drop stderr streams and widget views; give plotly outputs an HTML twin nbconvert can render."""
    # ipywidgets (the notebook extra) makes tqdm draw widget progress bars; their views need the
    # widget manager from a CDN, so they are dropped with the widget state (the text is kept).
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            cell.source = markdown_math(cell.source)
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stderr":
                log.debug("%s: dropped stderr output: %s", name, output.text.strip()[:200])
                continue
            data = output.get("data", {})
            if WIDGET_MIME in data:
                log.debug("%s: dropped a widget view: %s", name, str(data.get("text/plain", ""))[:200])
                continue
            if PLOTLY_MIME in data and "text/html" not in data:
                data["text/html"] = _plotly_html(data[PLOTLY_MIME])
            kept.append(output)
        cell.outputs = kept
    return notebook


def _execute(source: Path, target: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the demo model is tiny; extra threads only spin
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the notebooks load is shipped
    notebook = nbformat.read(source, as_version=4)
    log.info("Executing %s (stored without outputs)", source.relative_to(ROOT))
    with tempfile.TemporaryDirectory() as workdir:
        client = NotebookClient(
            notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": workdir}}
        )
        client.execute()
    notebook = _clean(notebook, source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    nbformat.write(notebook, tmp)
    tmp.replace(target)


@event_priority(100)  # before mkdocs-jupyter wraps .ipynb files into pages
def on_files(files: Files, config) -> Files:
    execute = os.environ.get("TUCO_DOCS_EXECUTE", "1") != "0"
    for source in sorted(NOTEBOOKS.glob("*.ipynb")):
        if execute:
            src_dir = CACHE / _fingerprint(source)
            _USED.add(src_dir.name)
            target = src_dir / "notebooks" / source.name
            if target.is_file():
                log.info("Using the executed copy of %s from %s", source.name, target.parent)
            else:
                _execute(source, target)
        else:
            log.info("TUCO_DOCS_EXECUTE=0: rendering %s without outputs", source.name)
            src_dir = ROOT
        files.append(
            File(
                f"notebooks/{source.name}",
                src_dir=str(src_dir),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files


def on_post_build(config) -> None:
    """Forget executed copies that no notebook of this build used."""
    if CACHE.is_dir():
        for entry in CACHE.iterdir():
            if entry.is_dir() and entry.name not in _USED:
                shutil.rmtree(entry, ignore_errors=True)
