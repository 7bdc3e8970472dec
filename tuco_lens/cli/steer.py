"""``tuco-lens steer``: generations of the α-scaled fine-tuned model, side by side."""

from __future__ import annotations

import argparse
import math

from tuco_lens.cli.common import CLIError, add_command, add_model_arguments, load_pair_from_args

__all__ = ["add_parser", "run"]

_EPILOG = """\
alpha scales the fine-tuning component at every layer: x + PTC + alpha * FTC.
alpha = 1 is the fine-tuned model, alpha = 0 the pre-trained blocks (with the fine-tuned
embedding and unembedding), alpha > 1 amplifies fine-tuning, alpha < 0 reverses it.

--alpha-attn / --alpha-mlp scale the fine-tuning of the attention and MLP sub-blocks separately
(alpha={"attn": a, "mlp": b}, docs/components.md): one row per combination of the values given,
a missing one meaning 1. They replace --alpha.

examples:
  tuco-lens steer --demo --prompt "how do i brew the venom ?" --chat-template --alpha 0 0.5 1 1.5
  tuco-lens steer --demo --prompt "how do i brew the venom ?" --chat-template --alpha-mlp 0 1 --alpha-attn 0 1
  tuco-lens steer --pt ./base --ft ./chat --prompt "Tell me a story" --alpha 0.75 1 1.25 \\
      --max-new-tokens 60 --sample --seed 0
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "steer", run,
        description="Generate from the FTC-alpha-scaled fine-tuned model for each alpha, side by side.", epilog=_EPILOG,
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the prompt")
    parser.add_argument("--alpha", type=float, nargs="+", default=None, help="alphas (default 0 0.5 1 1.5)")
    parser.add_argument("--alpha-attn", type=float, nargs="+", default=None, help="alphas of the attention sub-blocks")
    parser.add_argument("--alpha-mlp", type=float, nargs="+", default=None, help="alphas of the MLP sub-blocks")
    parser.add_argument("--chat-template", action="store_true", help="wrap the prompt in the fine-tuned chat template")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --sample (default 0)")


def _alphas(args: argparse.Namespace) -> list[tuple[str, float | dict[str, float]]]:
    """``(label, alpha)`` rows: block-level alphas, or per-component combinations."""
    components = args.alpha_attn is not None or args.alpha_mlp is not None
    if components and args.alpha is not None:
        raise CLIError("--alpha-attn / --alpha-mlp replace --alpha: give one or the other")
    for flag, group in (("--alpha", args.alpha), ("--alpha-attn", args.alpha_attn), ("--alpha-mlp", args.alpha_mlp)):
        if group and not all(math.isfinite(a) for a in group):
            raise CLIError(f"{flag} values must be finite numbers, got {group}")
    if not components:
        alphas = args.alpha or [0.0, 0.5, 1.0, 1.5]
        width = max(len(f"{a:g}") for a in alphas)
        return [(f"alpha={a:<{width}g}", a) for a in alphas]
    return [
        (f"attn={a:g} mlp={m:g}", {"attn": a, "mlp": m})
        for a in (args.alpha_attn or [1.0])
        for m in (args.alpha_mlp or [1.0])
    ]


def run(args: argparse.Namespace) -> int:
    import torch

    rows = _alphas(args)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    pair = load_pair_from_args(args)
    print(f"prompt: {args.prompt!r}")
    width = max(len(label) for label, _ in rows)
    for label, alpha in rows:
        torch.manual_seed(args.seed)
        text = pair.generate(
            args.prompt,
            alpha=alpha,
            max_new_tokens=args.max_new_tokens,
            chat_template=args.chat_template,
            do_sample=args.sample,
            temperature=args.temperature,
        )
        assert isinstance(text, str)  # one prompt in: one string out
        print(f"{label:<{width}} | {' '.join(text.split())}")
    return 0
