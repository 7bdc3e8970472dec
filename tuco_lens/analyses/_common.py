"""Helpers shared by the analyses: scoring, labelling and small statistics (prompts are read by
:mod:`tuco_lens.io`, values checked by :mod:`tuco_lens.validation`).

Not public API: the analyses modules re-export what users need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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
