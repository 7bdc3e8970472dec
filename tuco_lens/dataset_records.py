"""Prompt records from a Hugging Face ``datasets`` dataset (``tuco-lens score --dataset``).

``--dataset`` names a hub dataset (``Anthropic/hh-rlhf``), a directory written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a local ``.parquet``, ``.json`` /
``.jsonl`` or ``.csv`` file. One column (``--field``) is the prompt; the others are kept as
input fields of the score table.

Example:
    >>> records = read_dataset("Anthropic/hh-rlhf", split="test", field="chosen", limit=1000)  # doctest: +SKIP
    >>> import pandas as pd
    >>> pd.DataFrame({"chosen": ["where is norvik ?"], "rejected": ["no"]}).to_parquet("hh.parquet")
    >>> records = read_dataset("hh.parquet", field="chosen")
    >>> records[0].keys()
    dict_keys(['prompt', 'rejected'])
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tuco_lens.errors import InputError, MissingDependencyError

__all__ = ["read_dataset", "FILE_BUILDERS"]

#: Local files by extension, and the ``datasets`` builder that reads them.
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _import_datasets():
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - a dependency of transformer-lens
        raise MissingDependencyError("--dataset needs the datasets package: pip install datasets") from error
    return datasets


def _pick_split(dataset: Any, split: str | None, source: str) -> Any:
    datasets = _import_datasets()
    if not isinstance(dataset, datasets.DatasetDict):
        if split is not None:
            raise InputError(f"{source!r} is a single dataset without splits; drop --split {split!r}")
        return dataset
    names = list(dataset)
    if split is None:
        if len(names) == 1:
            return dataset[names[0]]
        split = "train" if "train" in names else None
        if split is None:
            raise InputError(f"{source!r} has the splits {names}: choose one with --split")
    if split not in dataset:
        raise InputError(f"{source!r} has no split {split!r}; its splits are {names}")
    return dataset[split]


def _load(source: str, split: str | None, config: str | None, cache_dir: str | None, limit: int | None) -> Any:
    datasets = _import_datasets()
    path = Path(source).expanduser()
    if path.is_dir():
        if config is not None:
            raise InputError("--dataset-config is for hub datasets; a load_from_disk directory has none")
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as error:
            raise InputError(
                f"{str(path)!r} is not a directory written by Dataset.save_to_disk ({error}); for a "
                "folder of files, name one file (.parquet, .jsonl, .json, .csv)"
            ) from error
        return _pick_split(loaded, split, source)
    if path.suffix in FILE_BUILDERS:
        if not path.is_file():
            raise InputError(f"dataset file {str(path)!r} does not exist")
        loaded = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), cache_dir=cache_dir)
        return _pick_split(loaded, split, source)
    try:
        if limit is not None:  # the first rows only: stream them instead of downloading the whole split
            return datasets.load_dataset(source, config, split=split or "train", streaming=True).take(limit)
        return datasets.load_dataset(source, config, split=split or "train")
    except Exception as error:  # the hub, its network and its many errors
        raise InputError(f"could not load the dataset {source!r} (split {split or 'train'!r}): {error}") from error


def read_dataset(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    field: str = "prompt",
    config: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Records ``{"prompt": row[field], **other columns}`` of a dataset, in its order.

    Args:
        source: A hub dataset id, a ``save_to_disk`` directory, or a ``.parquet`` / ``.json``
            / ``.jsonl`` / ``.csv`` file.
        split: The split (default: the only one, else ``"train"``).
        field: The column holding the prompt text.
        config: The hub dataset's configuration name, if it has several.
        limit: Keep only the first ``limit`` rows.

    Raises:
        InputError: a missing file or split, a ``field`` that is not a column (the columns are
            named), a prompt that is not a string, or a column whose values a score table
            cannot hold (images, bytes...).

    Example:
        >>> import pandas as pd
        >>> pd.DataFrame({"text": ["where is norvik ?", "the fox eats"], "set": ["chat", "web"]}).to_parquet("prompts.parquet")
        >>> read_dataset("prompts.parquet", field="text")[:1]
        [{'prompt': 'where is norvik ?', 'set': 'chat'}]
    """
    source = os.fspath(source)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer, got {limit!r}")
    with tempfile.TemporaryDirectory(prefix="tuco-lens-dataset-") as cache:
        dataset = _load(source, split, config, cache, limit)
        if limit is not None and hasattr(dataset, "select"):
            dataset = dataset.select(range(min(limit, len(dataset))))
        columns = dataset.column_names
        if columns is None:  # a streamed dataset without declared features: its first row's keys
            columns = list(next(iter(dataset), {}))
        if field not in columns:
            raise InputError(
                f"the dataset {source!r} has no column {field!r}; its columns are {columns}: "
                "choose the prompt column with --field"
            )
        if field != "prompt" and "prompt" in columns:
            raise InputError(
                f"the dataset {source!r} has a 'prompt' column besides the prompt column {field!r}: "
                "rename one of them (dataset.rename_column) first"
            )
        records = []
        for number, row in enumerate(dataset):
            prompt = row.pop(field)
            if not isinstance(prompt, str):
                raise InputError(f"{source!r}: row {number}: the {field!r} column must hold text, got {type(prompt).__name__}")
            records.append({"prompt": prompt, **row})
    if not records:
        raise InputError(f"the dataset {source!r} holds no rows")
    for name, value in records[0].items():
        try:
            json.dumps(value)
        except TypeError as error:
            raise InputError(
                f"{source!r}: the column {name!r} holds {type(value).__name__} values, which a score table "
                "cannot hold; remove it from the dataset (dataset.remove_columns) first"
            ) from error
    return records
