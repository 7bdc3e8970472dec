"""Steering by α with cross-validation (the paper's §5.1, Table 3).

The fine-tuning component is scaled by α at every layer (Definition 5.1,
:meth:`TuCoPair.scaled <tuco_lens.TuCoPair.scaled>`), and a multiple-choice item is answered by
the option whose token has the highest next-token probability after the prompt under the scaled
model. :func:`alpha_accuracy` scores every item at every α of a grid; :func:`steer_with_cv`
chooses α by k-fold cross-validation (maximising or minimising accuracy on the training folds)
and reports the paper's Δ = accuracy(α*) − accuracy(α = 1), pooled over the test folds.

Items: ``prompt`` is the text right before the answer (for chat models, either chat-formatted
already, or a user request with ``chat_template=True``); ``options`` are strings, each **one
token** of the fine-tuned tokenizer (the paper's setting: answer letters or single words), and
``answer_index`` is the correct option — or, for behaviour evaluations, the option that matches
the behaviour. Options are encoded alone, without special tokens
(``tokenizer.encode(option, add_special_tokens=False)``), so write them as the token appears after
the prompt: with GPT-2-style BPE tokenizers usually with a leading space (``" Paris"``); with
SentencePiece (Llama) or word-level tokenizers as the bare word. Multi-token options are refused
with an :class:`~tuco_lens.InputError` naming the item and the option (scoring them would need a
convention for summing or averaging log-probabilities that the paper does not use).

Example:
    >>> from tuco_lens import demo
    >>> from tuco_lens.analyses.steering import steer_with_cv
    >>> result = steer_with_cv(pair, demo.multiple_choice_items(20, lang2=True), alphas=[0.75, 1.0, 1.25], n_folds=2)
    >>> round(result.delta, 3), result.chosen_alphas
    (0.0, [1.0, 1.25])
    >>> fig = result.figure()
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from tuco_lens.analyses._common import check_pair
from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.inputs import TokenBatch, run_batched
from tuco_lens.io import read_jsonl
from tuco_lens.pair import TuCoPair
from tuco_lens.plotting import plot_alpha_sweep
from tuco_lens.validation import check_alpha, check_int

__all__ = [
    "DEFAULT_ALPHAS",
    "ChoiceItem",
    "SteeringResult",
    "read_items",
    "option_token_ids",
    "alpha_accuracy",
    "cv_folds",
    "choose_alpha",
    "steer_with_cv",
]

DEFAULT_ALPHAS: tuple[float, ...] = (0.75, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25)
"""The paper's α grid (§5.1)."""

