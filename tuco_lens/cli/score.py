"""``tuco-lens score``: TuCo of every prompt of a file or dataset, to CSV, JSONL or Parquet; resumable, data-parallel.

The work is :func:`tuco_lens.score_prompts` (:mod:`tuco_lens.scoring`); this module reads the
command line and the prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tuco_lens.cli.common import CLIError, add_command, add_model_arguments, check_pair_arguments, load_pair_from_args
from tuco_lens.errors import InputError
from tuco_lens.io import read_prompt_records

__all__ = ["add_parser", "add_input_arguments", "read_input", "run_settings", "run"]

_EPILOG = """\
input:  --prompts FILE  .txt (one prompt per line; blank lines skipped; "line" records the
                        line number) or .jsonl (a "prompt" field; other fields are kept)
        --dataset NAME  a datasets dataset: a hub id, a save_to_disk directory, or a local
                        .parquet/.json/.jsonl/.csv file; --field names the prompt column
                        (default "prompt"), --split the split; other columns are kept
output: .csv, .jsonl or .parquet (by extension; default: CSV on stdout), one row per prompt with
        index (0-based position among the prompts), tuco, n_tokens and the input fields;
        --per-token adds tokens and tuco_per_token (about twice the cost).
        Rows are written as each batch finishes (prompts are processed longest first to cut
        padding), so an interrupted run resumes where it stopped: rerun the same command and
        the prompts already in --out are skipped. OUT.run.json records what OUT was computed
        with (prompts, models, --norm, --chat-template, --dtype, --per-token, tuco_lens version);
        a rerun with anything else is refused (use a new --out, or --overwrite). A torn last row
        (full disk, kill) is cut and scored again; OUT.lock keeps a second writer out.
        CSV cells starting with = + - @ get a leading ' so spreadsheets show them as text.
scale:  the same command runs data-parallel under torchrun / accelerate launch (each process
        scores a contiguous part into OUT.parts/, rank 0 merges them into --out in input order),
        and --shard i/N scores job i of N (e.g. a SLURM array; the last job to finish merges).
        Parquet output is always written through a part, in row groups.

examples:
  tuco-lens score --pt meta-llama/Llama-2-7b-hf --ft meta-llama/Llama-2-7b-chat-hf \\
      --prompts requests.jsonl --chat-template --batch-size 16 --dtype bfloat16 --out scores.csv
  tuco-lens score --demo --prompts prompts.txt --out scores.jsonl
  torchrun --nproc_per_node=8 --no-python tuco-lens score --pt ./base --ft ./chat \\
      --dataset Anthropic/hh-rlhf --split test --field chosen --dtype bfloat16 --out hh.parquet
  tuco-lens score --pt ./base --ft ./chat --dataset prompts.parquet --out s.parquet \\
      --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
"""


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """``--prompts`` or ``--dataset`` (with ``--split``, ``--field``, ``--dataset-config``)."""
    group = parser.add_argument_group("input (one of)")
    group.add_argument("--prompts", type=Path, default=None, help="a .txt or .jsonl file of prompts")
    group.add_argument("--dataset", default=None,
                       help="a datasets dataset: hub id, save_to_disk directory, or .parquet/.json/.jsonl/.csv file")
    group.add_argument("--split", default=None, help="split of --dataset (default: its only split, else train)")
    group.add_argument("--field", default="prompt", help='column of --dataset holding the prompt (default "prompt")')
    group.add_argument("--dataset-config", default=None, help="configuration name of a hub --dataset")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "score", run,
        description="Compute TuCo (the paper's score, at each prompt's last token) for a file of prompts.",
        epilog=_EPILOG,
    )
    add_model_arguments(parser)
    add_input_arguments(parser)
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the fine-tuned chat template")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    parser.add_argument("--norm", choices=("l1", "l2"), default="l1", help="norm (default l1, the paper's)")
    parser.add_argument("--per-token", action="store_true",
                        help="also store the tokens and per-token TuCo (runs decompose: about twice the cost)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output .csv, .jsonl or .parquet (default: CSV on stdout)")
    add_scale_arguments(parser)
    parser.add_argument(
        "--overwrite", action="store_true",
        help="discard an existing --out and start again (default: resume it, if it was computed the same way)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shard i/N`` and ``--threads``."""
    group = parser.add_argument_group("scale-out")
    group.add_argument("--shard", default=None, metavar="I/N",
                       help="score only job I of N (0-based), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads per process (default: cores split evenly among the processes of a machine)")




