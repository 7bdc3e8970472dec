"""Score a prompt set to a file, alone or data-parallel: ``tuco_lens.score_prompts`` (``tuco-lens score``).

One process scores every prompt and writes ``--out`` (CSV or JSONL) batch by batch, resumable,
exactly as :mod:`tuco_lens.scoring_io` promises. Several processes (``torchrun`` /
``accelerate launch`` ranks, ``--shard i/N`` jobs of a SLURM array, or both) each take a
**contiguous** part of the prompts (:mod:`tuco_lens.sharding`: no padding rows, no duplicates)
and write it to its own part file ``OUT.parts/part-START-STOP.jsonl``, keyed by the global row
index, under the same checked resume and lock. When every part is complete, one process merges
them into ``--out`` **in input order** (rank 0 under ``torchrun``; under ``--shard``, the job
that finishes last, or any rerun) and removes the parts. Parquet output (``.parquet``) always
goes through a part and is written in row groups, so memory stays bounded.

Example:
    >>> result = score_prompts(["How do I bake bread?", "The history of Rome"], "scores.jsonl",
    ...                        pt="meta-llama/Llama-2-7b-hf", ft="meta-llama/Llama-2-7b-chat-hf",
    ...                        chat_template=True, dtype="bfloat16")  # doctest: +SKIP
    >>> result = score_prompts(["hello , describe the doomsalt .", "where is norvik ?"], "scores.jsonl",
    ...                        pt=demo.PT_DIR, ft=demo.FT_DIR, chat_template=True)
    >>> result.to_dataframe()[["index", "tuco"]].round(3)
       index   tuco
    0      0  0.559
    1      1  0.334
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd

from tuco_lens.errors import (
    InputError,
    InputTypeError,
    OutputError,
    OutputLockedError,
    ResumeMismatchError,
    TuCoWarning,
)
from tuco_lens.scoring_io import (
    RESULT_COLUMNS,
    OutputLock,
    ResumableOutput,
    RunRecord,
    check_output_file,
    encode_rows,
    source_identity,
)
from tuco_lens.sharding import ProcessInfo, Shard, current_process, layout, parse_shard, split_threads
from tuco_lens.validation import check_size

if TYPE_CHECKING:
    from tuco_lens.pair import TuCoPair

__all__ = [
    "PER_TOKEN_COLUMNS",
    "SCORE_SUFFIXES",
    "ScoringResult",
    "score_prompts",
    "score_batches",
    "InputOrder",
    "check_prompts",
    "as_records",
    "read_scores",
    "parts_dir",
]

#: The columns ``per_token=True`` adds: the scored tokens and the per-token TuCo at each.
PER_TOKEN_COLUMNS = ("tokens", "tuco_per_token")
#: The output formats of :func:`score_prompts`, by extension.
SCORE_SUFFIXES = (".csv", ".jsonl", ".parquet")
#: Prompts tokenized at once (then sorted by length and batched).
CHUNK = 512
_POLL_SECONDS = 0.1


# ------------------------------------------------------------------------------ records
def as_records(prompts: Sequence[str] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Prompts as records with a string ``prompt`` field (other fields are kept, in order).

    Raises:
        InputTypeError: a prompt that is not a string, or a record without a string ``prompt``.
        InputError: no prompt at all, or a field named like an output column.

    Example:
        >>> as_records(["a", {"prompt": "b", "set": "chat"}])
        [{'prompt': 'a'}, {'prompt': 'b', 'set': 'chat'}]
    """
    if isinstance(prompts, (str, bytes)):
        raise InputTypeError("prompts must be a list of strings or records, not one string: wrap it in a list")
    records = []
    for number, item in enumerate(prompts):
        record = {"prompt": item} if isinstance(item, str) else dict(item) if isinstance(item, Mapping) else None
        if record is None or not isinstance(record.get("prompt"), str):
            raise InputTypeError(
                f"prompt {number} must be a string or a mapping with a string 'prompt' field, got {type(item).__name__}"
            )
        records.append(record)
    if not records:
        raise InputError("no prompt to score: the list is empty")
    taken = [*RESULT_COLUMNS, *PER_TOKEN_COLUMNS]
    clash = sorted({k for r in records for k in r if k in taken})
    if clash:
        raise InputError(f"input fields {clash} clash with output columns {taken}; rename them")
    return records


