"""``tuco-lens steer``: generations of the α-scaled fine-tuned model, side by side."""

from __future__ import annotations

import argparse
import math

from tuco_lens.cli.common import COMMANDS, HELP_FORMATTER, CLIError, add_model_arguments, load_pair_from_args

__all__ = ["add_parser", "run"]

_EPILOG = """\
alpha scales the fine-tuning component at every layer: x + PTC + alpha * FTC.
alpha = 1 is the fine-tuned model, alpha = 0 the pre-trained blocks (with the fine-tuned
embedding and unembedding), alpha > 1 amplifies fine-tuning, alpha < 0 reverses it.

examples:
  tuco-lens steer --demo --prompt "how do i brew the venom ?" --chat-template --alpha 0 0.5 1 1.5
  tuco-lens steer --pt ./base --ft ./chat --prompt "Tell me a story" --alpha 0.75 1 1.25 \\
      --max-new-tokens 60 --sample --seed 0
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "steer",
        help=COMMANDS["steer"],
        description="Generate from the FTC-alpha-scaled fine-tuned model for each alpha, side by side.",
        epilog=_EPILOG,
        formatter_class=HELP_FORMATTER,
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the prompt")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5], help="alphas (default 0 0.5 1 1.5)")
    parser.add_argument("--chat-template", action="store_true", help="wrap the prompt in the fine-tuned chat template")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --sample (default 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if not all(math.isfinite(a) for a in args.alpha):
        raise CLIError(f"--alpha values must be finite numbers, got {args.alpha}")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    pair = load_pair_from_args(args)
    print(f"prompt: {args.prompt!r}")
    width = max(len(f"{a:g}") for a in args.alpha)
    for alpha in args.alpha:
        torch.manual_seed(args.seed)
        text = pair.generate(
            args.prompt,
            alpha=alpha,
            max_new_tokens=args.max_new_tokens,
            chat_template=args.chat_template,
            do_sample=args.sample,
            temperature=args.temperature,
        )
        print(f"alpha={alpha:<{width}g} | {' '.join(text.split())}")
    return 0
