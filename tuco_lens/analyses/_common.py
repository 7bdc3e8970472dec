"""Helpers shared by the analyses: reading prompts, scoring, validation and small statistics.

Not public API: the analyses modules re-export what users need.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tuco_lens.decomposition import Norm
from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.inputs import encode_prompt
from tuco_lens.metrics import roc_auc, tpr_at_fpr
from tuco_lens.pair import TuCoPair
from tuco_lens.validation import check_float, check_int, check_norm

#: Name of the set when prompts are given as a plain list (no set labels).
DEFAULT_SET = "prompts"

PromptSource = Sequence[str] | pd.DataFrame | pd.Series | str | os.PathLike
"""A list of prompts, a DataFrame (``prompt`` column), a Series, or a ``.jsonl`` / ``.txt`` path."""

SetSource = Mapping[str, Sequence[str]] | pd.DataFrame | str | os.PathLike
"""``{set name: prompts}``, a DataFrame with ``set`` and ``prompt`` columns, or a JSONL path."""


# ---------------------------------------------------------------------------------- validation
def check_pair(pair: object) -> TuCoPair:
    if not isinstance(pair, TuCoPair):
        raise InputTypeError(
            f"The first argument must be a tuco_lens.TuCoPair, got {type(pair).__name__}. "
            "Load one with tuco_lens.load_pair(pt, ft) or tuco_lens.demo.load_pair()."
        )
    return pair


def check_common(batch_size: object, norm: str) -> Norm:
    """Check ``batch_size`` (a positive int or None) and return the checked ``norm``."""
    if batch_size is not None:
        check_int(batch_size, "batch_size", 1)
    return check_norm(norm)


def check_sample_settings(n_samples: object, max_new_tokens: object, seed: object, temperature: object) -> tuple[int, int, int, float]:
    """The checked ``(n_samples, max_new_tokens, seed, temperature)`` of an analysis that generates."""
    return (
        check_int(n_samples, "n_samples", 1),
        check_int(max_new_tokens, "max_new_tokens", 1),
        check_int(seed, "seed"),
        check_float(temperature, "temperature", positive=True),
    )


# ---------------------------------------------------------------------------------- reading
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
    frames = [pd.DataFrame({"set": name, "index": range(len(p)), "prompt": p}) for name, p in sets.items()]
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------- scoring
def score(
    pair: TuCoPair,
    prompts: list[str],
    *,
    chat_template: bool = False,
    prepend_bos: bool | None = None,
    batch_size: int | None = None,
    show_progress: bool = False,
    norm: Norm = "l1",
) -> np.ndarray:
    """``pair.tuco`` of a list of prompts as a float64 array (input order)."""
    values = pair.tuco(
        prompts,
        chat_template=chat_template,
        prepend_bos=prepend_bos,
        batch_size=batch_size,
        show_progress=show_progress,
        norm=norm,
    )
    return values.detach().to("cpu", torch.float64).numpy()


def n_prompt_tokens(pair: TuCoPair, prompt: str, prepend_bos: bool | None = None) -> int:
    """Number of tokens ``pair.tokenize(prompt, prepend_bos=...)`` gives, without its length check."""
    return len(encode_prompt(pair.ft, prompt, prepend_bos=prepend_bos))


# ---------------------------------------------------------------------------------- statistics
def sem(values: np.ndarray) -> float:
    """Standard error of the mean (sample std / sqrt(n)); NaN for fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float("nan")
    return float(values.std(ddof=1) / math.sqrt(values.size))


def mean_sem(values: np.ndarray, name: str) -> dict[str, float]:
    """``{"mean_<name>": mean, "sem_<name>": standard error}`` of one group's values."""
    return {f"mean_{name}": float(values.mean()), f"sem_{name}": sem(values)}


def groups_of(table: pd.DataFrame, by: str, column: str) -> dict[Any, np.ndarray]:
    """``{group: table[column] of its rows}`` for every value of ``table[by]``, in first-appearance order."""
    return {name: table.loc[table[by] == name, column].to_numpy() for name in dict.fromkeys(table[by])}


def auc_or_nan(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC, or NaN when either side is empty."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    return roc_auc(positive, negative)


def tpr_or_nan(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.05) -> float:
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    return tpr_at_fpr(positive, negative, fpr=fpr)


def auc_matrix(groups: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """ROC AUC for every ordered pair: row = positive set, column = negative set (NaN diagonal)."""
    names = list(groups)
    matrix = pd.DataFrame(np.nan, index=pd.Index(names, name="positive"), columns=pd.Index(names, name="negative"))
    for a in names:
        for b in names:
            if a != b:
                matrix.loc[a, b] = roc_auc(groups[a], groups[b])
    return matrix


def apply_checked(fn: Callable[[str], Any], value: str, what: str) -> Any:
    """Call a user function, turning its exceptions into an :class:`InputError` that says where."""
    try:
        return fn(value)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise InputError(f"{what} raised {type(exc).__name__}: {exc}") from exc


def label(predicate: Callable[[str], Any], completion: str, name: str, where: str) -> bool:
    """``predicate(completion)`` as a bool; its exceptions and non-bool results name ``where``.

    ``True``, ``False`` (also NumPy's) and the integers 0 and 1 are accepted.
    """
    value = apply_checked(predicate, completion, f"{name}({where})")
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise InputTypeError(f"{name} must return a bool (True or False), got {value!r} for {where}.")