def read_input(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """The records named by ``--prompts`` or ``--dataset``, and the name of their source.

    Raises:
        CLIError: neither or both given, or an unreadable prompts file.
        InputError: a dataset that cannot be read (see :func:`tuco_lens.dataset_records.read_dataset`).
    """
    if (args.prompts is None) == (args.dataset is None):
        raise CLIError("give the prompts with --prompts FILE or --dataset NAME (one of them)")
    if args.prompts is not None:
        if args.split is not None or args.dataset_config is not None or args.field != "prompt":
            raise CLIError("--split, --field and --dataset-config go with --dataset, not --prompts")
        return read_prompt_records(args.prompts), str(args.prompts)
    from tuco_lens.dataset_records import read_dataset

    return read_dataset(args.dataset, split=args.split, field=args.field, config=args.dataset_config), args.dataset


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What changes the numbers of ``tuco-lens score``, as recorded next to ``--out``."""
    from tuco_lens import demo
    from tuco_lens.loading import resolve_dtype
    from tuco_lens.scoring_io import source_identity

    dtype = resolve_dtype(args.dtype)  # None: the loaders' float32
    pt, ft = (demo.PT_DIR, demo.FT_DIR) if args.demo else (args.pt, args.ft)
    settings = {
        "pt": source_identity(pt),
        "ft": source_identity(ft),
        "norm": args.norm,
        "chat_template": bool(args.chat_template),
        "dtype": "float32" if dtype is None else str(dtype).removeprefix("torch."),
    }
    if getattr(args, "per_token", False):
        settings["per_token"] = True
    return settings


def score_from_args(args: argparse.Namespace, records: list[dict[str, Any]], source: str):
    """Run :func:`tuco_lens.score_prompts` with the options of ``args`` (``--out`` required)."""
    from tuco_lens.scoring import score_prompts
    from tuco_lens.sharding import current_process

    if args.device is None:
        args.device = current_process().device  # cuda:LOCAL_RANK under torchrun; None alone
    return score_prompts(
        records, args.out, pair=lambda: load_pair_from_args(args), chat_template=args.chat_template,
        batch_size=args.batch_size, norm=args.norm, per_token=args.per_token, shard=args.shard,
        threads=args.threads, overwrite=args.overwrite, show_progress=not args.no_progress,
        settings=run_settings(args), source=source, log=lambda text: print(text, file=sys.stderr),
    )


def run(args: argparse.Namespace) -> int:
    from tuco_lens.scoring import as_records

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {args.batch_size}")
    records, source = read_input(args)
    try:
        as_records(records)  # field names that clash with output columns
    except InputError as error:
        raise CLIError(f"{source}: {error}") from error
    check_pair_arguments(args)
    if args.out is None:
        if args.overwrite:
            raise CLIError("--overwrite needs --out (without --out, CSV goes to standard output)")
        if args.shard is not None:
            raise CLIError("--shard needs --out (each job writes its part next to it)")
        return _score_to_stdout(args, records, source)
    result = score_from_args(args, records, source)
    if result.complete:
        print(f"wrote TuCo of {result.n_scored} prompts to {args.out}", file=sys.stderr)
    else:
        print(f"wrote TuCo of {result.n_scored} prompts to the parts of {args.out}", file=sys.stderr)
    return 0


def _score_to_stdout(args: argparse.Namespace, records: list[dict[str, Any]], source: str) -> int:
    from tuco_lens.scoring import PER_TOKEN_COLUMNS, check_prompts, score_batches
    from tuco_lens.scoring_io import RESULT_COLUMNS, encode_rows
    from tuco_lens.sharding import current_process

    if current_process().distributed:
        raise CLIError("several processes need --out (each writes its part next to it)")
    extra = list(dict.fromkeys(k for r in records for k in r if k != "prompt"))
    columns = [*RESULT_COLUMNS, "prompt", *extra, *(PER_TOKEN_COLUMNS if args.per_token else ())]
    pair = load_pair_from_args(args)
    everything = list(range(len(records)))
    check_prompts(pair, records, everything, chat_template=args.chat_template, source=source)
    header = True
    for rows in score_batches(pair, records, everything, chat_template=args.chat_template,
                              batch_size=args.batch_size, norm=args.norm, per_token=args.per_token):
        sys.stdout.write(encode_rows(rows, columns, "csv", header=header).decode("utf-8"))
        sys.stdout.flush()
        header = False
    return 0
