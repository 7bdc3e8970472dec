"""``tuco-lens score``: TuCo of every prompt in a file, streamed to CSV or JSONL, resumable."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tuco_lens.analyses._common import read_jsonl, read_lines
from tuco_lens.cli.common import (
    COMMANDS,
    HELP_FORMATTER,
    CLIError,
    add_model_arguments,
    check_pair_arguments,
    load_pair_from_args,
)
from tuco_lens.errors import InputError, TuCoWarning
from tuco_lens.scoring_io import (
    RESULT_COLUMNS,
    ResumableOutput,
    RunRecord,
    check_output_file,
    encode_rows,
    source_identity,
)

__all__ = ["add_parser", "read_prompts", "check_prompts", "score_records", "run_settings", "run", "InputOrder"]

_EPILOG = """\
input:  .txt   one prompt per line (blank lines are skipped; "line" records the line number)
        .jsonl one JSON object per line with a "prompt" field; other fields are kept
output: .csv or .jsonl (by extension; default: CSV on stdout), one row per prompt with
        index (0-based position among the prompts), tuco, n_tokens and the input fields.
        Rows are written as each batch finishes (prompts are processed longest first to cut
        padding), so an interrupted run resumes where it stopped: rerun the same command and
        the prompts already in --out are skipped. OUT.run.json records what OUT was computed
        with (prompts, models, --norm, --chat-template, --dtype, tuco_lens version); a rerun
        with anything else is refused (use a new --out, or --overwrite). A torn last row (full
        disk, kill) is cut and scored again; OUT.lock keeps a second writer out.
        CSV cells starting with = + - @ get a leading ' so spreadsheets show them as text.

