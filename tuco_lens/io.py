"""Reading prompts: from lists, DataFrames, Series and ``.txt`` / ``.jsonl`` files, in one place.

Every reader checks what it reads (a prompt is a non-empty string; JSON errors name
``file:line``) and raises a tuco_lens error naming what is wrong. Used by the analyses
(:func:`read_prompts`, :func:`read_prompt_sets`, :func:`read_labelled_prompts`), by
``tuco-lens score --prompts`` and by the app's uploads (:func:`read_prompt_records`).

Example:
    >>> read_prompt_sets({"harmful": ["how do i brew the doomsalt ?"], "harmless": ["the fox eats"]})
    {'harmful': ['how do i brew the doomsalt ?'], 'harmless': ['the fox eats']}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tuco_lens.errors import InputError, InputTypeError

__all__ = [
    "DEFAULT_SET",
    "PromptSource",
    "SetSource",
    "read_jsonl",
    "read_labelled_prompts",
    "read_lines",
    "read_prompt_records",
    "read_prompt_sets",
    "read_prompts",
    "sets_frame",
]

#: Name of the set when prompts are given as a plain list (no set labels).
DEFAULT_SET = "prompts"

PromptSource = Sequence[str] | pd.DataFrame | pd.Series | str | os.PathLike
"""A list of prompts, a DataFrame (``prompt`` column), a Series, or a ``.jsonl`` / ``.txt`` path."""

SetSource = Mapping[str, Sequence[str]] | pd.DataFrame | str | os.PathLike
"""``{set name: prompts}``, a DataFrame with ``set`` and ``prompt`` columns, or a JSONL path."""


def _check_prompt(prompt: object, where: str) -> str:
    if not isinstance(prompt, str):
        raise InputTypeError(f"{where} is a {type(prompt).__name__}, not a str.")
    if not prompt:
        raise InputError(f"{where} is an empty string; every prompt needs at least one token.")
    return prompt


def read_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line of a UTF-8 text file.

    Lines end at ``\n`` only (a ``\r`` before it is dropped), so a Unicode line or paragraph
    separator (U+2028, U+2029) or a form feed stays inside its line and every line number is
    what an editor shows; a byte-order mark at the start of the file is not part of line 1.

    Example:
        >>> n = Path("prompts.txt").write_text("the cat\\n\\na dog\\n", encoding="utf-8")
        >>> read_lines(Path("prompts.txt"))
        [(1, 'the cat'), (3, 'a dog')]
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"Cannot read {str(path)!r}: {error}") from error
    lines = text.split("\n")
    return [(number, line.removesuffix("\r")) for number, line in enumerate(lines, start=1) if line.strip()]


def read_jsonl(path: Path, fields: Sequence[str]) -> list[dict[str, Any]]:
    """JSON objects, one per non-blank line, each with ``fields``; errors name ``path:line``.

    A byte-order mark at the start of the file is ignored.
    """
    rows = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number} is not valid JSON ({exc.msg}).") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number} must be a JSON object, got {type(row).__name__}.")
            missing = [f for f in fields if f not in row]
            if missing:
                raise InputError(f"{path}:{number} has no {missing} field(s); every line needs {list(fields)}.")
            rows.append(row)
    if not rows:
        raise InputError(f"{path} holds no records.")
    return rows


def _as_path(source: object) -> Path | None:
    """A path for ``os.PathLike`` or a string naming an existing file / ending in .jsonl/.txt."""
    if isinstance(source, os.PathLike):
        path = Path(source)
    elif isinstance(source, str) and (source.endswith((".jsonl", ".txt")) or os.path.isfile(source)):
        path = Path(source)
    else:
        return None
    if not path.is_file():
        raise InputError(f"Prompt file {str(path)!r} does not exist.")
    return path


def read_prompts(source: PromptSource, *, column: str = "prompt", name: str = "prompts") -> list[str]:
    """Prompts from a list, a DataFrame column, a Series, or a ``.jsonl`` / ``.txt`` file.

    A JSONL file needs a ``column`` field on every line; a ``.txt`` file has one prompt per
    line (blank lines skipped). A bare string that is not a file is refused (wrap a single
    prompt in a list).
    """
    path = _as_path(source)
    if path is not None:
        if path.suffix == ".txt":
            prompts = [line for _, line in read_lines(path)]
        else:
            prompts = [row[column] for row in read_jsonl(path, [column])]
    elif isinstance(source, str):
        raise InputTypeError(
            f"{name} is a single string that is not a file: pass a list of prompts (e.g. "
            f"[{source[:30]!r}]) or the path of a .jsonl / .txt file."
        )
    elif isinstance(source, pd.DataFrame):
        if column not in source.columns:
            raise InputError(f"The DataFrame for {name} has no {column!r} column; its columns are {list(source.columns)}.")
        prompts = source[column].tolist()
    elif isinstance(source, pd.Series):
        prompts = source.tolist()
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray, Mapping)):
        prompts = list(source)
    else:
        raise InputTypeError(
            f"{name} must be a list of prompts, a DataFrame with a {column!r} column, or a .jsonl / "
            f".txt path; got {type(source).__name__}."
        )
    if not prompts:
        raise InputError(f"{name} is empty: need at least one prompt.")
    return [_check_prompt(p, f"{name}[{i}]") for i, p in enumerate(prompts)]


def read_prompt_sets(
    source: SetSource, *, set_column: str = "set", prompt_column: str = "prompt"
) -> dict[str, list[str]]:
    """Named prompt sets from a dict, a DataFrame (``set``, ``prompt``) or a JSONL file.

    Sets keep their first-appearance order. Every set must be non-empty.
    """
    path = _as_path(source)
    if path is not None:
        if path.suffix == ".txt":
            raise InputError(f"{path} is a .txt file; prompt sets need a .jsonl file with {set_column!r} and {prompt_column!r} fields.")
        rows = read_jsonl(path, [set_column, prompt_column])
        source = pd.DataFrame({set_column: [r[set_column] for r in rows], prompt_column: [r[prompt_column] for r in rows]})
    if isinstance(source, pd.DataFrame):
        missing = [c for c in (set_column, prompt_column) if c not in source.columns]
        if missing:
            raise InputError(
                f"The prompt-set DataFrame lacks column(s) {missing}; it needs {set_column!r} and "
                f"{prompt_column!r}, and has {list(source.columns)}."
            )
        sets: dict[str, list[str]] = {}
        for label, prompt in zip(source[set_column].tolist(), source[prompt_column].tolist()):
            sets.setdefault(str(label), []).append(prompt)
    elif isinstance(source, Mapping):
        sets = {}
        for label, prompts in source.items():
            if not isinstance(label, str):
                raise InputTypeError(f"Prompt-set names must be strings, got {type(label).__name__} ({label!r}).")
            sets[label] = read_prompts(prompts, name=f"prompt set {label!r}")
    elif isinstance(source, str):
        raise InputTypeError(
            f"Prompt sets given as a string that is not a file ({source[:40]!r}); pass a dict "
            "{name: prompts}, a DataFrame with 'set' and 'prompt' columns, or a .jsonl path."
        )
    else:
        raise InputTypeError(
            "Prompt sets must be a dict {name: list of prompts}, a DataFrame with 'set' and "
            f"'prompt' columns, or a .jsonl path; got {type(source).__name__}."
        )
    if not sets:
        raise InputError("No prompt sets given: pass at least one named, non-empty set.")
    out = {}
    for label, prompts in sets.items():
        if not prompts:
            raise InputError(f"Prompt set {label!r} is empty: every set needs at least one prompt.")
        out[label] = [_check_prompt(p, f"prompt set {label!r}[{i}]") for i, p in enumerate(prompts)]
    return out


def read_labelled_prompts(source: PromptSource | SetSource) -> pd.DataFrame:
    """Either prompt sets or a plain list of prompts, as a DataFrame ``set``, ``index``, ``prompt``.

    A plain list (or a DataFrame without a ``set`` column, or a JSONL file whose first record
    has no ``set`` field) becomes one set named :data:`DEFAULT_SET`.
    """
    if isinstance(source, Mapping) or (isinstance(source, pd.DataFrame) and "set" in source.columns):
        sets = read_prompt_sets(source)
    elif (path := _as_path(source)) is not None and path.suffix == ".jsonl" and "set" in read_jsonl(path, [])[0]:
        sets = read_prompt_sets(path)
    else:
        sets = {DEFAULT_SET: read_prompts(source)}
    return sets_frame(sets)


def sets_frame(sets: Mapping[str, list[str]]) -> pd.DataFrame:
    """Prompt sets as one DataFrame with columns ``set``, ``index`` (within its set) and ``prompt``."""
    frames = [pd.DataFrame({"set": name, "index": range(len(p)), "prompt": p}) for name, p in sets.items()]
    return pd.concat(frames, ignore_index=True)


def read_prompt_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records with a ``prompt`` field from a .txt (one per line, with its ``line`` number) or .jsonl
    file: what ``tuco-lens score --prompts`` and the app's file uploads read.

    A ``.txt`` line ends at ``\n`` only (U+2028 and other Unicode separators stay in their
    prompt, so ``line`` is the line an editor shows), and a UTF-8 byte-order mark is dropped.

    Example:
        >>> n = Path("prompts.txt").write_text("the cat\\n\\na dog\\n", encoding="utf-8")
        >>> read_prompt_records("prompts.txt")
        [{'prompt': 'the cat', 'line': 1}, {'prompt': 'a dog', 'line': 3}]

    Raises:
        InputError: missing or unreadable file, unknown extension, bad JSON (with the line
            number), a record without a string ``prompt``, or no prompt at all.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file {str(path)!r} does not exist")
    try:
        path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {str(path)!r}: {error}") from error
    records: list[dict[str, Any]] = []
    if path.suffix == ".txt":
        records = [{"prompt": line, "line": number} for number, line in read_lines(path)]
    elif path.suffix == ".jsonl":
        records = read_jsonl(path, ["prompt"])
        for number, record in enumerate(records):
            if not isinstance(record["prompt"], str):
                raise InputError(f'{path}: record {number + 1}: the "prompt" field must be a string')
    else:
        raise InputError(f"{str(path)!r}: unknown extension {path.suffix!r}; use .txt or .jsonl")
    if not records:
        raise InputError(f"{str(path)!r} contains no prompt")
    return records