Objective = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item, validated.

    Attributes:
        prompt: Text that ends right before the answer token.
        options: Candidate answers (strings), at least two.
        answer_index: Index of the correct (or behaviour-matching) option.
    """

    prompt: str
    options: tuple[str, ...]
    answer_index: int


# ----------------------------------------------------------------------------------- inputs
def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        if name not in obj:
            raise KeyError(name)
        return obj[name]
    if not hasattr(obj, name):
        raise KeyError(name)
    return getattr(obj, name)


def _check_item(raw: Any, where: str) -> ChoiceItem:
    try:
        prompt, options, answer = (_field(raw, f) for f in ("prompt", "options", "answer_index"))
    except KeyError as exc:
        raise InputError(
            f"{where} has no {exc.args[0]!r}: every item needs 'prompt', 'options' and 'answer_index'."
        ) from None
    if not isinstance(prompt, str) or not prompt:
        raise InputError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}.")
    if isinstance(options, np.ndarray):
        options = options.tolist()
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
        raise InputError(f"{where}: 'options' must be a list of strings, got {type(options).__name__}.")
    options = tuple(options)
    if len(options) < 2:
        raise InputError(f"{where}: needs at least two options, got {len(options)}.")
    for k, option in enumerate(options):
        if not isinstance(option, str) or not option:
            raise InputError(f"{where}: option {k} must be a non-empty string, got {option!r}.")
    if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)):
        raise InputError(f"{where}: 'answer_index' must be an int, got {answer!r}.")
    if not 0 <= int(answer) < len(options):
        raise InputError(
            f"{where}: answer_index {int(answer)} is out of range for {len(options)} options."
        )
    return ChoiceItem(prompt, options, int(answer))


def read_items(items: Any) -> list[ChoiceItem]:
    """Validate multiple-choice items given in any supported form.

    Args:
        items: A list of objects or dicts with ``prompt``, ``options`` and ``answer_index``
            (e.g. :func:`tuco_lens.demo.multiple_choice_items`), a DataFrame with these
            columns, or the path of a JSONL file with these fields on every line.

    Raises:
        InputError: a missing field, an empty prompt, fewer than two options, or an
            ``answer_index`` out of range (the message names the item).
    """
    if isinstance(items, (str, os.PathLike)):
        path = Path(items)
        if not path.is_file():
            raise InputError(
                f"Items given as a string must be the path of a JSONL file; {str(path)!r} does not "
                "exist. Pass a list of items or a DataFrame otherwise."
            )
        rows = read_jsonl(path, [])
        return [_check_item(row, f"{path}:{k + 1} (item {k})") for k, row in enumerate(rows)] or _empty()
    if isinstance(items, pd.DataFrame):
        missing = [c for c in ("prompt", "options", "answer_index") if c not in items.columns]
        if missing:
            raise InputError(
                f"The items DataFrame lacks column(s) {missing}; it has {list(items.columns)}."
            )
        columns = ("prompt", "options", "answer_index")
        records = [dict(zip(columns, row)) for row in zip(*(items[c].tolist() for c in columns))]
        return [_check_item(r, f"item {k}") for k, r in enumerate(records)] or _empty()
    if isinstance(items, Sequence) and not isinstance(items, (bytes, bytearray)):
        return [_check_item(r, f"item {k}") for k, r in enumerate(items)] or _empty()
    raise InputTypeError(
        "items must be a list of items (objects or dicts with prompt, options, answer_index), a "
        f"DataFrame with those columns, or a JSONL path; got {type(items).__name__}."
    )


def _empty() -> list[ChoiceItem]:
    raise InputError("No items given: need at least one multiple-choice item.")


def option_token_ids(pair: TuCoPair, items: Sequence[ChoiceItem]) -> list[list[int]]:
    """The token id of every option of every item (fine-tuned tokenizer, no special tokens).

    Raises:
        InputError: an option that is not exactly one token, or two options of one item that
            are the same token (the message names the item and the option).
    """
    tokenizer = pair.tokenizer
    if tokenizer is None:
        raise InputError("The fine-tuned model has no tokenizer, so options cannot be encoded.")
    cache: dict[str, list[int]] = {}
    out = []
    for k, item in enumerate(items):
        ids = []
        for option in item.options:
            if option not in cache:
                cache[option] = list(tokenizer.encode(option, add_special_tokens=False))
            encoded = cache[option]
            if len(encoded) != 1:
                pieces = tokenizer.convert_ids_to_tokens(encoded) if encoded else []
                raise InputError(
                    f"Item {k}: option {option!r} is {len(encoded)} tokens {pieces} under the "
                    "fine-tuned tokenizer, but every option must be exactly one token (the answer "
                    "is read from the next-token distribution). Use single-token options such as "
                    "answer letters (with a leading space for GPT-2-style tokenizers, e.g. ' A')."
                )
            unk = getattr(tokenizer, "unk_token_id", None)
            if unk is not None and encoded[0] == unk:
                raise InputError(
                    f"Item {k}: option {option!r} is the unknown token {tokenizer.unk_token!r} of "
                    "the fine-tuned tokenizer (not in its vocabulary)."
                )
            if not 0 <= encoded[0] < pair.ft.cfg.d_vocab:
                raise InputError(
                    f"Item {k}: option {option!r} is token {encoded[0]}, outside the model's "
                    f"vocabulary of {pair.ft.cfg.d_vocab}."
                )
            ids.append(int(encoded[0]))
        if len(set(ids)) != len(ids):
            dup = next(o for o, i in zip(item.options, ids) if ids.count(i) > 1)
            raise InputError(
                f"Item {k}: options {list(item.options)} contain two that are the same token "
                f"(e.g. {dup!r}); options must be distinct tokens."
            )
        out.append(ids)
    return out


def _check_alphas(alphas: Any) -> tuple[float, ...]:
    if isinstance(alphas, torch.Tensor):
        alphas = alphas.tolist()
    if isinstance(alphas, (int, float)) and not isinstance(alphas, bool):
        alphas = [alphas]
    if not isinstance(alphas, (Sequence, np.ndarray)) or isinstance(alphas, str):
        raise InputTypeError(f"alphas must be a list of numbers, got {type(alphas).__name__}.")
    values = []
    for a in list(alphas):
        if isinstance(a, bool) or not isinstance(a, (int, float, np.integer, np.floating)):
            raise InputTypeError(f"alphas must be numbers, got {a!r}.")
        if not math.isfinite(float(a)):
            raise InputError(f"alphas must be finite, got {a}.")
        values.append(float(a))
    if not values:
        raise InputError("alphas is empty: pass at least one α.")
    if len(set(values)) != len(values):
        raise InputError(f"alphas has repeated values: {values}.")
    return tuple(values)


# ----------------------------------------------------------------------------------- scoring
def alpha_accuracy(
    pair: TuCoPair,
    items: Any,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    chat_template: bool = False,
    prepend_bos: bool | None = None,
    batch_size: int | None = None,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Answer every item at every α by next-token probability under the α-scaled model.

    For each batch of items (tokenized with :meth:`TuCoPair.tokenize`, left-padded) and each α,
    one α-scaled forward pass gives the next-token logits at the last prompt token; the item's
    answer is the option token with the highest logit (ties: the first such option). α = 1 runs
    the plain fine-tuned model (the scaling is the identity there, bit for bit).

    Args:
        pair: The model pair.
        items: Multiple-choice items (see :func:`read_items`).
        alphas: α grid (distinct finite numbers; the paper's by default).
        chat_template: Wrap each prompt as a user turn in the fine-tuned chat template (with the
            generation prompt). Leave False for prompts that are already formatted.
        prepend_bos: As in :meth:`TuCoPair.tokenize` (``None``: the model's default, no second
            BOS for prompts already starting with it).
        batch_size: Items per forward pass (``None``: all at once).
        show_progress: A progress bar over the batches at each α.

    Returns:
        A DataFrame with one row per (item, α), item-major in the grid's order: ``item``,
        ``alpha``, ``answer_index``, ``chosen`` (index of the chosen option), ``correct``
        (bool), ``answer_prob`` and ``chosen_prob`` (full-vocabulary softmax probabilities),
        ``option_probs`` (tuple, the softmax probability of every option token, so their sum is
        ≤ 1) and ``option_logits`` (tuple of the raw logits).

    Raises:
        InputError: invalid items, multi-token or duplicate options, or an invalid α grid.

    Example:
        >>> table = alpha_accuracy(pair, demo.multiple_choice_items(20, lang2=True), alphas=[0.0, 1.0, 1.5])
        >>> table.groupby("alpha").correct.mean()
        alpha
        0.0    0.50
        1.0    0.60
        1.5    0.65
        Name: correct, dtype: float64
    """
    check_pair(pair)
    grid = _check_alphas(alphas)
    for a in grid:
        check_alpha(a, pair.n_layers)
    parsed = read_items(items)
    option_ids = option_token_ids(pair, parsed)
    rows_per_pass = None if batch_size is None else check_int(batch_size, "batch_size", 1)
    batch = pair.tokenize([it.prompt for it in parsed], chat_template=chat_template, prepend_bos=prepend_bos)
    scores = [
        run_batched(
            batch, lambda sub, rows, alpha=alpha: _option_scores(pair, sub, [option_ids[i] for i in rows.tolist()], alpha),
            rows_per_pass, sort_by_length=False, show_progress=show_progress, desc=f"alpha accuracy (α = {alpha:g})",
        )
        for alpha in grid
    ]
    return _accuracy_table(parsed, grid, scores)