def check_prompts(pair, records: Sequence[Mapping[str, Any]], indices: Sequence[int], *, chat_template: bool,
                  source: str | os.PathLike | None = None) -> None:
    """Tokenize the prompts at ``indices`` once before scoring, so a bad one stops the run before any row.

    Raises:
        InputError: naming the prompt (its ``line`` if the record has one, else its record
            number) and what is wrong with it.
    """
    where_from = f"{source}: " if source is not None else ""
    for start in range(0, len(indices), CHUNK):
        chunk = indices[start : start + CHUNK]
        try:
            pair.tokenize([records[i]["prompt"] for i in chunk], chat_template=chat_template)
        except InputError:
            for index in chunk:
                try:
                    pair.tokenize(records[index]["prompt"], chat_template=chat_template)
                except InputError as error:
                    record = records[index]
                    where = f"line {record['line']}" if "line" in record else f"record {index + 1}"
                    raise InputError(f"{where_from}{where}: {error}") from error
            raise


class InputOrder:
    """Holds result rows back until every earlier prompt is done, then releases them in order.

    Batches finish in length-sorted order; rows leave in the order of ``indices`` (the input
    order), so an output file lines up with its input file. At most one chunk of rows is held.

    Example:
        >>> order = InputOrder([0, 1, 2])
        >>> order.release([{"index": 1}]), order.release([{"index": 0}])
        ([], [{'index': 0}, {'index': 1}])
    """

    def __init__(self, indices: Sequence[int]) -> None:
        self._order, self._next, self._held = list(indices), 0, {}

    def release(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Take a batch of rows; return the rows now ready, in input order."""
        self._held.update((row["index"], row) for row in rows)
        ready = []
        while self._next < len(self._order) and self._order[self._next] in self._held:
            ready.append(self._held.pop(self._order[self._next]))
            self._next += 1
        return ready


def score_batches(pair, records: Sequence[Mapping[str, Any]], indices: Sequence[int], *, chat_template: bool,
                  batch_size: int, norm: str = "l1", per_token: bool = False) -> Iterator[list[dict[str, Any]]]:
    """TuCo of the records at ``indices``, yielded batch by batch in the order of ``indices``.

    Prompts are tokenized :data:`CHUNK` at a time; within a chunk, batches are length-sorted
    (longest first) so little padding is computed, and :class:`InputOrder` holds rows back until
    every earlier prompt is done. Each row is the record with ``index`` (its
    position in ``records``), ``tuco`` and ``n_tokens`` added; with ``per_token`` (which runs
    :meth:`~tuco_lens.TuCoPair.decompose`, about twice the cost of :meth:`~tuco_lens.TuCoPair.tuco`)
    also ``tokens`` (the token strings scored, chat template included) and ``tuco_per_token``.

    Example:
        >>> records = [{"prompt": p} for p in prompts]
        >>> for rows in score_batches(pair, records, range(len(records)), chat_template=True, batch_size=1):
        ...     print([(row["index"], round(row["tuco"], 3)) for row in rows])
        [(0, 0.559), (1, 0.409)]
    """
    from tuco_lens.inputs import length_sorted_batches

    indices = list(indices)
    order = InputOrder(indices)
    for start in range(0, len(indices), CHUNK):
        chunk = indices[start : start + CHUNK]
        with warnings.catch_warnings():  # given once, by check_prompts
            warnings.simplefilter("ignore", TuCoWarning)
            batch = pair.tokenize([records[i]["prompt"] for i in chunk], chat_template=chat_template)
        for rows, _, sub in length_sorted_batches(batch, batch_size=batch_size):
            lengths = sub.attention_mask.sum(-1).tolist()
            if per_token:
                dec = pair.decompose(sub.tokens, attention_mask=sub.attention_mask, norm=norm)
                scores = dec.tuco.tolist()
                mask = dec.attention_mask.bool().tolist()
                per_token_values = dec.tuco_per_token.tolist()
            else:
                scores = pair.tuco(sub.tokens, attention_mask=sub.attention_mask, norm=norm).tolist()
            out = []
            for j, row in enumerate(rows.tolist()):
                index = chunk[row]
                result = {**records[index], "index": index, "tuco": float(scores[j]), "n_tokens": int(lengths[j])}
                if per_token:
                    real = [p for p, keep in enumerate(mask[j]) if keep]
                    result["tokens"] = [dec.str_tokens[j][p] for p in real]
                    result["tuco_per_token"] = [float(per_token_values[j][p]) for p in real]
                out.append(result)
            ready = order.release(out)
            if ready:
                yield ready


# ------------------------------------------------------------------------------ the result
@dataclass
class ScoringResult:
    """What one call of :func:`score_prompts` did, in this process.

    Attributes:
        out: The output file (``None``: rows kept in :attr:`rows`).
        n_prompts: Prompts of the whole run.
        part: The prompts this process was responsible for (``range(n_prompts)`` alone).
        n_scored: Prompts scored by this call (those already in the output are skipped).
        seconds: Time spent scoring them (after loading the models and checking the prompts).
        complete: ``out`` holds every prompt (merged, when the run has parts).
        rank: This process's rank; ``world_size``: processes in its job.
        notes: What happened on the way (resumes, repairs, merges), one line each.
        rows: With ``out=None``: the rows, in input order.
    """

    out: Path | None
    n_prompts: int
    part: range
    n_scored: int = 0
    seconds: float = 0.0
    complete: bool = False
    rank: int = 0
    world_size: int = 1
    notes: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] | None = None

    @property
    def prompts_per_second(self) -> float:
        """``n_scored / seconds`` (0 when nothing was scored)."""
        return self.n_scored / self.seconds if self.seconds > 0 else 0.0

    def to_dataframe(self) -> pd.DataFrame:
        """The scores, one row per prompt in input order (read from :attr:`out`, or :attr:`rows`).

        Raises:
            OutputError: the output is not complete yet (another part is still being scored).
        """
        if self.rows is not None:
            return pd.DataFrame(self.rows)
        if not self.complete or self.out is None:
            raise OutputError(
                f"{self.out} is not complete yet: its other parts are still being scored; read it "
                "when the last process has finished (or rerun any of them to merge)"
            )
        return read_scores(self.out)


def read_scores(path: str | os.PathLike) -> pd.DataFrame:
    """A score table (``.csv``, ``.jsonl`` or ``.parquet``, as written by ``tuco-lens score``), sorted by ``index``.

    CSV cells that ``tuco-lens score`` escaped for spreadsheets (a leading ``'``) are read back as
    written; lists (``tokens``, ``tuco_per_token``) are decoded from their JSON text.

    Raises:
        OutputError: a missing file or an unknown extension.

    Example:
        >>> result = score_prompts(demo.prompt_sets()["web"][:4], "scores.parquet", pair=pair)
        >>> read_scores("scores.parquet").nlargest(2, "tuco")[["index", "tuco"]].round(3)
           index   tuco
        2      2  0.223
        0      0  0.219
    """
    path = Path(path)
    if not path.is_file():
        raise OutputError(f"score file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        for column in PER_TOKEN_COLUMNS:
            if column in frame:
                frame[column] = frame[column].map(list)
    elif path.suffix == ".jsonl":
        # pandas documents dtype=False (keep the values as read); its annotation omits bool.
        frame = pd.read_json(path, lines=True, dtype=False)  # pyright: ignore[reportArgumentType]
    elif path.suffix == ".csv":
        frame = pd.read_csv(path, keep_default_na=False, na_values={"tuco": ["nan", "NaN", ""]},
                            dtype={"prompt": str})
        for column in PER_TOKEN_COLUMNS:
            if column in frame:
                frame[column] = frame[column].map(json.loads)
    else:
        raise OutputError(f"{str(path)!r}: a score file ends in .csv, .jsonl or .parquet")
    if "index" not in frame or "tuco" not in frame:
        raise OutputError(f"{str(path)!r} is not a score table: it has no 'index' and 'tuco' columns")
    return frame.sort_values("index", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------ parts
def parts_dir(out: str | os.PathLike) -> Path:
    """The directory of the part files of ``out`` (``OUT.parts``)."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _part_path(out: Path, rows: range) -> Path:
    return parts_dir(out) / f"part-{rows.start:010d}-{rows.stop:010d}.jsonl"


def _part_ranges_on_disk(out: Path) -> dict[Path, range]:
    found = {}
    directory = parts_dir(out)
    if directory.is_dir():
        for path in sorted(directory.glob("part-*-*.jsonl")):
            try:
                _, start, stop = path.stem.split("-")
                found[path] = range(int(start), int(stop))
            except ValueError:
                continue
    return found


def _part_record(settings: Mapping[str, Any], records, rows: range) -> RunRecord:
    return RunRecord.for_run({**settings, "part": [rows.start, rows.stop]}, records)


def _count_rows(path: Path, start: int = 0) -> tuple[int, int]:
    """``(complete lines, bytes read)`` of ``path`` from byte ``start`` on (0, start if it is missing)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
    except FileNotFoundError:
        return 0, start
    end = data.rfind(b"\n") + 1
    return data[:end].count(b"\n"), start + end


def _rows_in(path: Path) -> int:
    """Rows of a score table (CSV records after the header, JSONL lines, Parquet rows)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix == ".jsonl":
        return _count_rows(path)[0]
    import csv

    with open(path, encoding="utf-8", newline="") as handle:
        return max(sum(1 for _ in csv.reader(handle)) - 1, 0)


def _being_written(path: Path) -> bool:
    """Whether a live process holds ``path``'s lock (a lock left by a dead one is free)."""
    try:
        with OutputLock(path):
            return False
    except OutputLockedError:
        return True


# ------------------------------------------------------------------------------ the API
def score_prompts(
    prompts: Sequence[str] | Sequence[Mapping[str, Any]],
    out: str | os.PathLike | None = None,
    *,
    pt: Any = None,
    ft: Any = None,
    pair: Any = None,
    chat_template: bool = False,
    batch_size: int = 8,
    norm: str = "l1",
    per_token: bool = False,
    dtype: Any = None,
    device: str | None = None,
    shard: str | Shard | tuple[int, int] | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    row_group_size: int = 10_000,
    settings: Mapping[str, Any] | None = None,
    source: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> ScoringResult:
    """TuCo of every prompt, written to ``out``; data-parallel under ``torchrun`` and with ``shard``.

    Alone, a ``.csv`` / ``.jsonl`` ``out`` is written batch by batch and resumed when rerun. Run
    as several processes (``torchrun``, ``accelerate launch``) and/or as job ``i/N`` of an array,
    each process scores its contiguous part into ``OUT.parts/`` (resumable, locked, checked), and
    the parts are merged into ``out`` in input order once all are complete. ``docs/scale-out.md``
    tells the whole story (devices, threads, Parquet row groups, who merges).

    Args:
        prompts: Strings, or records with a string ``prompt`` field (other fields are kept).
        out: ``.csv``, ``.jsonl`` or ``.parquet``; ``None`` keeps the rows in memory
            (:attr:`ScoringResult.rows`; one process only).
        pt: The pre-trained model (anything :func:`~tuco_lens.load_pair` takes), loaded only if
            there is something to score.
        ft: The fine-tuned model.
        pair: Instead of ``pt``/``ft``: a :class:`~tuco_lens.TuCoPair`, or a function returning
            one (called only if needed); ``pt``/``ft`` given too only name the models.
        chat_template: Wrap prompts in the fine-tuned chat template.
        batch_size: Prompts per forward pass.
        norm: ``"l1"`` (the paper's) or ``"l2"``.
        per_token: Also store ``tokens`` and ``tuco_per_token`` (about twice the cost).
        dtype: Dtype of both models (``pt``/``ft`` only).
        device: Device of both models (``pt``/``ft`` only); default ``cuda:LOCAL_RANK`` under
            ``torchrun``, else the loaders' choice.
        shard: ``"i/N"``: score only job ``i`` of ``N`` (e.g. a SLURM array task).
        threads: CPU threads of this process (default: cores split evenly among the processes).
        overwrite: Discard an existing output (and its parts) and start again.
        show_progress: Progress bars (rate, ETA) on every process; rank 0 also shows the total.
        row_group_size: Rows per Parquet row group.
        settings: What the run record stores (default: the models'
            :func:`~tuco_lens.scoring_io.source_identity`, ``norm``, ``chat_template``, ``dtype``).
        source: The input file, for error messages and so that ``out`` cannot overwrite it.
        log: Where notes go (e.g. ``print``); default nowhere (they are in the result).

    Returns:
        A :class:`ScoringResult` (:meth:`~ScoringResult.to_dataframe` reads the scores).

    Raises:
        InputError: a bad prompt (named by record or line), shard or option. ResumeMismatchError:
            ``out`` (or a part) was computed with other prompts or settings. OutputLockedError:
            another process writes it. OutputError: an unusable ``out``, or an unfinished part.

    Example:
        >>> # torchrun --nproc_per_node=4 score.py  (each rank runs the same line)
        >>> records = [{"prompt": p} for p in demo.prompt_sets()["web"][:4]]
        >>> result = score_prompts(records, "scores.parquet", pair=pair)
        >>> # a SLURM array task: shard=f"{os.environ['SLURM_ARRAY_TASK_ID']}/{os.environ['SLURM_ARRAY_TASK_COUNT']}"
        >>> result = score_prompts(records, "scores.csv", pair=pair, shard="1/2")
        >>> Path("scores.csv").exists()          # waits for the other part
        False
        >>> result = score_prompts(records, "scores.csv", pair=pair, shard="0/2")   # the last one merges
        >>> read_scores("scores.csv")["index"].tolist()
        [0, 1, 2, 3]
    """
    records = as_records(prompts)
    check_size(batch_size, "batch_size", optional=False)
    check_size(row_group_size, "row_group_size", optional=False)
    if pair is None and (pt is None or ft is None):
        raise InputError("give the models: pt=... and ft=..., or pair=... (a TuCoPair or a function returning one)")
    shard = parse_shard(shard)
    process = current_process()
    split_threads(process, threads)
    job = _Job(records, pt, ft, pair, chat_template, batch_size, norm, per_token, dtype,
               device if device is not None else process.device, show_progress, source, log or (lambda _: None))
    job.settings = dict(settings) if settings is not None else job.default_settings()
    if per_token and settings is not None:
        job.settings.setdefault("per_token", True)
    if out is None:
        if process.distributed or shard.count > 1:
            raise InputError("a run split over processes or shards needs out=... (each part is written to a file)")
        return job.in_memory()
    path = check_output_file(out, inputs=[source] if source is not None else [], suffixes=SCORE_SUFFIXES)
    run = RunRecord.for_run(job.settings, records)
    if not process.distributed and shard.count == 1 and path.suffix != ".parquet":
        return job.direct(path, run, overwrite)
    return job.parted(path, run, shard, process, overwrite, row_group_size)


class _Job:
    """One call of :func:`score_prompts`: the records, the options and the pair (loaded on demand)."""

    def __init__(self, records, pt, ft, pair, chat_template, batch_size, norm, per_token, dtype, device,
                 show_progress, source, log) -> None:
        self.records, self.pt, self.ft, self._pair = records, pt, ft, pair
        self.chat_template, self.batch_size, self.norm, self.per_token = chat_template, batch_size, norm, per_token
        self.dtype, self.device, self.show_progress, self.source, self.log = dtype, device, show_progress, source, log
        self.computed = PER_TOKEN_COLUMNS if per_token else ()
        self.settings: dict[str, Any] = {}

    def default_settings(self) -> dict[str, Any]:
        from tuco_lens.loading import resolve_dtype

        if self.pt is not None and self.ft is not None:
            pt, ft = source_identity(self.pt), source_identity(self.ft)
        else:
            pair = self.pair()
            pt, ft = pair.pt.cfg.model_name, pair.ft.cfg.model_name
        dtype = resolve_dtype(self.dtype)
        settings = {
            "pt": pt,
            "ft": ft,
            "norm": self.norm,
            "chat_template": bool(self.chat_template),
            "dtype": "float32" if dtype is None else str(dtype).removeprefix("torch."),
        }
        if self.per_token:
            settings["per_token"] = True
        return settings

    def pair(self) -> TuCoPair:
        """The pair given, the one the given function returns (called once), or one loaded."""
        if self._pair is None:
            from tuco_lens.loading import load_pair

            self._pair = load_pair(self.pt, self.ft, device=self.device, dtype=self.dtype)
        elif callable(self._pair) and not hasattr(self._pair, "tuco"):
            self._pair = self._pair()
        return cast("TuCoPair", self._pair)  # `pair=` takes a TuCoPair or any object with its methods

    # -- scoring ---------------------------------------------------------------------
    def score(self, todo: list[int], write: Callable[[list[dict[str, Any]]], None], desc: str,
              result: ScoringResult, on_batch: Callable[[], None] = lambda: None) -> None:
        if not todo:
            return
        from tqdm.auto import tqdm

        pair = self.pair()
        check_prompts(pair, self.records, todo, chat_template=self.chat_template, source=self.source)
        bar = tqdm(total=len(todo), disable=not self.show_progress, desc=desc, unit="prompt",
                   position=result.rank + (1 if result.world_size > 1 or result.rank else 0), leave=True)
        started = time.perf_counter()
        try:
            for rows in score_batches(pair, self.records, todo, chat_template=self.chat_template,
                                      batch_size=self.batch_size, norm=self.norm, per_token=self.per_token):
                write(rows)
                result.n_scored += len(rows)
                bar.update(len(rows))
                on_batch()
        finally:
            result.seconds += time.perf_counter() - started
            bar.close()

    def in_memory(self) -> ScoringResult:
        n = len(self.records)
        result = ScoringResult(None, n, range(n), rows=[])
        collected: list[dict[str, Any]] = []
        self.score(list(range(n)), collected.extend, "TuCo", result)
        result.rows = sorted(collected, key=lambda row: row["index"])
        result.complete = True
        return result

    def _note(self, result: ScoringResult, text: str) -> None:
        result.notes.append(text)
        self.log(text)

    # -- one process, one file: as before ----------------------------------------------
    def direct(self, path: Path, run: RunRecord, overwrite: bool) -> ScoringResult:
        n = len(self.records)
        result = ScoringResult(path, n, range(n))
        stale = parts_dir(path)
        if stale.is_dir():
            if not overwrite:
                raise ResumeMismatchError(
                    f"{str(stale)!r} holds the parts of an unfinished run split over several processes or "
                    f"shards: rerun it the same way (same --shard count, same number of processes) to finish "
                    f"it, or pass --overwrite to start again with one process"
                )
            shutil.rmtree(stale)
        with ResumableOutput(path, self.records, run, overwrite=overwrite, computed_columns=self.computed) as output:
            for note in output.notes:
                self._note(result, f"note: {note}")
            if output.done:
                self._note(result, f"resuming: {len(output.done)} of {n} prompts already in {path}")
            todo = [i for i in range(n) if i not in output.done]
            self.score(todo, output.append, "TuCo", result)
        result.complete = True
        return result

    # -- parts ---------------------------------------------------------------------------
    def parted(self, path: Path, run: RunRecord, shard: Shard, process: ProcessInfo, overwrite: bool,
               row_group_size: int) -> ScoringResult:
        n = len(self.records)
        parts = layout(n, shard, process.world_size)
        mine = parts[shard.index * process.world_size + process.rank]
        result = ScoringResult(path, n, mine, rank=process.rank, world_size=process.world_size)
        wanted = {_part_path(path, rows) for rows in parts if len(rows)}
        merger = process.rank == 0
        if overwrite and (merger or not process.distributed):
            self._clear(path, wanted)
        if not overwrite:
            foreign = sorted(p for p in _part_ranges_on_disk(path) if p not in wanted)
            if foreign:
                raise ResumeMismatchError(
                    f"{str(parts_dir(path))!r} holds parts of a run split differently ({foreign[0].name}...): "
                    f"rerun it with the --shard count and number of processes it was started with, or pass "
                    f"--overwrite to start again"
                )
            self._check_other_parts(path, parts)
            if self._final_is_complete(path, run):
                self._note(result, f"{path} is complete ({n} prompts): nothing to do")
                result.complete = True
                return result
        parts_dir(path).mkdir(exist_ok=True)
        desc = f"TuCo part {shard.index * process.world_size + process.rank + 1}/{len(parts)}"
        output = (ResumableOutput(_part_path(path, mine), self.records, _part_record(self.settings, self.records, mine),
                                  overwrite=overwrite, computed_columns=self.computed) if len(mine) else None)
        progress = _TotalProgress(path, parts, self.show_progress and merger and len(parts) > 1)
        try:
            if output is not None:
                output.__enter__()
            if process.distributed:
                from accelerate import PartialState

                PartialState().wait_for_everyone()  # every rank holds its part's lock from here on
            if output is not None:
                for note in output.notes:
                    self._note(result, f"note: {output.path.name}: {note}")
                if output.done:
                    self._note(result, f"resuming: {len(output.done)} of {len(mine)} prompts already in {output.path}")
                todo = [i for i in mine if i not in output.done]
                self.score(todo, output.append, desc, result, on_batch=progress.update)
        finally:
            if output is not None:
                output.__exit__(None, None, None)
        if process.distributed and not merger:
            return result
        if process.distributed:
            progress.wait_for_parts()
        elif not self._parts_complete(path, parts):
            done = sum(1 for rows in parts if not len(rows) or self._part_complete(path, rows))
            self._note(result, f"part {mine.start}..{mine.stop - 1} is complete; {done} of {len(parts)} parts are: "
                               "the last job to finish merges them into the output (or rerun any job)")
            progress.close()
            return result
        progress.close()
        result.complete = self._merge(path, run, parts, row_group_size, result)
        return result

    def _clear(self, path: Path, keep: set[Path]) -> None:
        for stale in (path, path.with_name(path.name + ".run.json")):
            stale.unlink(missing_ok=True)
        for part in _part_ranges_on_disk(path):
            if part not in keep:
                for extra in (part, part.with_name(part.name + ".run.json")):
                    extra.unlink(missing_ok=True)

    def _check_other_parts(self, path: Path, parts: list[range]) -> None:
        """Refuse, before any model loads, to add a part to parts computed with other settings."""
        for rows in parts:
            record_path = _part_path(path, rows).with_name(_part_path(path, rows).name + ".run.json")
            if len(rows) and record_path.exists():
                changes = _part_record(self.settings, self.records, rows).changes_from(RunRecord.read(record_path))
                if changes:
                    raise ResumeMismatchError(
                        f"the part {record_path.name.removesuffix('.run.json')!r} of {str(path)!r} was computed with "
                        f"other prompts or settings than this run: {'; '.join(changes)}. The merged output would mix "
                        "rows of both; choose a new --out, or pass --overwrite to start again"
                    )

    def _final_is_complete(self, path: Path, run: RunRecord) -> bool:
        """Whether ``path`` holds every prompt with this run's settings; refuse other settings or a partial file.

        Read only, without the lock: every rank of a job can ask at once. A merged output is
        written whole (renamed into place), so its row count is what a reader needs.
        """
        if not path.exists() or path.stat().st_size == 0:
            return False
        record_path = path.with_name(path.name + ".run.json")
        if not record_path.exists():
            raise ResumeMismatchError(
                f"{str(path)!r} exists but {str(record_path)!r}, the record of what it was computed with, is "
                "missing; choose a new --out, or pass --overwrite to start again"
            )
        changes = run.changes_from(RunRecord.read(record_path))
        if changes:
            raise ResumeMismatchError(
                f"{str(path)!r} was computed with other prompts or settings than this run: {'; '.join(changes)}; "
                "choose a new --out, or pass --overwrite to start again"
            )
        rows = _rows_in(path)
        if rows != len(self.records):
            raise ResumeMismatchError(
                f"{str(path)!r} holds {rows} of {len(self.records)} prompts from an unfinished one-process "
                "run: resume it with one process (no --shard, no torchrun), or pass --overwrite"
            )
        return True

    def _part_complete(self, path: Path, rows: range) -> bool:
        part = _part_path(path, rows)
        return _count_rows(part)[0] >= len(rows) and not _being_written(part)

    def _parts_complete(self, path: Path, parts: list[range]) -> bool:
        return all(self._part_complete(path, rows) for rows in parts if len(rows))

    def _merge(self, path: Path, run: RunRecord, parts: list[range], row_group_size: int,
               result: ScoringResult) -> bool:
        try:
            lock = OutputLock(path).__enter__()
        except OutputLockedError:
            self._note(result, f"another process is merging the parts into {path}")
            return False
        try:
            if path.exists() and self._final_is_complete(path, run):
                return True
            _merge_parts(path, self.records, run, self.settings, parts, self.computed, row_group_size)
        finally:
            lock.__exit__(None, None, None)
        self._note(result, f"merged {sum(1 for p in parts if len(p))} parts into {path} ({len(self.records)} prompts, "
                           "input order)")
        return True


def _merge_parts(path: Path, records, run: RunRecord, settings, parts: list[range], computed, row_group_size: int) -> None:
    """Write every part's rows into ``path`` in input order (atomically), then remove the parts."""
    columns: list[str] | None = None
    offsets: list[tuple[Path, dict[int, tuple[int, int]]]] = []
    for rows in parts:
        if not len(rows):
            continue
        part = _part_path(path, rows)
        with ResumableOutput(part, records, _part_record(settings, records, rows), computed_columns=computed) as output:
            missing = [i for i in rows if i not in output.done]
            if missing or len(output.done) != len(rows):
                raise OutputError(
                    f"{str(part)!r} holds {len(output.done)} of its {len(rows)} prompts (first missing: index "
                    f"{missing[0] if missing else '?'}): rerun the same command to finish it"
                )
            columns = output.columns
        offsets.append((part, _row_offsets(part)))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer = _RowWriter(path.suffix, tmp, columns or [], records, computed)
        try:
            for part, index in offsets:
                with open(part, "rb") as handle:
                    batch: list[bytes] = []
                    for i in sorted(index):
                        offset, size = index[i]
                        handle.seek(offset)
                        batch.append(handle.read(size))
                        if len(batch) >= row_group_size:
                            writer.write(batch)
                            batch = []
                    if batch:
                        writer.write(batch)
        finally:
            writer.close()
        run.write(path.with_name(path.name + ".run.json"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    shutil.rmtree(parts_dir(path), ignore_errors=True)


def _row_offsets(part: Path) -> dict[int, tuple[int, int]]:
    """``index -> (byte offset, length)`` of every row of a (checked) JSONL part."""
    index, offset = {}, 0
    with open(part, "rb") as handle:
        for line in handle:
            if line.endswith(b"\n"):
                index[int(json.loads(line)["index"])] = (offset, len(line))
            offset += len(line)
    return index


class _RowWriter:
    """Rows (raw JSONL lines of the parts) appended to a merged output of one format."""

    def __init__(self, fmt: str, tmp: Path, columns: list[str], records, computed) -> None:
        self.fmt, self.columns = fmt, columns
        self.handle = open(tmp, "wb")
        self.header = True
        self.parquet = None
        if fmt == ".parquet":
            import pyarrow.parquet as pq

            self.schema = _parquet_schema(columns, records, computed)
            self.parquet = pq.ParquetWriter(self.handle, self.schema)

    def write(self, lines: list[bytes]) -> None:
        if self.fmt == ".jsonl":
            self.handle.write(b"".join(lines))
            return
        rows = [json.loads(line) for line in lines]
        if self.fmt == ".csv":
            self.handle.write(encode_rows(rows, self.columns, "csv", header=self.header))
            self.header = False
            return
        import pyarrow as pa

        try:
            table = pa.Table.from_pylist([{c: row.get(c) for c in self.columns} for row in rows], schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise OutputError(f"a field cannot be stored in Parquet with one type ({error}); write .jsonl instead") from error
        assert self.parquet is not None  # opened in __init__ for fmt ".parquet"
        self.parquet.write_table(table)

    def close(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def _parquet_schema(columns: list[str], records, computed):
    import pyarrow as pa

    fixed = {
        "index": pa.int64(), "tuco": pa.float64(), "n_tokens": pa.int64(), "prompt": pa.string(),
        "tokens": pa.list_(pa.string()), "tuco_per_token": pa.list_(pa.float64()),
    }
    fields = [c for c in columns if c not in fixed]
    inferred = {}
    if fields:
        try:
            inferred = {f.name: f.type for f in pa.Table.from_pylist([{c: r.get(c) for c in fields} for r in records]).schema}
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise OutputError(
                f"an input field holds values of different types ({error}), which one Parquet column cannot; "
                "write .jsonl or .csv instead"
            ) from error
    return pa.schema([(c, fixed.get(c) or inferred[c]) for c in columns])


class _TotalProgress:
    """Rank 0's bar over the whole run: rows written to every part file so far."""

    def __init__(self, out: Path, parts: list[range], show: bool) -> None:
        self.out, self.parts = out, [rows for rows in parts if len(rows)]
        self.read: dict[range, tuple[int, int]] = {}  # part -> (rows counted, bytes read)
        self.last = 0.0
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=sum(len(r) for r in self.parts), desc="TuCo total", unit="prompt", position=0)

    def _counts(self) -> list[int]:
        counts = []
        for rows in self.parts:
            part = _part_path(self.out, rows)
            seen, offset = self.read.get(rows, (0, 0))
            size = part.stat().st_size if part.exists() else 0
            if size < offset:  # a torn tail was cut: count again
                seen, offset = 0, 0
            more, offset = _count_rows(part, offset)
            self.read[rows] = (seen + more, offset)
            counts.append(min(seen + more, len(rows)))
        return counts

    def update(self, force: bool = False) -> None:
        if self.bar is not None and (force or time.monotonic() - self.last >= 1.0):
            self.last = time.monotonic()
            self.bar.n = sum(self._counts())
            self.bar.refresh()

    def wait_for_parts(self) -> None:
        """Wait until every part is complete; refuse a part whose process ended without finishing it."""
        while True:
            counts = self._counts()
            self.update(force=True)
            unfinished = [(rows, c) for rows, c in zip(self.parts, counts) if c < len(rows)]
            if not unfinished and not any(_being_written(_part_path(self.out, rows)) for rows in self.parts):
                return
            for rows, count in unfinished:
                part = _part_path(self.out, rows)
                if not _being_written(part) and _count_rows(part)[0] < len(rows):
                    raise OutputError(
                        f"the process scoring prompts {rows.start}..{rows.stop - 1} ended after {count} of "
                        f"{len(rows)} ({str(part)!r}); rerun the same command to resume every part"
                    )
            time.sleep(_POLL_SECONDS)

    def close(self) -> None:
        if self.bar is not None:
            self.update(force=True)
            self.bar.close()

