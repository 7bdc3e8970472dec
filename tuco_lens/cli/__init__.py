"""The ``tuco-lens`` command: ``demo``, ``score``, ``steer``, ``app``, ``top`` and ``reproduce``.

Each subcommand lives in its own module; this one builds the parser and turns
:class:`CLIError` (bad files, bad arguments) and :class:`~tuco_lens.errors.TuCoError` into a
one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tuco_lens.cli.common import CLIError
from tuco_lens.errors import TuCoError

__all__ = ["main", "build_parser", "CLIError"]

_DESCRIPTION = """\
tuco_lens: TuCo (Tuning Contribution) for a pre-trained / fine-tuned model pair.

TuCo measures, for one prompt, how much of what the fine-tuned model writes into its
residual stream comes from fine-tuning (Nuti et al., ICML 2025).
"""

_EPILOG = """\
examples:
  tuco-lens demo --out tuco-report              # offline, on the embedded demo pair
  tuco-lens score --pt gpt2 --ft ./my-gpt2-sft --prompts prompts.txt --out scores.csv
  tuco-lens steer --pt ./base --ft ./chat --prompt "Tell me a story" --alpha 0 0.5 1 1.5
  tuco-lens app --demo                          # interactive local page (needs tuco_lens[app])
  tuco-lens top --scores scores.parquet --k 20 --out top.html   # highest / lowest TuCo prompts
  tuco-lens reproduce owt-hh --pt meta-llama/Llama-2-7b-hf --ft meta-llama/Llama-2-7b-chat-hf --out owt-hh

Run "tuco-lens COMMAND --help" for the options of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tuco-lens`` (one subparser per command)."""
    from tuco_lens.cli import app, demo, reproduce, score, steer, top

    parser = argparse.ArgumentParser(
        prog="tuco-lens",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from tuco_lens import __version__

    parser.add_argument("--version", action="version", version=f"tuco_lens {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (demo, score, steer, app, top, reproduce):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tuco-lens`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (CLIError, TuCoError) as error:
        print(f"tuco-lens {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tuco-lens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
