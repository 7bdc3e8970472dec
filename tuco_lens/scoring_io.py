"""Output files of scoring runs that resume safely: checked, locked, written batch by batch.

``tuco-lens score`` writes one row per prompt (``index``, ``tuco``, ``n_tokens`` and the
prompt's input fields) to a ``.csv`` or ``.jsonl`` file as batches finish, and resumes an
interrupted run. This module is everything about that file, and nothing about models:

* :func:`check_output_file` / :func:`check_output_dir`: refuse an output path that cannot be
  written (missing directory, a directory where a file is expected, no permission, the input
  file itself) before anything expensive runs.
* :class:`RunRecord`: what an output was computed with (the prompts' SHA-256, the models, norm,
  chat template, dtype, tuco_lens version), kept next to the output as ``OUT.run.json``.
* :class:`OutputLock`: ``OUT.lock``, held by one process at a time (a kernel lock, so a lock
  left by a killed process is detected as stale and taken over).
* :class:`ResumableOutput`: opens an output under the lock, checks every row already written
  against the prompts and the run record (a mismatch raises
  :class:`~tuco_lens.errors.ResumeMismatchError` naming what changed), cuts a torn or garbage
  tail back to the last complete row (and says so), and appends each batch with one write that
  is rolled back if the disk refuses part of it.

CSV cells that start with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return get a leading
``'`` (:func:`csv_cell`), so a spreadsheet shows the prompt as text instead of running it as a
formula. JSONL is written as is.

Example:
    >>> records = [{"prompt": "the cat"}, {"prompt": "a dog"}]
    >>> run = RunRecord.for_run({"norm": "l1"}, records)
    >>> with ResumableOutput(Path("scores.csv"), records, run) as out:
    ...     todo = [i for i in range(len(records)) if i not in out.done]
    ...     out.append([{**records[i], "index": i, "tuco": 0.5, "n_tokens": 7} for i in todo])
    >>> print(Path("scores.csv").read_text())
    index,tuco,n_tokens,prompt
    0,0.5,7,the cat
    1,0.5,7,a dog
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import os
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuco_lens.errors import OutputError, OutputLockedError, ResumeMismatchError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "RESULT_COLUMNS",
    "OUTPUT_SUFFIXES",
    "RunRecord",
    "OutputLock",
    "ResumableOutput",
    "check_output_file",
    "check_output_dir",
    "source_identity",
    "prompts_digest",
    "csv_cell",
    "encode_rows",
]

#: The columns every score table has, before the prompts' own fields.
RESULT_COLUMNS = ("index", "tuco", "n_tokens")
#: The file formats an output can have, by extension.
OUTPUT_SUFFIXES = (".csv", ".jsonl")
#: Version of the layout of ``OUT.run.json``.
RUN_RECORD_FORMAT = 1

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_OVERWRITE_HINT = "choose a new --out, or pass --overwrite to start again"


# ------------------------------------------------------------------------------ paths
def check_output_file(
    path: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike] = (),
    suffixes: Sequence[str] = OUTPUT_SUFFIXES,
) -> Path:
    """Validate an output file path before anything runs; return it as a ``Path``.

    Args:
        path: The output file (``.csv`` or ``.jsonl``).
        inputs: Input files the output must not overwrite.
        suffixes: The extensions accepted (``tuco_lens.scoring`` adds ``.parquet``).

    Raises:
        OutputError: an unknown extension, a directory, a missing or unwritable parent
            directory, or one of ``inputs``.

    Example:
        >>> check_output_file("scores.csv", inputs=["prompts.txt"])
        PosixPath('scores.csv')
    """
    path = Path(path).expanduser()
    if path.suffix not in suffixes:
        raise OutputError(f"--out must end in {' or '.join(suffixes)}, got {str(path)!r}")
    if path.is_dir():
        raise OutputError(f"--out {str(path)!r} is a directory; name a file in it, e.g. {str(path / 'scores.csv')!r}")
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(f"the directory of --out, {str(parent)!r}, {what}: create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"no permission to write {str(path)!r}; choose another --out")
    for source in inputs:
        if path.exists() and Path(source).exists() and path.resolve() == Path(source).resolve():
            raise OutputError(f"--out {str(path)!r} is the input file itself; choose another --out")
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create an output directory (with its parents) and check it is writable.

    Raises:
        OutputError: ``path`` (or a parent) exists and is not a directory, or cannot be
            created or written.

    Example:
        >>> check_output_dir("tuco-report")
        PosixPath('tuco-report')
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"the output directory {str(path)!r} exists and is a file; choose another --out or remove it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the output directory {str(path)!r}: {error}") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"no permission to write into {str(path)!r}; choose another --out")
    return path


# ------------------------------------------------------------------------------ what a run used
def source_identity(source: str | os.PathLike | None) -> str | dict[str, str] | None:
    """How a run records a model source: a local directory by absolute path and file fingerprint.

    The fingerprint hashes the names, sizes and modification times of the directory's files, so
    a checkpoint rewritten in place (a new training run saved to the same directory) does not
    pass for the old one. Other sources (hub ids, TransformerLens names) are kept as given.

    Example:
        >>> source_identity("gpt2")
        'gpt2'
    """
    if source is None:
        return None
    path = Path(source).expanduser()
    if not path.is_dir():
        return os.fspath(source)
    digest = hashlib.sha256()
    for item in sorted(path.iterdir()):
        if item.is_file() and not item.name.startswith("."):
            stat = item.stat()
            digest.update(f"{item.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"path": str(path.resolve()), "files": digest.hexdigest()[:16]}


def prompts_digest(records: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of the records in order (every field, canonical JSON): changes if one does.

    Example:
        >>> prompts_digest([{"prompt": "a"}]) == prompts_digest([{"prompt": "a"}])
        True
    """
    digest = hashlib.sha256()
    for record in records:
        digest.update(_canonical(record).encode("utf-8") + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class RunRecord:
    """What an output was computed with; stored next to it as ``OUT.run.json``.

    Attributes:
        settings: Everything that changes the numbers, by the name of its option (``pt``,
            ``ft``, ``norm``, ``chat_template``, ``dtype``...).
        prompts_sha256: :func:`prompts_digest` of the input records.
        n_prompts: Number of input records.
        tuco_lens_version: The version that wrote the output.
        format: Layout version of the record.
    """

    settings: dict[str, Any]
    prompts_sha256: str
    n_prompts: int
    tuco_lens_version: str
    format: int = RUN_RECORD_FORMAT

    @classmethod
    def for_run(cls, settings: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> RunRecord:
        """The record of a run of this tuco_lens over ``records`` with ``settings``."""
        from tuco_lens import __version__

        plain = json.loads(json.dumps(dict(settings)))  # plain JSON values, as read back
        return cls(plain, prompts_digest(records), len(records), __version__)

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        """Read ``path`` (an ``OUT.run.json``).

        Raises:
            OutputError: the file is not a run record.
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{f: data[f] for f in ("settings", "prompts_sha256", "n_prompts", "tuco_lens_version", "format")})
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise OutputError(f"{str(path)!r} is not a readable run record ({error}); {_OVERWRITE_HINT}") from error

    def write(self, path: Path) -> None:
        """Write ``path`` atomically (a temporary file renamed over it)."""
        _replace_atomically(path, (json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n").encode("utf-8"))

    def changes_from(self, old: RunRecord) -> list[str]:
        """What differs between ``old`` (the output's) and this run, one phrase each."""
        changes = []
        for key in sorted(set(old.settings) | set(self.settings)):
            before, now = old.settings.get(key), self.settings.get(key)
            if before != now:
                changes.append(_describe_change(key, before, now))
        if old.prompts_sha256 != self.prompts_sha256:
            changes.append(
                f"the prompts changed ({old.n_prompts} prompts when the output was started, "
                f"{self.n_prompts} now, different contents)"
            )
        if old.tuco_lens_version != self.tuco_lens_version:
            changes.append(f"tuco_lens was {old.tuco_lens_version}, now {self.tuco_lens_version}")
        return changes


def _describe_change(key: str, before: Any, now: Any) -> str:
    option = "--" + key.replace("_", "-")
    if isinstance(before, dict) and isinstance(now, dict) and before.get("path") == now.get("path"):
        return f"{option}: the files of {before['path']} changed since the output was started"
    return f"{option} was {_show(before)}, now {_show(now)}"


def _show(value: Any) -> str:
    if isinstance(value, dict) and "path" in value:
        return repr(value["path"])
    return repr(value)


# ------------------------------------------------------------------------------ encoding rows
def csv_cell(value: Any) -> str:
    """The text of one CSV cell: strings safe for spreadsheets, JSON for lists and dicts.

    A string starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading
    ``'`` (spreadsheets would otherwise run it as a formula).

    Example:
        >>> csv_cell("=HYPERLINK(1)"), csv_cell(0.25), csv_cell(None)
        ("'=HYPERLINK(1)", '0.25', '')
    """
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        return "'" + value if value.startswith(_FORMULA_START) else value
    return str(value)


def encode_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str, *, header: bool = False) -> bytes:
    """Rows as the bytes of a ``"csv"`` or ``"jsonl"`` file (CSV: optionally the header first).

    Example:
        >>> encode_rows([{"index": 0, "tuco": 0.5}], ["index", "tuco"], "csv", header=True)
        b'index,tuco\\r\\n0,0.5\\r\\n'
    """
    if fmt == "jsonl":
        text = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
        # U+2028 / U+2029 escaped, so that readers splitting lines on them (str.splitlines) see one row a line
        return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode("utf-8")
    text = io.StringIO()
    writer = csv.writer(text)
    if header:
        writer.writerow(columns)
    writer.writerows([csv_cell(row.get(k)) for k in columns] for row in rows)
    return text.getvalue().encode("utf-8")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


# ------------------------------------------------------------------------------ the lock
class OutputLock:
    """``OUT.lock``: one process at a time writes ``OUT``.

    A kernel lock (``flock``) is taken on the lock file, so it is released when the process
    ends however it ends; a lock file whose lock nobody holds was left by a process that died,
    and is taken over (:attr:`stale` then says whose it was). Without ``fcntl`` (Windows) the
    lock file's existence is the lock, and one left by a crash must be deleted by hand.

    Raises:
        OutputLockedError: another process holds the lock (the message names it).

    Example:
        >>> with OutputLock(Path("scores.csv")) as lock:
        ...     Path("scores.csv.lock").exists()
        True
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.stale: str | None = None
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        while self._fd is None:
            flags = os.O_RDWR | os.O_CREAT | (0 if fcntl is not None else os.O_EXCL)
            try:
                fd = os.open(self.lock_path, flags, 0o644)
            except FileExistsError:
                self._refuse(self.lock_path.read_text(errors="replace"), by_hand=True)
            except OSError as error:
                raise OutputError(f"cannot create the lock file {str(self.lock_path)!r}: {error}") from error
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.read(fd, 4096).decode("utf-8", "replace")
                    os.close(fd)
                    self._refuse(holder, by_hand=False)
                try:  # the holder before us may have removed the file after we opened it
                    same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            self._fd = fd
        previous = os.read(self._fd, 4096).decode("utf-8", "replace").strip()
        self.stale = _describe_holder(previous) if previous else None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, json.dumps(me).encode("utf-8"))
        return self

    def _refuse(self, holder: str, *, by_hand: bool) -> None:
        tail = (
            f"If no such process is running, delete {str(self.lock_path)!r}."
            if by_hand
            else "Wait for it to finish, or choose another --out."
        )
        raise OutputLockedError(
            f"{str(self.path)!r} is being written by another process ({_describe_holder(holder)}); "
            f"two writers would mix their rows. {tail}"
        )

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is None:
            return
        try:
            self.lock_path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "unknown process"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {str(path)!r}: {error}") from error


# ------------------------------------------------------------------------------ reading back
@dataclass
class _Scan:
    """What is in an existing output: its valid rows, and where its intact part ends."""

    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (line, row)
    end: int = 0  # bytes of header and complete rows
    bad_line: int | None = None  # first line of the damaged tail
    bad_reason: str = ""
    mismatched: list[str] = field(default_factory=list)  # rows that belong to other prompts


def _lines(data: bytes, start: int = 0, first_line: int = 1) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, end offset, raw line)`` for each ``\\n``-terminated piece of ``data[start:]``."""
    offset = start
    for number, raw in enumerate(io.BytesIO(data[start:]), start=first_line):
        offset += len(raw)
        yield number, offset, raw


class _Table:
    """How the rows of one output file look, and how to check one against the prompts."""

    def __init__(
        self, fmt: str, columns: Sequence[str], records: Sequence[Mapping[str, Any]], computed: Sequence[str] = ()
    ) -> None:
        self.fmt, self.columns, self.records = fmt, list(columns), records
        self.fields = [c for c in self.columns if c not in RESULT_COLUMNS and c not in computed]

    # -- records of the file ----------------------------------------------------------
    def records_of(self, data: bytes, start: int, first_line: int) -> Iterator[tuple[int, int, list | dict | str]]:
        """``(first line, end offset, fields)`` per record; fields is a reason string if malformed."""
        if self.fmt == "jsonl":
            for number, end, raw in _lines(data, start, first_line):
                yield number, end, self._json_fields(raw)
            return
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        state = {"line": first_line - 1, "end": start, "complete": True}

        def pieces() -> Iterator[str]:
            for number, end, raw in _lines(data, start, first_line):
                state["line"], state["end"], state["complete"] = number, end, raw.endswith(b"\n")
                yield raw.decode("utf-8")

        reader = csv.reader(pieces(), strict=True)
        while True:
            first = state["line"] + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as error:
                yield first, len(data), f"unreadable ({error})"
                return
            if not state["complete"]:
                values = "incomplete (no end of line)"
            yield first, state["end"], values

    def _json_fields(self, raw: bytes) -> dict | str:
        if not raw.endswith(b"\n"):
            return "incomplete (no end of line)"
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            return f"not valid JSON ({error})"
        return value if isinstance(value, dict) else "not a JSON object"

    def single_line_row(self, raw: bytes) -> dict[str, Any] | None:
        """A row from one line alone, if it is a complete valid row (used past a damaged part)."""
        if self.fmt == "jsonl":
            fields = self._json_fields(raw)
        else:
            try:
                fields = next(csv.reader([raw.decode("utf-8")], strict=True), "empty")
            except (csv.Error, UnicodeDecodeError):
                return None
        row = self.row(fields) if not isinstance(fields, str) else None
        return row if isinstance(row, dict) and self.problem(row) is None else None

    # -- one row -----------------------------------------------------------------------
    def row(self, fields: list[str] | dict[str, Any]) -> dict[str, Any] | str:
        """The row as a dict, or why it is malformed."""
        if isinstance(fields, dict):  # a JSONL line (_json_fields); a CSV line is a list of cells
            missing = [c for c in RESULT_COLUMNS + ("prompt",) if c not in fields]
            return f"no {missing} field" if missing else fields
        if len(fields) != len(self.columns):
            return f"{len(fields)} cells instead of {len(self.columns)}"
        return dict(zip(self.columns, fields))

    def result_values(self, row: dict[str, Any]) -> tuple[int, float, int] | None:
        """``(index, tuco, n_tokens)`` if they are well-formed."""
        try:
            index, tuco, n_tokens = (row[c] for c in RESULT_COLUMNS)
            if self.fmt == "csv":
                if not (index.isdigit() and n_tokens.isdigit()):
                    return None
                index, tuco, n_tokens = int(index), float(tuco), int(n_tokens)
            if any(isinstance(v, bool) for v in (index, tuco, n_tokens)):
                return None
            if not (isinstance(index, int) and isinstance(n_tokens, int) and isinstance(tuco, (int, float))):
                return None
        except (KeyError, ValueError, AttributeError):
            return None
        if index < 0 or n_tokens < 1 or not (math.isnan(tuco) or 0.0 <= tuco <= 1.0):
            return None
        return index, float(tuco), n_tokens

    def problem(self, row: dict[str, Any]) -> str | None:
        """Why a well-formed row does not belong to these prompts (``None`` if it does)."""
        values = self.result_values(row)
        if values is None:
            return "malformed index, tuco or n_tokens"
        index = values[0]
        if index >= len(self.records):
            return f"its index {index} is past the last prompt ({len(self.records)} prompts)"
        record = self.records[index]
        for name in self.fields:
            if self.fmt == "csv":
                same = row.get(name) == csv_cell(record.get(name))
            else:
                same = _canonical(row.get(name)) == _canonical(record.get(name))
            if not same:
                shown = row.get(name)
                return f"it holds {name} {_clip(shown)} for index {index}, but prompt {index} now has {_clip(record.get(name))}"
        return None

    def index(self, row: dict[str, Any]) -> int:
        """The index of a row that :meth:`problem` accepted."""
        values = self.result_values(row)
        assert values is not None, "index() of a row that problem() did not accept"
        return values[0]


def _clip(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# ------------------------------------------------------------------------------ the output
class ResumableOutput:
    """An output file of per-prompt rows, opened under its lock, checked, repaired, appended to.

    On entering, the lock ``OUT.lock`` is taken (:class:`OutputLock`), then:

    * no output (or an empty one), or ``overwrite=True``: a fresh output and its run record;
    * else the run record ``OUT.run.json`` must exist and equal ``run`` (prompts, models,
      options, tuco_lens version), every complete row must belong to the prompts (its input
      fields equal those of the prompt at its index) and appear once; otherwise
      :class:`~tuco_lens.errors.ResumeMismatchError` names what changed;
    * a damaged tail (a torn last row from a full disk or a kill, NUL bytes from a power loss,
      bytes that are not UTF-8) is cut back to the last complete row, and :attr:`notes` says
      so. Damage followed by intact rows is refused instead (nothing is cut that a rerun
      would not rebuild).

    :attr:`done` then holds the indices already scored. :meth:`append` writes a batch with one
    ``write``, rolled back if the disk takes only part of it, and synced to disk.

    Args:
        path: The output file (``.csv`` or ``.jsonl``); check it first with
            :func:`check_output_file`.
        records: The input records, one per prompt (``prompt`` and any other input fields).
        run: What this run computes with (:meth:`RunRecord.for_run`).
        overwrite: Start again even if the output holds rows.
        computed_columns: Further result columns after the input fields (e.g. ``tokens`` and
            ``tuco_per_token`` of ``--per-token``): written, but not compared with the records.

    Raises:
        ResumeMismatchError: the output was computed with other prompts or settings.
        OutputLockedError: another process writes the same output.
        OutputError: the output cannot be read, repaired or written.

    Example:
        >>> records = [{"prompt": "the cat"}, {"prompt": "a dog"}]
        >>> run = RunRecord.for_run({"norm": "l1"}, records)
        >>> with ResumableOutput(Path("scores.jsonl"), records, run) as out:
        ...     out.append([{**records[0], "index": 0, "tuco": 0.5, "n_tokens": 3}])
        >>> with ResumableOutput(Path("scores.jsonl"), records, run) as out:  # resumed
        ...     print(sorted(out.done), out.notes)
        [0] []
    """

    def __init__(
        self,
        path: Path,
        records: Sequence[Mapping[str, Any]],
        run: RunRecord,
        *,
        overwrite: bool = False,
        computed_columns: Sequence[str] = (),
    ) -> None:
        self.path = Path(path)
        self.format = self.path.suffix.lstrip(".")
        if "." + self.format not in OUTPUT_SUFFIXES:
            raise OutputError(f"--out must end in .csv or .jsonl, got {str(self.path)!r}")
        fields = list(dict.fromkeys(k for r in records for k in r if k != "prompt"))
        clash = [k for k in fields if k in RESULT_COLUMNS or k in computed_columns]
        if clash:
            taken = [*RESULT_COLUMNS, *computed_columns]
            raise OutputError(f"input fields {clash} clash with the output columns {taken}; rename them")
        self.columns = [*RESULT_COLUMNS, "prompt", *fields, *computed_columns]
        self.records, self.run, self.overwrite = records, run, overwrite
        self.record_path = self.path.with_name(self.path.name + ".run.json")
        self.lock = OutputLock(self.path)
        self.table = _Table(self.format, self.columns, records, computed_columns)
        self.done: set[int] = set()
        self.notes: list[str] = []
        self._fd: int | None = None
        self._size = 0

    # -- opening -------------------------------------------------------------------------
    def __enter__(self) -> ResumableOutput:
        self.lock.__enter__()
        try:
            if self.lock.stale:
                self.notes.append(f"took over a stale lock left by a process that is gone ({self.lock.stale})")
            self._open()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _open(self) -> None:
        exists = self.path.exists() and self.path.stat().st_size > 0
        if self.overwrite or not exists:
            if self.overwrite and exists:
                self.notes.append(f"--overwrite: discarded the {str(self.path)!r} of an earlier run")
            self.run.write(self.record_path)
            self._open_for_append(truncate=True)
            return
        data = self.path.read_bytes()
        if not self.record_path.exists():
            raise ResumeMismatchError(
                f"{str(self.path)!r} holds rows but no record of what they were computed with "
                f"({str(self.record_path)!r} is missing: written by another program or an older "
                f"tuco_lens), so resuming could mix settings; {_OVERWRITE_HINT}"
            )
        old = RunRecord.read(self.record_path)
        changes = self.run.changes_from(old)
        scan = self._scan(data) if not changes or old.prompts_sha256 != self.run.prompts_sha256 else None
        if scan is not None and scan.mismatched:
            changes.append(
                f"{scan.mismatched[0]} ({len(scan.mismatched)} of {len(scan.mismatched) + len(scan.rows)} "
                "rows differ: were prompts inserted, removed or reordered?)"
            )
        if changes:
            raise ResumeMismatchError(
                f"{str(self.path)!r} was computed with other prompts or settings than this run: "
                + "; ".join(changes)
                + f". Resuming would mix rows of both; {_OVERWRITE_HINT}"
            )
        assert scan is not None  # no changes, so the output was scanned above
        if scan.end < len(data):
            cut = data[scan.end:]
            where = f"line {scan.bad_line}" if scan.bad_line else "the end"
            self.notes.append(
                f"cut {len(cut)} damaged bytes from {where} of {str(self.path)!r} ({scan.bad_reason}; "
                f"e.g. a full disk, a kill or a power loss during a write): {_clip(cut[:80])}; "
                "those prompts are scored again"
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(scan.end)
                os.fsync(handle.fileno())
        self.done = {self.table.index(row) for _, row in scan.rows}
        self._open_for_append(truncate=False)

    def _scan(self, data: bytes) -> _Scan:
        """Read the output: header, complete rows, damaged tail. Raises on rows that do not belong."""
        scan, start, first_line = _Scan(), 0, 1
        if self.format == "csv":
            header = encode_rows([], self.columns, "csv", header=True)
            if header.startswith(data):  # only (part of) the header was written
                scan.bad_line, scan.bad_reason = 1, "an incomplete header"
                return scan
            if not data.startswith(header):
                first = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
                raise ResumeMismatchError(
                    f"{str(self.path)!r} has the columns {first.split(',')}, not {self.columns}: it was "
                    f"written for other prompts or by another program; {_OVERWRITE_HINT}"
                )
            scan.end, start, first_line = len(header), len(header), 2
        seen: dict[int, int] = {}
        for line, end, fields in self.table.records_of(data, start, first_line):
            row = self.table.row(fields) if not isinstance(fields, str) else fields
            if isinstance(row, str) or self.table.result_values(row) is None:
                scan.bad_line, scan.bad_reason = line, row if isinstance(row, str) else "malformed index, tuco or n_tokens"
                break
            problem = self.table.problem(row)
            if problem is not None:
                scan.mismatched.append(f"the row at line {line}: {problem}")
                scan.end = end
                continue
            index = self.table.index(row)
            if index in seen:
                raise OutputError(
                    f"{str(self.path)!r} holds index {index} twice (lines {seen[index]} and {line}): "
                    f"two processes wrote it at once, or it was edited; {_OVERWRITE_HINT}"
                )
            seen[index] = line
            scan.rows.append((line, row))
            scan.end = end
        if scan.bad_line is not None and not scan.mismatched:
            self._refuse_damage_before_rows(data, scan)
        return scan

    def _refuse_damage_before_rows(self, data: bytes, scan: _Scan) -> None:
        # The first line after the intact part that is itself a valid row means the damage is
        # in the middle: cutting there would drop rows nobody rewrites; refuse instead.
        lines = _lines(data, scan.end, scan.bad_line or 1)
        next(lines, None)  # the damaged line itself
        for number, _, raw in lines:
            if self.table.single_line_row(raw) is not None:
                raise OutputError(
                    f"line {scan.bad_line} of {str(self.path)!r} is damaged ({scan.bad_reason}) but line "
                    f"{number} after it is an intact row: the file was edited or written by another "
                    f"program. Fix or delete line {scan.bad_line} by hand, or {_OVERWRITE_HINT}"
                )

    def _open_for_append(self, *, truncate: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND)
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as error:
            raise OutputError(f"cannot open {str(self.path)!r} for writing: {error}") from error
        self._size = os.fstat(self._fd).st_size

    # -- writing -------------------------------------------------------------------------
    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append a batch of rows: all of them or, if the disk refuses part, none.

        Raises:
            OutputError: the write failed (full disk...); the rows before the batch are
                intact and a rerun resumes after them.
        """
        if self._fd is None:
            raise OutputError(f"{str(self.path)!r} is not open; use ResumableOutput as a context manager")
        data = encode_rows(rows, self.columns, self.format, header=self.format == "csv" and self._size == 0)
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError("the file system accepted no more bytes")
                view = view[written:]
            os.fsync(self._fd)
        except BaseException as error:
            rolled_back = self._roll_back(self._fd)
            if not isinstance(error, OSError):
                raise
            state = (
                "the partial batch was removed"
                if rolled_back
                else "the partial batch could not be removed and will be cut on the next run"
            )
            raise OutputError(
                f"could not write {len(rows)} rows to {str(self.path)!r} ({error}); {state}, the rows "
                "before it are intact. Free some space and rerun the same command: it resumes there."
            ) from error
        self._size += len(data)
        self.done.update(int(row["index"]) for row in rows)

    def _roll_back(self, fd: int) -> bool:
        try:
            os.ftruncate(fd, self._size)
            return True
        except OSError:
            return False

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.lock.__exit__(None, None, None)
