"""``tuco-lens score``: TuCo of every prompt in a file, streamed to CSV or JSONL, resumable."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from tuco_lens.analyses._common import read_jsonl
from tuco_lens.cli.common import COMMANDS, HELP_FORMATTER, CLIError, add_model_arguments, load_pair_from_args
from tuco_lens.inputs import length_sorted_batches

__all__ = ["add_parser", "read_prompts", "run", "ResultWriter", "InputOrder"]

_EPILOG = """\
input:  .txt   one prompt per line (blank lines are skipped; "line" records the line number)
        .jsonl one JSON object per line with a "prompt" field; other fields are kept
output: .csv or .jsonl (by extension; default: CSV on stdout), one row per prompt with
        index (0-based position among the prompts), tuco, n_tokens and the input fields.
        Rows are written in input order, each as soon as every earlier prompt is scored
        (prompts are processed longest first within chunks of 512 to cut padding), so an
        interrupted run resumes where it stopped: rerun the same command and the prompts
        already in --out are skipped.

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
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """Records with a ``prompt`` field from a .txt (one per line) or .jsonl file.

    Raises:
        CLIError: missing or unreadable file, unknown extension, bad JSON (with the line
            number), a record without a string ``prompt``, or no prompt at all.
    """
    if not path.is_file():
        raise CLIError(f"prompt file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"cannot read {str(path)!r}: {error}") from error
    records: list[dict[str, Any]] = []
    if path.suffix == ".txt":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append({"prompt": line, "line": number})
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


class ResultWriter:
    """Appends result rows to a CSV or JSONL file (or CSV on stdout) and knows which are done.

    Args:
        path: Output file, or ``None`` for stdout (no resuming).
        columns: Column order (CSV header).
    """

    def __init__(self, path: Path | None, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        self.format = "csv" if path is None else path.suffix.lstrip(".")
        if self.format not in ("csv", "jsonl"):
            raise CLIError(f"--out must end in .csv or .jsonl, got {str(path)!r}")
        self.done = self._existing_indices()
        self._stream: TextIO | None = None
        self._csv: Any = None

    def _existing_indices(self) -> set[int]:
        if self.path is None or not self.path.exists() or self.path.stat().st_size == 0:
            return set()
        try:
            with self.path.open(encoding="utf-8", newline="") as stream:
                if self.format == "csv":
                    reader = csv.DictReader(stream)
                    if reader.fieldnames != self.columns:
                        raise CLIError(
                            f"{str(self.path)!r} exists with columns {reader.fieldnames}, not "
                            f"{self.columns}: choose another --out or delete it"
                        )
                    return {int(row["index"]) for row in reader}
                return {int(json.loads(line)["index"]) for line in stream if line.strip()}
        except (ValueError, KeyError, TypeError) as error:
            raise CLIError(f"cannot resume from {str(self.path)!r} (unreadable row: {error})") from error

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows and flush them to disk."""
        if self._stream is None:
            fresh = self.path is None or not self.path.exists() or self.path.stat().st_size == 0
            self._stream = sys.stdout if self.path is None else self.path.open("a", encoding="utf-8", newline="")
            if self.format == "csv":
                self._csv = csv.DictWriter(self._stream, fieldnames=self.columns)
                if fresh:
                    self._csv.writeheader()
        for row in rows:
            if self.format == "csv":
                self._csv.writerow({k: _cell(row.get(k)) for k in self.columns})
            else:
                self._stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stdout:
            self._stream.close()


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


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


_RESERVED = ("index", "tuco", "n_tokens")
_CHUNK = 512  # prompts tokenized at once (then sorted by length and batched)


def score_records(pair, records: list[dict[str, Any]], *, chat_template: bool, batch_size: int, norm: str,
                  skip: set[int], show_progress: bool) -> Iterator[list[dict[str, Any]]]:
    """TuCo of each record not in ``skip``, yielded batch by batch.

    Prompts are tokenized :data:`_CHUNK` at a time; within a chunk, batches are length-sorted
    (longest first) so little padding is computed.
    """
    if batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {batch_size}")
    todo = [i for i in range(len(records)) if i not in skip]
    bar = tqdm(total=len(todo), disable=not show_progress, desc="TuCo", unit="prompt")
    for start in range(0, len(todo), _CHUNK):
        chunk = todo[start : start + _CHUNK]
        batch = pair.tokenize([records[i]["prompt"] for i in chunk], chat_template=chat_template)
        for rows, _, sub in length_sorted_batches(batch, batch_size=batch_size):
            scores = pair.tuco(sub.tokens, attention_mask=sub.attention_mask, norm=norm)
            lengths = sub.attention_mask.sum(-1)
            out = []
            for j, row in enumerate(rows.tolist()):
                index = chunk[row]
                out.append({**records[index], "index": index, "tuco": float(scores[j]), "n_tokens": int(lengths[j])})
            bar.update(len(out))
            yield out
    bar.close()


def run(args: argparse.Namespace) -> int:
    records = read_prompts(args.prompts)
    clash = sorted({k for r in records for k in r if k in _RESERVED})
    if clash:
        raise CLIError(f"{args.prompts}: input fields {clash} clash with output columns; rename them")
    extra = list(dict.fromkeys(k for r in records for k in r if k != "prompt"))
    columns = ["index", "tuco", "n_tokens", "prompt", *extra]
    writer = ResultWriter(args.out, columns)
    if writer.done:
        print(f"resuming: {len(writer.done)} of {len(records)} prompts already in {args.out}", file=sys.stderr)
    if len(writer.done) >= len(records):
        return 0
    pair = load_pair_from_args(args)
    total = 0
    order = InputOrder([i for i in range(len(records)) if i not in writer.done])
    try:
        for rows in score_records(
            pair, records, chat_template=args.chat_template, batch_size=args.batch_size, norm=args.norm,
            skip=writer.done, show_progress=not args.no_progress,
        ):
            ready = order.release(rows)
            writer.write(ready)
            total += len(ready)
    finally:
        writer.close()
    if args.out is not None:
        print(f"wrote TuCo of {total} prompts to {args.out}", file=sys.stderr)
    return 0
