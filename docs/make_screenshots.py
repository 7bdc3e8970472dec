"""Screenshots of the demo report and of the documentation site opened from disk (headless Chromium).

    tuco-lens demo --out tuco-report && bash .ci/docs       # the report and the built site
    python docs/make_screenshots.py tuco-report/report.html site

Writes ``docs/images/report_top.png`` (the report's heading, model description, headline table
and contents), ``docs/images/report_section.png`` (one analysis section: figure, reading
guidance, docs link) and ``docs/images/docs_offline.png`` (the home page of the site opened as a
``file://`` URL: formulas and the diagram rendered without a network). Needs Debian's
``chromium`` and Pillow (``pip install pillow``; used only here, to crop the full-page shots).

Chromium runs headless with the flags of ``docs/check_site.py`` (no network, fresh profile).
A copy of the page with a small script appended reports where each section sits; the full-page
screenshot is cropped to it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"
WIDTH = 1000

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_site import chromium_command  # noqa: E402

_POSITIONS = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const boxes = {};
  for (const el of document.querySelectorAll("section[id], h1, nav.toc")) {
    const r = el.getBoundingClientRect();
    boxes[el.id || el.tagName.toLowerCase()] = [r.top + window.scrollY, r.bottom + window.scrollY];
  }
  const out = document.createElement("pre");
  out.id = "tuco-positions";
  out.textContent = JSON.stringify(boxes);
  document.body.appendChild(out);
}, 500));
</script>"""


def _positions(page: Path) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / page.name
        copy.write_text(page.read_text(encoding="utf-8").replace("</body>", _POSITIONS + "</body>"), encoding="utf-8")
        dom = subprocess.run(
            chromium_command(tmp, f"--window-size={WIDTH},1200", "--dump-dom", copy.as_uri()),
            capture_output=True, text=True, timeout=180, check=True,
        ).stdout
    found = re.search(r'<pre id="tuco-positions">(.*?)</pre>', dom, re.S)
    if found is None:
        raise SystemExit(f"{page}: the positions script did not run")
    return json.loads(found.group(1))


def _shot(url: str, out: Path, height: int, width: int = WIDTH) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            chromium_command(tmp, f"--window-size={width},{height}", "--hide-scrollbars", f"--screenshot={out}", url),
            capture_output=True, timeout=180, check=True,
        )


def _crop(full: Path, out: Path, top: float, bottom: float) -> None:
    from PIL import Image

    with Image.open(full) as image:
        image.crop((0, max(int(top) - 36, 0), WIDTH, min(int(bottom) + 10, image.height))).save(out, optimize=True)
    print(f"wrote {out} ({int(bottom - top)} px high)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="the demo report (tuco-report/report.html)")
    parser.add_argument("site", type=Path, help="the built documentation site (site/)")
    parser.add_argument("--section", default="section-many-shot-prompts-5-3", help="id of the section to show")
    args = parser.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    report = args.report.resolve()
    boxes = _positions(report)
    bottom = max(b for _, b in boxes.values())
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.png"
        _shot(report.as_uri(), full, int(bottom) + 200)
        _crop(full, IMAGES / "report_top.png", 0, boxes["nav"][1])
        if args.section not in boxes:
            raise SystemExit(f"no section {args.section!r}; the report has {sorted(boxes)}")
        _crop(full, IMAGES / "report_section.png", *boxes[args.section])
    _shot((args.site.resolve() / "index.html").as_uri(), IMAGES / "docs_offline.png", 1100, width=1280)
    print(f"wrote {IMAGES / 'docs_offline.png'}")


if __name__ == "__main__":
    main()
