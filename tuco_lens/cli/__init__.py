"""The ``tuco-lens`` command: ``demo``, ``score``, ``steer``, ``app``, ``top`` and ``reproduce``.

Each subcommand lives in its own module (``tuco_lens.cli.<command>``), imported only when that
command is given, so ``tuco-lens --help`` and ``tuco-lens --version`` start at once: building
the top-level parser imports neither torch nor TransformerLens (checked by
``tests/test_cli.py``). This module turns :class:`CLIError` (bad files, bad arguments) and
:class:`~tuco_lens.errors.TuCoError` into a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tuco_lens.cli.common import COMMANDS, CLIError
from tuco_lens.errors import TuCoError

__all__ = ["main", "build_parser", "CLIError", "COMMANDS"]

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


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``tuco-lens``.

    Args:
        commands: The subcommands whose options are added (their modules are imported);
            the others are listed with their one-line help only. ``None``: all of them.

    Example:
        >>> build_parser(["demo"]).parse_args(["demo", "--out", "report"]).out
        PosixPath('report')
    """
    from tuco_lens import __version__

    full = COMMANDS if commands is None else commands
    parser = argparse.ArgumentParser(
        prog="tuco-lens",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tuco_lens {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if name in full:
            importlib.import_module(f"tuco_lens.cli.{name}").add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first argument that is not an option), if any."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tuco-lens`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    parser = build_parser([] if command is None else [command])
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
