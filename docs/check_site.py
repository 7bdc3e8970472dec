"""Open the built documentation site from disk in headless Chromium and check that it works offline.

    python docs/check_site.py site                 # after `mkdocs build` (bash .ci/docs runs it)

Every page of ``site/`` is opened as a ``file://`` URL, with no network (Chromium's background
networking off, a fresh profile), its scripts run, and the rendered DOM is read back. A page
fails when

* its visible text shows raw LaTeX (``\\(``, ``\\[``, ``$$``) or mermaid source (``graph TD``,
  ``flowchart``): formulas are pre-rendered to MathML at build time and the diagram is an SVG,
  so nothing needs a CDN;
* it has no ``<math>`` element although its source page has formulas (``docs/index.md``);
* a relative link points to a directory or to a file that does not exist (from disk a
  directory shows a file listing: the site is built with ``use_directory_urls: false``);
* it loads a script or stylesheet from the network;
* search does not work from disk (Material's ``offline`` plugin inlines the index as
  ``search/search_index.js``; its worker runs through the ``iframe-worker`` shim, which the
  docs hook serves from the site): ``index.html?q=alpha_hooks`` must list results.

It also renders each figure of ``docs/images/plots/`` at a width of 650 px (a Jupyter output
cell) and checks that the plot area takes at least 60% of it. Exit status 1 lists every failure.
Standard library only; needs ``chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

#: Flags for a headless Chromium with no network activity of its own.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--virtual-time-budget=8000",
)
RAW_MATH = re.compile(r"\\\(|\\\[|\$\$")
RAW_MERMAID = re.compile(r"\bgraph (TD|TB|LR)\b|\bflowchart (TD|TB|LR|BT|RL)\b")
NOTEBOOK_WIDTH = 650
MIN_PLOT_SHARE = 0.6


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise SystemExit("chromium is not installed: apt-get install -y chromium")
    return path


def chromium_command(user_data_dir: str, *args: str) -> list[str]:
    """A headless Chromium command line with a fresh profile in ``user_data_dir``."""
    return [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", *args]


def rendered_dom(url: str, width: int = 1280) -> str:
    """The DOM of ``url`` after its scripts ran (``--dump-dom``)."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            chromium_command(profile, f"--window-size={width},1000", "--dump-dom", url),
            capture_output=True, text=True, timeout=120,
        )
    if result.returncode != 0 or "<html" not in result.stdout:
        raise RuntimeError(f"chromium could not open {url}: {result.stderr.strip()[-500:]}")
    return result.stdout


