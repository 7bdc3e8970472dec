"""``tuco-lens reproduce owt-hh``: the paper's Table 1, first column, as one command (data-parallel like ``score``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuco_lens.cli.common import CLIError, add_command, add_model_arguments, check_pair_arguments

__all__ = ["add_parser", "run"]

_EPILOG = """\
what it does: reads the first N records of OpenWebText (97-token substrings: the first 97 tokens
of each record) and of HH-RLHF (the first human turn of each "chosen" conversation), wraps each
in the fine-tuned model's chat template, scores TuCo exactly like `tuco-lens score` (resumable;
data-parallel under torchrun; --shard for SLURM arrays) into OUT/scores.jsonl, and prints the
ROC AUC (HH-RLHF positive) beside the paper's value for its pairs (Llama-2-7B 1.0, Gemma-7B
0.93, Mistral-7B v0.1 0.98, Vicuna-7B v1.5 0.99, Zephyr-Gemma 0.63). OUT/summary.json keeps it.

examples:
  tuco-lens reproduce owt-hh --pt meta-llama/Llama-2-7b-hf --ft meta-llama/Llama-2-7b-chat-hf \\
      --dtype bfloat16 --device cuda --out owt-hh-llama2
  torchrun --nproc_per_node=4 --no-python tuco-lens reproduce owt-hh --pt google/gemma-7b \\
      --ft google/gemma-7b-it --dtype bfloat16 --out owt-hh-gemma
  tuco-lens reproduce owt-hh --demo --owt web.jsonl --hh hh.jsonl --n 50 --out demo-owt-hh
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    from tuco_lens.cli.score import add_scale_arguments

    parser = add_command(
        commands, "reproduce", run,
        description="Reproduce the paper's Table 1, first column: ROC AUC of TuCo, HH-RLHF chat vs OpenWebText.",
        epilog=_EPILOG,
    )
    parser.add_argument("experiment", choices=["owt-hh"], help="owt-hh: Table 1, first column")
    add_model_arguments(parser)
    parser.add_argument("--n", type=int, default=1000, help="records of each dataset (default 1000, the paper's)")
    parser.add_argument("--owt", default=None,
                        help="OpenWebText: hub id or local dataset/file with a 'text' column (default Skylion007/openwebtext)")
    parser.add_argument("--hh", default=None,
                        help="HH-RLHF: hub id or local dataset/file with a 'chosen' column (default Anthropic/hh-rlhf)")
    parser.add_argument("--owt-split", default=None, help="split of --owt (default train)")
    parser.add_argument("--hh-split", default=None, help="split of --hh (default train)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (scores.jsonl, summary.json)")
    add_scale_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out and start again")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    from tuco_lens import demo

    source = demo.FT_DIR if args.demo else args.ft
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as error:  # a missing directory, no network...
        raise CLIError(f"could not load the tokenizer of --ft {str(source)!r}: {error}") from error


def run(args: argparse.Namespace) -> int:
    from tuco_lens.cli.score import run_settings, score_from_args
    from tuco_lens.dataset_records import read_dataset
    from tuco_lens.reproduce import HH_DATASET, OWT_DATASET, describe, owt_hh_records, owt_hh_summary
    from tuco_lens.scoring_io import check_output_dir

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.n < 1:
        raise CLIError(f"--n must be a positive integer, got {args.n}")
    check_pair_arguments(args)
    out_dir = check_output_dir(args.out)
    owt_source, owt_split, owt_field = OWT_DATASET
    hh_source, hh_split, hh_field = HH_DATASET
    web = read_dataset(args.owt or owt_source, split=args.owt_split or (None if args.owt else owt_split),
                       field=owt_field, limit=args.n)
    chat = read_dataset(args.hh or hh_source, split=args.hh_split or (None if args.hh else hh_split),
                        field=hh_field, limit=args.n)
    records = owt_hh_records(_tokenizer(args), [r["prompt"] for r in web], [r["prompt"] for r in chat], n=args.n)
    args.out, args.chat_template, args.norm, args.per_token = out_dir / "scores.jsonl", True, "l1", False
    result = score_from_args(args, records, source=f"{args.owt or owt_source} + {args.hh or hh_source}")
    if not result.complete:
        print(f"scored {result.n_scored} prompts into the parts of {args.out}; the process that merges them "
              "prints the AUC", file=sys.stderr)
        return 0
    from tuco_lens.scoring import read_scores

    ft = run_settings(args)["ft"]
    summary = owt_hh_summary(read_scores(args.out), "demo" if args.demo else args.ft)
    summary.update(ft=ft, pt=run_settings(args)["pt"], n=args.n, scores=str(args.out))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(describe(summary))
    return 0
