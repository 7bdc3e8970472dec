"""``tuco-lens demo``: the main job on the embedded demo pair, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from tuco_lens.cli.common import add_command

__all__ = ["add_parser", "run"]

_EPILOG = """\
The demo pair is a tiny pre-trained model and its chat fine-tune, trained by tuco_lens's own
script on a synthetic world and shipped with the package (see docs/demo.md). The command scores
the demo prompt sets (web text, chat requests, forbidden-topic requests, and the same in a rarer
second language), sweeps alpha, and writes:
  DIR/report.html     self-contained report (plotly.js embedded; opens offline)
  DIR/results.csv     TuCo of every prompt
  DIR/alpha_sweep.csv refusal rates per alpha
  DIR/summary.json    the numbers printed at the end

example:
  tuco-lens demo --out tuco-report && xdg-open tuco-report/report.html
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "demo", run,
        description="Score the demo prompt sets, sweep alpha and write an HTML report (offline).", epilog=_EPILOG,
    )
    parser.add_argument("--out", type=Path, default=Path("tuco-report"), help="output directory (default tuco-report)")
    parser.add_argument(
        "--docs-url", default=None,
        help="base URL of the documentation site the report links to (default: the site built in this "
        "checkout, site/, when run from one; otherwise pages are named, not linked)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: the demo model is tiny, and extra threads only add overhead)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from tuco_lens.cli.common import CLIError
    from tuco_lens.demo.report import run_demo

    if args.threads < 1:
        raise CLIError(f"--threads must be a positive integer, got {args.threads}")
    torch.set_num_threads(args.threads)
    results = run_demo(args.out, docs_url=args.docs_url, show_progress=not args.no_progress)
    print(results.summary())
    print(f"report: {args.out / 'report.html'}")
    return 0
