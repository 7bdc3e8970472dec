"""Compare TuCo across named prompt sets (paper §5.2, Table 1: web text vs chat prompts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from tuco_lens.analyses._common import auc_matrix, check_common, check_pair, groups_of, mean_sem, score
from tuco_lens.errors import InputError
from tuco_lens.io import SetSource, read_prompt_sets, sets_frame
from tuco_lens.metrics import roc_auc, tpr_at_fpr
from tuco_lens.pair import TuCoPair
from tuco_lens.plotting import plot_prompt_sets

__all__ = ["PromptSetComparison", "compare_prompt_sets"]


@dataclass(frozen=True)
class PromptSetComparison:
    """TuCo of every prompt of several named sets, and how well it separates them.

    Attributes:
        table: One row per prompt (tidy): ``set``, ``index`` (position within its set),
            ``prompt`` (as given, before any chat template), ``tuco``.
        summary: One row per set, in input order: ``set``, ``n``, ``mean_tuco``, ``sem_tuco``
            (standard error of the mean), ``std_tuco``, ``median_tuco``, ``min_tuco``,
            ``max_tuco``.
        auc_matrix: ROC AUC of TuCo for every ordered pair of sets: row = positive set (the one
            expected to score higher), column = negative set; ``auc_matrix.loc[a, b] =
            auc(a, b) = 1 - auc(b, a)``; the diagonal is NaN.
        chat_template: Whether prompts were wrapped in the fine-tuned chat template.
        norm: The norm TuCo used (``"l1"`` is the paper's).
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    auc_matrix: pd.DataFrame
    chat_template: bool
    norm: str

    @property
    def set_names(self) -> list[str]:
        """The set names, in input order."""
        return list(self.summary["set"])

    def scores(self, name: str) -> np.ndarray:
        """TuCo of the prompts of set ``name``, in the set's order. ``[n]``"""
        self._check_name(name)
        return self.table.loc[self.table["set"] == name, "tuco"].to_numpy(dtype=np.float64)

    def auc(self, positive: str, negative: str) -> float:
        """ROC AUC of TuCo with ``positive`` as the set expected to score higher.

        The probability that a random ``positive`` prompt has a higher TuCo than a random
        ``negative`` one (ties count 1/2); the paper reports chat (positive) vs web text.
        """
        self._check_two(positive, negative)
        return roc_auc(self.scores(positive), self.scores(negative))

    def tpr_at_fpr(self, positive: str, negative: str, fpr: float = 0.05) -> float:
        """True-positive rate at the given false-positive rate (threshold ``tuco >= t``)."""
        self._check_two(positive, negative)
        return tpr_at_fpr(self.scores(positive), self.scores(negative), fpr=fpr)

    def to_dataframe(self) -> pd.DataFrame:
        """A copy of :attr:`table`."""
        return self.table.copy()

    def figure(
        self,
        positive: str | None = None,
        negative: str | None = None,
        kind: Literal["histogram", "violin"] = "histogram",
        *,
        sets: Sequence[str] | None = None,
        title: str | None = None,
    ) -> go.Figure:
        """TuCo distributions of the sets (``tuco_lens.plotting.plot_prompt_sets``).

        Args:
            positive: Set expected to score higher; with ``negative``, its ROC AUC and TPR at
                5% FPR go in the title.
            negative: The other set of the comparison.
            kind: ``"histogram"`` (overlaid, normalised per set) or ``"violin"``.
            sets: Which sets to draw (default: all, in input order).
            title: Figure title.
        """
        names = self.set_names if sets is None else list(sets)
        for name in names:
            self._check_name(name)
        return plot_prompt_sets(
            {name: self.scores(name) for name in names},
            kind=kind,
            positive=positive,
            negative=negative,
            title=title or "TuCo by prompt set",
        )

    def _check_name(self, name: str) -> None:
        if name not in self.set_names:
            raise InputError(f"Unknown prompt set {name!r}; the sets are {self.set_names}.")

    def _check_two(self, positive: str, negative: str) -> None:
        self._check_name(positive)
        self._check_name(negative)
        if positive == negative:
            raise InputError(f"positive and negative are the same set ({positive!r}).")


def compare_prompt_sets(
    pair: TuCoPair,
    sets: SetSource,
    *,
    names: Sequence[str] | None = None,
    chat_template: bool = False,
    batch_size: int | None = None,
    show_progress: bool = False,
    norm: str = "l1",
) -> PromptSetComparison:
    """TuCo per prompt for named prompt sets, ROC AUCs between them, and a figure.

    Reproduces the paper's §5.2 / Table 1 analysis: TuCo of web-text prompts vs chat prompts,
    reported as the ROC AUC of TuCo with chat as the positive set (0.89–1.0 for eight of nine
    chat models). Any sets can be compared.

    Args:
        pair: The pre-trained / fine-tuned pair.
        sets: ``{set name: list of prompts}``, a DataFrame with ``set`` and ``prompt`` columns,
            or the path of a JSONL file whose records have ``set`` and ``prompt`` fields.
        names: Score only these sets, in this order (default: all).
        chat_template: Wrap every prompt as a user turn in the fine-tuned chat template with
            the generation prompt (the paper's setting for chat prompts). Applies to every set;
            for mixed formats, format the chat prompts yourself and leave this False.
        batch_size: Prompts per forward pass (``None``: each set in one pass).
        show_progress: Progress bars.
        norm: ``"l1"`` (the paper's) or ``"l2"``.

    Returns:
        A :class:`PromptSetComparison` (``table``, ``summary``, ``auc_matrix``, ``auc()``,
        ``figure()``).

    Raises:
        InputError: No sets, an empty set, an empty prompt, an unknown name in ``names``, a
            prompt longer than the model's context.
        InputTypeError: Sets or prompts of the wrong type.

    Example:
        >>> from tuco_lens import demo
        >>> from tuco_lens.analyses import compare_prompt_sets
        >>> sets = demo.prompt_sets()
        >>> result = compare_prompt_sets(pair, {"web": sets["web"][:20], "chat": sets["chat"][:20]})
        >>> round(result.auc("chat", "web"), 3)
        1.0
        >>> result.table.groupby("set").tuco.mean().round(3)
        set
        chat    0.329
        web     0.202
        Name: tuco, dtype: float64
        >>> fig = result.figure("chat", "web")
    """
    pair = check_pair(pair)
    norm = check_common(batch_size, norm)
    table = sets_frame(_selected(read_prompt_sets(sets), names))
    # One call over all sets: pair.tuco sorts by length within batch_size chunks.
    texts = table["prompt"].tolist()
    table["tuco"] = score(pair, texts, chat_template=chat_template, batch_size=batch_size, show_progress=show_progress, norm=norm)
    groups = groups_of(table, "set", "tuco")
    return PromptSetComparison(
        table=table, summary=_summary(groups), auc_matrix=auc_matrix(groups), chat_template=bool(chat_template), norm=norm
    )


def _selected(sets: dict[str, list[str]], names: Sequence[str] | None) -> dict[str, list[str]]:
    """The sets named in ``names``, in that order (all of them for ``None``)."""
    if names is None:
        return sets
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise InputError(f"Unknown prompt set(s) {unknown} in names=; the sets are {list(sets)}.")
    if not names:
        raise InputError("names= is empty: pick at least one set (or pass None for all).")
    return {n: sets[n] for n in names}


def _summary(groups: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per set: its size and the statistics of its TuCo."""
    return pd.DataFrame(
        [
            {
                "set": name,
                "n": values.size,
                **mean_sem(values, "tuco"),
                "std_tuco": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                "median_tuco": float(np.median(values)),
                "min_tuco": float(values.min()),
                "max_tuco": float(values.max()),
            }
            for name, values in groups.items()
        ]
    )
