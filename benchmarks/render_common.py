"""Formatting shared by the renderers (``render_performance.py``, ``render_tuco.py``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

MB = 1e6


def fmt_ratio(x: float, goal: float | None = None) -> str:
    """``x`` as ``1.23×``, **bold** when above ``goal``; ``–`` for a ratio that was not measured (nan)."""
    if x != x:  # nan
        return "–"
    text = f"{x:.2f}×"
    return f"**{text}**" if goal is not None and x > goal else text


def render_cli(argv: list[str] | None, doc: str | None, bench: str, render: Callable[[dict], str]) -> None:
    """The command line of a renderer: ``RESULTS.json [--out PAGE.md]``.

    Reads the JSON that ``bench --out`` wrote (recording its path as ``meta["out"]``, for the
    command shown on the page), renders it with ``render`` and writes the page to ``--out``, or
    prints it.
    """
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("results", type=Path, help=f"JSON written by {bench} --out")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: print)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    results["meta"]["out"] = str(args.results)
    text = render(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