examples:
  tuco-lens score --pt meta-llama/Llama-2-7b-hf --ft meta-llama/Llama-2-7b-chat-hf \\
      --prompts requests.jsonl --chat-template --batch-size 16 --dtype bfloat16 --out scores.csv
  tuco-lens score --demo --prompts prompts.txt --out scores.jsonl
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "score",
        help=COMMANDS["score"],
        description="Compute TuCo (the paper's score, at each prompt's last token) for a file of prompts.",
        epilog=_EPILOG,
        formatter_class=HELP_FORMATTER,
    )
    add_model_arguments(parser)
    parser.add_argument("--prompts", required=True, type=Path, help="a .txt or .jsonl file of prompts")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the fine-tuned chat template")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    parser.add_argument("--norm", choices=("l1", "l2"), default="l1", help="norm (default l1, the paper's)")
    parser.add_argument("--out", type=Path, default=None, help="output .csv or .jsonl (default: CSV on stdout)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="discard an existing --out and start again (default: resume it, if it was computed the same way)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """Records with a ``prompt`` field from a .txt (one per line) or .jsonl file.

    A ``.txt`` line ends at ``\n`` only (U+2028 and other Unicode separators stay in their
    prompt, so ``line`` is the line an editor shows), and a UTF-8 byte-order mark is dropped.

    Raises:
        CLIError: missing or unreadable file, unknown extension, bad JSON (with the line
            number), a record without a string ``prompt``, or no prompt at all.
    """
    if not path.is_file():
        raise CLIError(f"prompt file {str(path)!r} does not exist")
    try:
        path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"cannot read {str(path)!r}: {error}") from error
    records: list[dict[str, Any]] = []
    if path.suffix == ".txt":
        records = [{"prompt": line, "line": number} for number, line in read_lines(path)]
    elif path.suffix == ".jsonl":
        records = read_jsonl(path, ["prompt"])
        for number, record in enumerate(records):
            if not isinstance(record["prompt"], str):
                raise CLIError(f'{path}: record {number + 1}: the "prompt" field must be a string')
    else:
        raise CLIError(f"{str(path)!r}: unknown extension {path.suffix!r}; use .txt or .jsonl")
    if not records:
        raise CLIError(f"{str(path)!r} contains no prompt")
    return records


class InputOrder:
    """Holds result rows back until every earlier prompt is done, then releases them in order.

    Batches finish in length-sorted order; rows leave in the order of ``indices`` (the input
    order), so the output file lines up with the input file. At most one chunk of rows is held.
    """

    def __init__(self, indices: list[int]) -> None:
        self._order, self._next, self._held = indices, 0, {}

    def release(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Take a batch of rows; return the rows now ready, in input order."""
        self._held.update((row["index"], row) for row in rows)
        ready = []
        while self._next < len(self._order) and self._order[self._next] in self._held:
            ready.append(self._held.pop(self._order[self._next]))
            self._next += 1
        return ready


_CHUNK = 512  # prompts tokenized at once (then sorted by length and batched)


def check_prompts(pair, records: list[dict[str, Any]], *, chat_template: bool, source: Path) -> None:
    """Tokenize every prompt once before scoring, so a bad one stops the run before any row is written.

    Raises:
        CLIError: naming the prompt (its line or record number) and what is wrong with it.
    """
    for start in range(0, len(records), _CHUNK):
        chunk = records[start : start + _CHUNK]
        try:
            pair.tokenize([r["prompt"] for r in chunk], chat_template=chat_template)
        except InputError:
            for offset, record in enumerate(chunk):
                try:
                    pair.tokenize(record["prompt"], chat_template=chat_template)
                except InputError as error:
                    where = f"line {record['line']}" if "line" in record else f"record {start + offset + 1}"
                    raise CLIError(f"{source}: {where}: {error}") from error
            raise


def score_records(pair, records: list[dict[str, Any]], *, chat_template: bool, batch_size: int, norm: str,
                  skip: set[int], show_progress: bool) -> Iterator[list[dict[str, Any]]]:
    """TuCo of each record not in ``skip``, yielded in input order as batches finish.

    Prompts are tokenized :data:`_CHUNK` at a time; within a chunk, batches are length-sorted
    (longest first) so little padding is computed, and :class:`InputOrder` holds rows back until
    every earlier prompt is done.
    """
    from tuco_lens.inputs import length_sorted_batches

    todo = [i for i in range(len(records)) if i not in skip]
    order = InputOrder(todo)
    bar = tqdm(total=len(todo), disable=not show_progress, desc="TuCo", unit="prompt")
    for start in range(0, len(todo), _CHUNK):
        chunk = todo[start : start + _CHUNK]
        with warnings.catch_warnings():  # given once, by check_prompts
            warnings.simplefilter("ignore", TuCoWarning)
            batch = pair.tokenize([records[i]["prompt"] for i in chunk], chat_template=chat_template)
        for rows, _, sub in length_sorted_batches(batch, batch_size=batch_size):
            scores = pair.tuco(sub.tokens, attention_mask=sub.attention_mask, norm=norm)
            lengths = sub.attention_mask.sum(-1)
            out = []
            for j, row in enumerate(rows.tolist()):
                index = chunk[row]
                out.append({**records[index], "index": index, "tuco": float(scores[j]), "n_tokens": int(lengths[j])})
            bar.update(len(out))
            ready = order.release(out)
            if ready:
                yield ready
    bar.close()


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What changes the numbers of ``tuco-lens score``, as recorded next to ``--out``."""
    from tuco_lens import demo
    from tuco_lens.loading import resolve_dtype

    dtype = resolve_dtype(args.dtype)  # None: the loaders' float32
    pt, ft = (demo.PT_DIR, demo.FT_DIR) if args.demo else (args.pt, args.ft)
    return {
        "pt": source_identity(pt),
        "ft": source_identity(ft),
        "norm": args.norm,
        "chat_template": bool(args.chat_template),
        "dtype": "float32" if dtype is None else str(dtype).removeprefix("torch."),
    }


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {args.batch_size}")
    records = read_prompts(args.prompts)
    clash = sorted({k for r in records for k in r if k in RESULT_COLUMNS})
    if clash:
        raise CLIError(f"{args.prompts}: input fields {clash} clash with output columns; rename them")
    check_pair_arguments(args)
    if args.out is None:
        if args.overwrite:
            raise CLIError("--overwrite needs --out (without --out, CSV goes to standard output)")
        return _score_to_stdout(args, records)
    path = check_output_file(args.out, inputs=[args.prompts])
    run_record = RunRecord.for_run(run_settings(args), records)
    with ResumableOutput(path, records, run_record, overwrite=args.overwrite) as out:
        for note in out.notes:
            print(f"note: {note}", file=sys.stderr)
        if out.done:
            print(f"resuming: {len(out.done)} of {len(records)} prompts already in {args.out}", file=sys.stderr)
        if len(out.done) >= len(records):
            return 0
        pair = load_pair_from_args(args)
        check_prompts(pair, records, chat_template=args.chat_template, source=args.prompts)
        total = 0
        for rows in score_records(
            pair, records, chat_template=args.chat_template, batch_size=args.batch_size, norm=args.norm,
            skip=set(out.done), show_progress=not args.no_progress,
        ):
            out.append(rows)
            total += len(rows)
    print(f"wrote TuCo of {total} prompts to {args.out}", file=sys.stderr)
    return 0


def _score_to_stdout(args: argparse.Namespace, records: list[dict[str, Any]]) -> int:
    extra = list(dict.fromkeys(k for r in records for k in r if k != "prompt"))
    columns = [*RESULT_COLUMNS, "prompt", *extra]
    pair = load_pair_from_args(args)
    check_prompts(pair, records, chat_template=args.chat_template, source=args.prompts)
    header = True
    for rows in score_records(
        pair, records, chat_template=args.chat_template, batch_size=args.batch_size, norm=args.norm,
        skip=set(), show_progress=not args.no_progress,
    ):
        sys.stdout.write(encode_rows(rows, columns, "csv", header=header).decode("utf-8"))
        sys.stdout.flush()
        header = False
    return 0