OptionScores = tuple[int, tuple[float, ...], tuple[float, ...]]
"""One item at one α: the chosen option, every option's probability and every option's logit."""


def _option_scores(pair: TuCoPair, sub: TokenBatch, option_ids: list[list[int]], alpha: float) -> list[OptionScores]:
    """Score the options of every row of a left-padded sub-batch at the last token, at ``alpha``."""
    context = nullcontext() if alpha == 1.0 else pair.scaled(alpha)
    with torch.no_grad(), context:
        last = pair.backend.forward(sub.tokens, sub.attention_mask)[:, -1].float()
    log_probs = torch.log_softmax(last, dim=-1)
    out = []
    for r, row_ids in enumerate(option_ids):
        ids = torch.tensor(row_ids, device=last.device)
        option_logits = last[r, ids]
        chosen = int(torch.argmax(option_logits))  # first maximum on ties
        out.append((chosen, tuple(log_probs[r, ids].exp().tolist()), tuple(option_logits.tolist())))
    return out


def _accuracy_table(items: list[ChoiceItem], grid: tuple[float, ...], scores: list[list[OptionScores]]) -> pd.DataFrame:
    """One record per (item, α), item-major (see :func:`alpha_accuracy`)."""
    records = []
    for i, item in enumerate(items):
        for j, alpha in enumerate(grid):
            chosen, probs, logits = scores[j][i]
            records.append(
                {
                    "item": i,
                    "alpha": alpha,
                    "answer_index": item.answer_index,
                    "chosen": chosen,
                    "correct": chosen == item.answer_index,
                    "answer_prob": probs[item.answer_index],
                    "chosen_prob": probs[chosen],
                    "option_probs": probs,
                    "option_logits": logits,
                }
            )
    return pd.DataFrame.from_records(records)


