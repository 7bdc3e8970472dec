"""``tuco-lens top``: an offline page of the highest- and lowest-TuCo prompts of a score table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuco_lens.cli.common import CLIError, add_command

__all__ = ["add_parser", "run"]

_EPILOG = """\
The page (self-contained HTML, opens offline) shows the K prompts with the highest TuCo and the K
with the lowest, tokens coloured by per-token TuCo when the table has them (tuco-lens score
--per-token), and the distribution of TuCo per label (the "set" or "label" column, or --label).

examples:
  tuco-lens score --demo --prompts prompts.jsonl --per-token --out scores.parquet
  tuco-lens top --scores scores.parquet --k 20 --out top.html
  tuco-lens top --scores scores.csv --k 50 --label source --out top.html
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "top", run,
        description="Write an offline HTML page of the highest- and lowest-TuCo prompts of a score table.",
        epilog=_EPILOG,
    )
    parser.add_argument("--scores", required=True, type=Path, help="a score table (.csv, .jsonl, .parquet)")
    parser.add_argument("--k", type=int, default=20, help="prompts per list (default 20)")
    parser.add_argument("--label", default=None, help='label column for the distributions (default "set" or "label")')
    parser.add_argument("--out", type=Path, default=Path("top.html"), help="the page to write (default top.html)")


def run(args: argparse.Namespace) -> int:
    from tuco_lens.corpus_view import write_top_page

    if args.out.suffix != ".html":
        raise CLIError(f"--out must end in .html, got {str(args.out)!r}")
    if not args.out.parent.is_dir():
        raise CLIError(f"the directory of --out, {str(args.out.parent)!r}, does not exist: create it first")
    path = write_top_page(args.scores, args.out, args.k, label=args.label)
    print(f"wrote {path}", file=sys.stderr)
    return 0