class _Page(HTMLParser):
    """Visible text (outside code, scripts, styles, SVG and MathML) and the page's references."""

    HIDDEN = {"script", "style", "code", "pre", "svg", "math", "textarea", "template", "noscript"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.links: list[str] = []
        self.remote: list[str] = []
        self.n_math = 0
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "math":
            self.n_math += 1
        if tag in self.HIDDEN:
            self._hidden += 1
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag in ("script", "img", "iframe") and a.get("src"):
            self._maybe_remote(a["src"])
        if tag == "link" and a.get("href") and (a.get("rel") or "") in ("stylesheet", "preload", "modulepreload"):
            self._maybe_remote(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.text.append(data)

    def _maybe_remote(self, url: str) -> None:
        if urlparse(url).scheme in ("http", "https") or url.startswith("//"):
            self.remote.append(url)


def check_page(site: Path, page: Path) -> list[str]:
    """The failures of one page of the site (empty if it works offline)."""
    where = page.relative_to(site)
    dom = rendered_dom(page.as_uri())
    parsed = _Page()
    parsed.feed(dom)
    text = " ".join(" ".join(parsed.text).split())
    failures = []
    for pattern, what in ((RAW_MATH, "raw LaTeX"), (RAW_MERMAID, "raw mermaid source")):
        found = pattern.search(text)
        if found:
            start = max(found.start() - 60, 0)
            failures.append(f"{where}: {what} in the rendered text: …{text[start:found.end() + 60]}…")
    if where.as_posix() == "index.html" and parsed.n_math == 0:
        failures.append(f"{where}: no <math> element: the formulas were not rendered")
    for url in parsed.remote:
        failures.append(f"{where}: loads {url} from the network")
    for href in parsed.links:
        parts = urlparse(html.unescape(href))
        if parts.scheme or parts.netloc or not parts.path:
            continue  # external links and same-page anchors
        target = (page.parent / unquote(parts.path)).resolve()
        if target.is_dir():
            failures.append(f"{where}: link {href!r} opens a directory listing from disk")
        elif not target.exists():
            failures.append(f"{where}: link {href!r} points to a missing file")
    return failures


def check_search(site: Path, query: str = "alpha_hooks") -> list[str]:
    """Search from disk: ``index.html?q=QUERY`` must list results (Material runs the query)."""
    dom = rendered_dom((site / "index.html").as_uri() + f"?q={query}")
    n = dom.count('class="md-search-result__item"')
    print(f"  search for {query!r} from disk: {n} results")
    return [] if n else [f"index.html: searching {query!r} from disk finds nothing (search needs a server?)"]


_FIGURE_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><script src="{plotly}"></script></head>
<body style="margin:0"><div style="width:{width}px">{fragment}</div>
<script>window.addEventListener("load", () => setTimeout(() => {{
  const out = [];
  for (const gd of document.querySelectorAll(".js-plotly-plot")) {{
    const s = gd._fullLayout._size;
    out.push([gd.id, s.w, gd._fullLayout.width]);
  }}
  document.body.insertAdjacentHTML("beforeend", "<pre id='sizes'>" + JSON.stringify(out) + "</pre>");
}}, 300));</script></body></html>"""


def check_figures(site: Path, fragments: Path) -> list[str]:
    """Each figure fragment rendered at 650 px: the plot area must be >= 60% of the width."""
    import json

    plotly = site / "assets" / "javascripts" / "plotly.min.js"
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for fragment in sorted(fragments.glob("*.html")):
            text = fragment.read_text(encoding="utf-8")
            if "Plotly.newPlot" not in text:
                continue
            page = Path(tmp) / fragment.name
            page.write_text(_FIGURE_PAGE.format(plotly=plotly.as_uri(), width=NOTEBOOK_WIDTH, fragment=text), encoding="utf-8")
            found = re.search(r"<pre id=\"sizes\">(.*?)</pre>", rendered_dom(page.as_uri(), NOTEBOOK_WIDTH + 40), re.S)
            if found is None:
                failures.append(f"{fragment.name}: the figure did not render")
                continue
            for div, plot_width, width in json.loads(html.unescape(found.group(1))):
                share = plot_width / width
                print(f"  {fragment.name}: plot area {plot_width:.0f} of {width:.0f} px ({share:.0%})")
                if share < MIN_PLOT_SHARE:
                    failures.append(f"{fragment.name}: plot area {share:.0%} of {width:.0f} px (< {MIN_PLOT_SHARE:.0%})")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site", type=Path, help="the built site (mkdocs build --site-dir SITE)")
    parser.add_argument("--figures", type=Path, default=Path(__file__).resolve().parent / "images" / "plots",
                        help="figure fragments to render at 650 px (default docs/images/plots)")
    args = parser.parse_args()
    site = args.site.resolve()
    pages = sorted(  # 404.html is for servers only (absolute links, by design)
        p for p in site.rglob("*.html") if "assets" not in p.relative_to(site).parts and p.name != "404.html"
    )
    if not pages:
        raise SystemExit(f"{site}: no pages; build the site first (mkdocs build)")
    failures = []
    for page in pages:
        failures += check_page(site, page)
    print(f"opened {len(pages)} pages from disk in headless Chromium")
    failures += check_search(site)
    failures += check_figures(site, args.figures)
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"{len(pages)} pages checked, {len(failures)} failures" if failures else f"{len(pages)} pages work offline")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