# ----------------------------------------------------------------------------------- CV
def cv_folds(n_items: int, n_folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Test folds of a k-fold split: a seeded shuffle cut into ``n_folds`` nearly equal parts.

    The folds are disjoint, together hold every index ``0..n_items-1`` exactly once, and their
    sizes differ by at most one (the first ``n_items % n_folds`` folds are one larger). Each
    fold's indices are sorted. The same ``seed`` always gives the same folds.

    Raises:
        InputError: ``n_folds < 2`` or ``n_folds > n_items``.

    Example:
        >>> [f.tolist() for f in cv_folds(5, 2, seed=0)]
        [[2, 3, 4], [0, 1]]
    """
    n_items = check_int(n_items, "n_items", 1)
    n_folds = check_int(n_folds, "n_folds", 2)
    if n_folds > n_items:
        raise InputError(
            f"n_folds = {n_folds} is more than the number of items ({n_items}); every fold needs "
            "at least one item. Use fewer folds or more items."
        )
    order = np.random.default_rng(check_int(seed, "seed", 0)).permutation(n_items)
    return [np.sort(part) for part in np.array_split(order, n_folds)]


def choose_alpha(
    alphas: Sequence[float], accuracies: Sequence[float], objective: Objective = "maximize"
) -> float:
    """The α with the best accuracy (highest for ``"maximize"``, lowest for ``"minimize"``).

    Ties (equal accuracies) go to the α closest to 1 — the least intervention — and, if two
    tied α are equally far from 1 (e.g. 0.9 and 1.1), to the smaller one.

    Example:
        >>> choose_alpha([0.9, 1.0, 1.1], [0.5, 0.7, 0.7])
        1.0
    """
    if objective not in ("maximize", "minimize"):
        raise InputError(f"objective must be 'maximize' or 'minimize', got {objective!r}.")
    if len(alphas) != len(accuracies) or not len(alphas):
        raise InputError("alphas and accuracies must be non-empty and of the same length.")
    values = np.asarray(accuracies, dtype=np.float64)
    best = values.max() if objective == "maximize" else values.min()
    tied = [float(a) for a, v in zip(alphas, values) if v == best]
    return min(tied, key=lambda a: (abs(a - 1.0), a))


@dataclass
class SteeringResult:
    """Cross-validated α steering: per-fold choices, test accuracies and the pooled Δ.

    Attributes:
        alphas: The candidate α grid.
        objective: ``"maximize"`` or ``"minimize"``.
        folds: Test-fold item indices (disjoint, complete); fold k trains on all the others.
        chosen_alphas: α* of every fold (best training-fold accuracy, ties towards α = 1).
        train_accuracy: DataFrame fold × α of training-fold accuracies.
        test_accuracy: Accuracy at α* on every test fold.
        test_accuracy_alpha1: Accuracy at α = 1 on the same test folds.
        cv_accuracy: Pooled test accuracy at the chosen α's (each item counted once).
        base_accuracy: Accuracy at α = 1 over all items.
        delta: ``cv_accuracy - base_accuracy``, the paper's Δ (pooled over folds).
        accuracy: Accuracy of all items at every evaluated α (``pd.Series`` indexed by α;
            includes α = 1 even when it is not a candidate).
        per_item: The :func:`alpha_accuracy` table (item × α).
        n_items: Number of items.
        seed: Fold seed.
    """

    alphas: tuple[float, ...]
    objective: str
    folds: list[np.ndarray]
    chosen_alphas: list[float]
    train_accuracy: pd.DataFrame
    test_accuracy: list[float]
    test_accuracy_alpha1: list[float]
    cv_accuracy: float
    base_accuracy: float
    delta: float
    accuracy: pd.Series
    per_item: pd.DataFrame = field(repr=False)
    n_items: int = 0
    seed: int = 0

    @property
    def table(self) -> pd.DataFrame:
        """One row per fold (see :meth:`to_dataframe`)."""
        return self.to_dataframe()

    def to_dataframe(self) -> pd.DataFrame:
        """One row per fold: ``fold``, ``n_train``, ``n_test``, ``alpha`` (α*),
        ``train_accuracy`` (at α*), ``test_accuracy``, ``test_accuracy_alpha1`` and ``delta``
        (test accuracy at α* minus at α = 1)."""
        rows = []
        for k, fold in enumerate(self.folds):
            a = self.chosen_alphas[k]
            rows.append(
                {
                    "fold": k,
                    "n_train": self.n_items - len(fold),
                    "n_test": len(fold),
                    "alpha": a,
                    "train_accuracy": float(self.train_accuracy.loc[k, a]),
                    "test_accuracy": self.test_accuracy[k],
                    "test_accuracy_alpha1": self.test_accuracy_alpha1[k],
                    "delta": self.test_accuracy[k] - self.test_accuracy_alpha1[k],
                }
            )
        return pd.DataFrame(rows)

    def summary(self) -> str:
        """A few lines: Δ, pooled accuracies and the α chosen per fold."""
        chosen = ", ".join(f"{a:g}" for a in self.chosen_alphas)
        return (
            f"α steering ({self.objective} accuracy, {len(self.folds)}-fold CV, {self.n_items} items): "
            f"Δ = {100 * self.delta:+.2f} points (CV accuracy {100 * self.cv_accuracy:.2f}% vs "
            f"{100 * self.base_accuracy:.2f}% at α = 1); α* per fold: {chosen}"
        )

    def figure(self, title: str | None = None) -> go.Figure:
        """Accuracy (all items) vs α, with the α chosen in each fold marked."""
        alphas = [float(a) for a in self.accuracy.index]
        fig = plot_alpha_sweep(
            alphas,
            {"accuracy (all items)": self.accuracy.to_numpy()},
            yaxis_title="accuracy",
            title=title
            or (
                f"Multiple-choice accuracy vs α ({self.objective}, {len(self.folds)}-fold CV)"
                f"<br><sup>Δ = accuracy(α*) − accuracy(1) = {100 * self.delta:+.2f} points, "
                f"n = {self.n_items} items</sup>"
            ),
        )
        counts: dict[float, list[int]] = {}
        for k, a in enumerate(self.chosen_alphas):
            counts.setdefault(a, []).append(k)
        xs = list(counts)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[float(self.accuracy.loc[a]) for a in xs],
                mode="markers",
                name="CV-chosen α*",
                marker=dict(symbol="star", size=16, color="crimson", line=dict(width=1, color="black")),
                customdata=[", ".join(map(str, counts[a])) for a in xs],
                hovertemplate="α* = %{x:.4f}<br>chosen in fold(s) %{customdata}"
                "<br>accuracy (all items) = %{y:.4f}<extra></extra>",
            )
        )
        return fig


def steer_with_cv(
    pair: TuCoPair,
    items: Any,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    objective: Objective = "maximize",
    n_folds: int = 5,
    seed: int = 0,
    chat_template: bool = False,
    prepend_bos: bool | None = None,
    batch_size: int | None = None,
    show_progress: bool = False,
) -> SteeringResult:
    """Choose α by k-fold cross-validation and report Δ accuracy versus α = 1 (§5.1).

    Every item is answered at every α once (:func:`alpha_accuracy`). The items are split into
    ``n_folds`` folds (:func:`cv_folds`: seeded shuffle, disjoint, complete, sizes within one).
    For each fold, α* is the α with the best accuracy on the other folds (:func:`choose_alpha`:
    argmax for ``"maximize"``, argmin for ``"minimize"``, ties towards α = 1) and is evaluated on
    the fold. Δ = (correct answers at each fold's α* − correct answers at α = 1) / n_items,
    pooled over the folds (each item is tested exactly once).

    Args:
        pair: The model pair.
        items: Multiple-choice items (list of objects/dicts, DataFrame or JSONL path).
        alphas: Candidate α's. α = 1 is always evaluated for the baseline; it is a candidate
            only if it is in ``alphas``.
        objective: ``"maximize"`` (steer towards the answers) or ``"minimize"`` (away).
        n_folds: Number of folds (2 ≤ n_folds ≤ number of items).
        seed: Fold seed.
        chat_template: As in :func:`alpha_accuracy`.
        prepend_bos: As in :func:`alpha_accuracy`.
        batch_size: As in :func:`alpha_accuracy`.
        show_progress: As in :func:`alpha_accuracy`.

    Returns:
        A :class:`SteeringResult`.

    Example:
        >>> items = demo.multiple_choice_items(20, lang2=True)
        >>> result = steer_with_cv(pair, items, alphas=[0.75, 1.0, 1.25], n_folds=2, objective="minimize")
        >>> print(result.summary())
        α steering (minimize accuracy, 2-fold CV, 20 items): Δ = +0.00 points (CV accuracy 60.00% vs 60.00% at α = 1); α* per fold: 0.75, 1
        >>> fig = result.figure()
    """
    if objective not in ("maximize", "minimize"):
        raise InputError(f"objective must be 'maximize' or 'minimize', got {objective!r}.")
    grid = _check_alphas(alphas)
    parsed = read_items(items)
    folds = cv_folds(len(parsed), n_folds, seed)  # validates n_folds before any forward pass
    evaluated = grid if 1.0 in grid else tuple(sorted(grid + (1.0,)))
    per_item = alpha_accuracy(
        pair,
        parsed,
        evaluated,
        chat_template=chat_template,
        prepend_bos=prepend_bos,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    correct = per_item.pivot(index="item", columns="alpha", values="correct").astype(float)
    correct = correct.loc[range(len(parsed))]
    accuracy = correct.mean(axis=0)[sorted(evaluated)]
    accuracy.index.name = "alpha"
    accuracy.name = "accuracy"
    return SteeringResult(
        alphas=grid, objective=objective, folds=folds, accuracy=accuracy, per_item=per_item, n_items=len(parsed),
        seed=seed, **_cross_validate(correct, folds, grid, objective),
    )


def _cross_validate(correct: pd.DataFrame, folds: list[np.ndarray], grid: tuple[float, ...], objective: Objective) -> dict[str, Any]:
    """Choose α on the training folds of every test fold; the :class:`SteeringResult` fields that
    this decides (``chosen_alphas``, the accuracies and ``delta``)."""
    train_rows, chosen, test_acc, test_acc1 = [], [], [], []
    hits_chosen = hits_base = 0.0
    all_items = np.arange(len(correct))
    for k, test in enumerate(folds):
        train = np.setdiff1d(all_items, test)
        train_acc = correct.iloc[train][list(grid)].mean(axis=0)
        train_rows.append(train_acc.rename(k))
        a = choose_alpha(list(grid), train_acc.to_list(), objective)
        chosen.append(a)
        test_acc.append(float(correct.iloc[test][a].mean()))
        test_acc1.append(float(correct.iloc[test][1.0].mean()))
        hits_chosen += float(correct.iloc[test][a].sum())
        hits_base += float(correct.iloc[test][1.0].sum())
    train_accuracy = pd.DataFrame(train_rows)
    train_accuracy.index.name = "fold"
    train_accuracy.columns.name = "alpha"
    n = len(correct)
    return dict(
        chosen_alphas=chosen, train_accuracy=train_accuracy, test_accuracy=test_acc, test_accuracy_alpha1=test_acc1,
        cv_accuracy=hits_chosen / n, base_accuracy=hits_base / n, delta=(hits_chosen - hits_base) / n,
    )
