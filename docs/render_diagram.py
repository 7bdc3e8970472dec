"""Pre-render the mermaid diagram of the home page to SVG, so the site needs no mermaid at run time.

    npm install --prefix /tmp/mermaid mermaid@11
    python docs/render_diagram.py /tmp/mermaid/node_modules/mermaid/dist/mermaid.min.js

Reads ``docs/images/decomposition.mmd`` (the diagram's source: edit it there), renders it with
mermaid in headless Chromium (flags of ``docs/check_site.py``, no network) and writes
``docs/images/decomposition.svg``, which ``docs/index.md`` shows as an image. Labels are SVG
text (``htmlLabels: false``), so the file renders anywhere, inside ``<img>`` included.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
import tempfile
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_site import rendered_dom  # noqa: E402

_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><script src="{mermaid}"></script></head><body>
<pre id="source">{source}</pre><script>
mermaid.initialize({{startOnLoad: false, theme: "neutral", htmlLabels: false, flowchart: {{htmlLabels: false}},
                    fontFamily: "system-ui, sans-serif"}});
mermaid.render("tuco-diagram", document.getElementById("source").textContent).then(({{svg}}) => {{
  const out = document.createElement("div"); out.id = "out"; out.innerHTML = svg; document.body.appendChild(out);
}});
</script></body></html>"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mermaid_js", type=Path, help="mermaid.min.js from the mermaid npm package")
    args = parser.parse_args()
    source = (IMAGES / "decomposition.mmd").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "diagram.html"
        page.write_text(_PAGE.format(mermaid=args.mermaid_js.resolve().as_uri(), source=html.escape(source)), encoding="utf-8")
        dom = rendered_dom(page.as_uri())
    found = re.search(r'<div id="out">(<svg.*?</svg>)</div>', dom, re.S)
    if found is None:
        raise SystemExit("mermaid did not render the diagram")
    svg = found.group(1).replace("<br>", "<br/>")
    # An <img> needs an intrinsic size: mermaid writes width="100%" and a max-width style.
    width, height = re.search(r'viewBox="[-\d.]+ [-\d.]+ ([\d.]+) ([\d.]+)"', svg).groups()
    svg = re.sub(r' width="100%"', f' width="{float(width):.0f}" height="{float(height):.0f}"', svg, count=1)
    svg = re.sub(r' style="max-width: [\d.]+px;"', "", svg, count=1)
    if 'xmlns="http://www.w3.org/2000/svg"' not in svg[:300]:
        svg = svg.replace("<svg", '<svg xmlns="http://www.w3.org/2000/svg"', 1)
    (IMAGES / "decomposition.svg").write_text(svg + "\n", encoding="utf-8")
    print(f"wrote {IMAGES / 'decomposition.svg'} ({len(svg)} bytes)")


if __name__ == "__main__":
    main()
