"""Separation metrics for comparing TuCo between two prompt sets.

The paper reports how well TuCo separates two sets of prompts (chat vs web text, plain vs
jailbroken) as a ROC AUC. Both functions here assume the *positive* set is expected to score
higher, and threshold as ``score >= t → positive``.

Example:
    >>> from tuco_lens.metrics import roc_auc, tpr_at_fpr
    >>> sets = demo.prompt_sets()
    >>> chat, web = pair.tuco(sets["chat"][:10]), pair.tuco(sets["web"][:10])
    >>> round(roc_auc(chat, web), 3)        # 0.5 = no separation, 1.0 = perfect
    1.0
    >>> round(tpr_at_fpr(chat, web, fpr=0.1), 3)
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tuco_lens.errors import InputError

__all__ = ["roc_auc", "tpr_at_fpr", "as_scores"]

Scores = Tensor | np.ndarray | Sequence[float]


def as_scores(values: Scores, name: str = "scores") -> np.ndarray:
    """Convert a 1-D tensor, array or list of numbers to a float64 NumPy array, checked.

    Raises:
        InputError: If ``values`` is not 1-D, is empty, or contains NaN.
    """
    if isinstance(values, Tensor):
        array = values.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} must be a 1-D sequence of numbers ({exc}).") from None
    if array.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {tuple(array.shape)}.")
    if array.size == 0:
        raise InputError(f"{name} is empty: need at least one score.")
    if np.isnan(array).any():
        n_nan = int(np.isnan(array).sum())
        raise InputError(f"{name} contains {n_nan} NaN value(s); drop or fix them first.")
    return array


def roc_auc(positive_scores: Scores, negative_scores: Scores) -> float:
    """Exact ROC AUC: the probability that a positive scores above a negative (ties count 1/2).

    This is the Mann–Whitney U statistic divided by ``n_pos * n_neg``, computed exactly in
    ``O((n_pos + n_neg) log n_neg)`` with sorted search (no sampling, no threshold grid).

    Args:
        positive_scores: Scores of the set expected to score higher. ``[n_pos]``
        negative_scores: Scores of the other set. ``[n_neg]``

    Returns:
        AUC in ``[0, 1]``: 1.0 if every positive is above every negative, 0.0 if reversed,
        0.5 if all scores are tied.

    Raises:
        InputError: If a set is empty, not 1-D, or contains NaN.

    Example:
        >>> roc_auc([0.3, 0.4], [0.1, 0.3])
        0.875
    """
    pos = as_scores(positive_scores, "positive_scores")
    neg = np.sort(as_scores(negative_scores, "negative_scores"))
    below = np.searchsorted(neg, pos, side="left")  # negatives strictly below each positive
    below_or_tied = np.searchsorted(neg, pos, side="right")
    # 2U = Σ (2·below + tied) = Σ (below + below_or_tied): an exact integer.
    twice_u = int(below.sum(dtype=np.int64) + below_or_tied.sum(dtype=np.int64))
    return twice_u / (2 * pos.size * neg.size)


def tpr_at_fpr(positive_scores: Scores, negative_scores: Scores, fpr: float = 0.05) -> float:
    """True-positive rate of the best threshold whose false-positive rate is at most ``fpr``.

    Thresholds are the observed scores (``score >= t`` is called positive) plus one above
    every score; no interpolation between thresholds.

    Args:
        positive_scores: Scores of the set expected to score higher. ``[n_pos]``
        negative_scores: Scores of the other set. ``[n_neg]``
        fpr: Largest allowed false-positive rate, in ``[0, 1]``.

    Returns:
        The largest TPR over thresholds with ``FPR <= fpr``.

    Raises:
        InputError: If a set is empty or contains NaN, or ``fpr`` is outside ``[0, 1]``.

    Example:
        >>> tpr_at_fpr([0.5, 0.4, 0.2], [0.1, 0.3], fpr=0.0)
        0.6666666666666666
    """
    if not (0.0 <= float(fpr) <= 1.0):
        raise InputError(f"fpr must be in [0, 1], got {fpr!r}.")
    pos = np.sort(as_scores(positive_scores, "positive_scores"))
    neg = np.sort(as_scores(negative_scores, "negative_scores"))
    thresholds = np.unique(np.concatenate([pos, neg]))
    # Rates at each threshold t: fraction of scores >= t.
    tpr = (pos.size - np.searchsorted(pos, thresholds, side="left")) / pos.size
    fpr_t = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    ok = fpr_t <= fpr
    # A threshold above every score gives TPR = FPR = 0, always allowed.
    return float(tpr[ok].max()) if ok.any() else 0.0
