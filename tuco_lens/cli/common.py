"""Pieces shared by the ``tuco-lens`` subcommands: the command table, errors and model arguments.

This module imports only the standard library: the top-level parser is built from it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = [
    "CLIError",
    "COMMANDS",
    "add_command",
    "add_model_arguments",
    "check_pair_arguments",
    "load_pair_from_args",
    "HELP_FORMATTER",
]

HELP_FORMATTER = argparse.RawDescriptionHelpFormatter

#: The subcommands (module ``tuco_lens.cli.<name>``) and their one-line help, in help order.
COMMANDS: dict[str, str] = {
    "demo": "run the full analysis on the embedded demo pair and write a report",
    "score": "TuCo of every prompt in a .txt or .jsonl file",
    "steer": "generate with the fine-tuning component scaled by several alphas",
    "app": "serve an interactive local page: analyze, steer, compare",
    "top": "page of the highest- and lowest-TuCo prompts of a score table",
    "reproduce": "reproduce a result of the paper (owt-hh: Table 1, web text vs chat)",
}


class CLIError(Exception):
    """A problem with the command line or its files, reported as one line on stderr."""


def add_command(
    commands: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``, which ``run`` runs: its one-line help from :data:`COMMANDS`.

    The ``epilog`` keeps its line breaks (:data:`HELP_FORMATTER`).

    Example:
        >>> commands = argparse.ArgumentParser(prog="tuco-lens").add_subparsers(dest="command")
        >>> parser = add_command(commands, "top", lambda args: 0, description="A page.", epilog="example: ...")
        >>> parser.prog, parser.get_default("run")(None)
        ('tuco-lens top', 0)
    """
    parser = commands.add_parser(
        name, help=COMMANDS[name], description=description, epilog=epilog, formatter_class=HELP_FORMATTER
    )
    parser.set_defaults(run=run)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pt``, ``--ft`` (or ``--demo``), ``--device``, ``--dtype``."""
    group = parser.add_argument_group("models")
    group.add_argument("--pt", help="pre-trained model: TransformerLens name, hub id or local directory")
    group.add_argument("--ft", help="fine-tuned model: TransformerLens name, hub id or local directory")
    group.add_argument("--demo", action="store_true", help="use the embedded demo pair instead of --pt/--ft")
    group.add_argument("--device", default=None, help="device for both models (default: TransformerLens's choice)")
    group.add_argument("--dtype", default=None, help="dtype for both models, e.g. float32, bfloat16")


def check_pair_arguments(args: argparse.Namespace) -> None:
    """Check ``--pt/--ft/--demo``, ``--dtype`` and ``--device`` without loading anything.

    Raises:
        CLIError: ``--demo`` with ``--pt``/``--ft``, or one of ``--pt``/``--ft`` missing.
        TuCoError: an unknown dtype, or a device that does not exist on this machine.
    """
    from tuco_lens.loading import resolve_dtype
    from tuco_lens.validation import check_device

    if args.demo and (args.pt or args.ft):
        raise CLIError("give either --demo or --pt and --ft, not both")
    if not args.demo and (not args.pt or not args.ft):
        raise CLIError("both --pt and --ft are required (or --demo for the embedded pair)")
    resolve_dtype(args.dtype)
    check_device(args.device)


def load_pair_from_args(args: argparse.Namespace):
    """Load the pair named by ``--pt/--ft`` or ``--demo`` (checked by :func:`check_pair_arguments`)."""
    check_pair_arguments(args)
    if args.demo:
        from tuco_lens import demo

        return demo.load_pair(device=args.device, dtype=args.dtype)
    from tuco_lens import load_pair

    return load_pair(args.pt, args.ft, device=args.device, dtype=args.dtype)
