"""Pieces shared by the ``tuco-lens`` subcommands: the command table, errors and model arguments.

This module imports only the standard library: the top-level parser is built from it.
"""

from __future__ import annotations

import argparse

__all__ = ["CLIError", "COMMANDS", "add_model_arguments", "load_pair_from_args", "HELP_FORMATTER"]

HELP_FORMATTER = argparse.RawDescriptionHelpFormatter

#: The subcommands (module ``tuco_lens.cli.<name>``) and their one-line help, in help order.
COMMANDS: dict[str, str] = {
    "demo": "run the full analysis on the embedded demo pair and write a report",
    "score": "TuCo of every prompt in a .txt or .jsonl file",
    "steer": "generate with the fine-tuning component scaled by several alphas",
}


class CLIError(Exception):
    """A problem with the command line or its files, reported as one line on stderr."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pt``, ``--ft`` (or ``--demo``), ``--device``, ``--dtype``."""
    group = parser.add_argument_group("models")
    group.add_argument("--pt", help="pre-trained model: TransformerLens name, hub id or local directory")
    group.add_argument("--ft", help="fine-tuned model: TransformerLens name, hub id or local directory")
    group.add_argument("--demo", action="store_true", help="use the embedded demo pair instead of --pt/--ft")
    group.add_argument("--device", default=None, help="device for both models (default: TransformerLens's choice)")
    group.add_argument("--dtype", default=None, help="dtype for both models, e.g. float32, bfloat16")


def load_pair_from_args(args: argparse.Namespace):
    """Load the pair named by ``--pt/--ft`` or ``--demo``."""
    if args.demo:
        if args.pt or args.ft:
            raise CLIError("give either --demo or --pt and --ft, not both")
        from tuco_lens import demo

        return demo.load_pair(device=args.device, dtype=args.dtype)
    if not args.pt or not args.ft:
        raise CLIError("both --pt and --ft are required (or --demo for the embedded pair)")
    from tuco_lens import load_pair

    return load_pair(args.pt, args.ft, device=args.device, dtype=args.dtype)
