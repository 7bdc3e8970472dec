"""TuCo of the same requests under prompt transformations (paper §5.3: conjugate prompting,
GCG adversarial suffixes, or any user function)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from tuco_lens.analyses._common import (
    apply_checked,
    auc_or_nan,
    check_common,
    check_pair,
    groups_of,
    mean_sem,
    score,
    tpr_or_nan,
)
from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.io import PromptSource, read_prompts
from tuco_lens.pair import TuCoPair
from tuco_lens.plotting import plot_prompt_sets
from tuco_lens.plotting._util import escape, shorten
from tuco_lens.validation import check_callable

__all__ = ["TransformationComparison", "compare_transformations", "suffix_transform", "identity"]

Transform = Callable[[str], str]


def identity(text: str) -> str:
    """The unchanged request (the default ``"original"`` reference)."""
    return text


def suffix_transform(suffix: str, separator: str = " ") -> Transform:
    """A transformation appending an (e.g. GCG adversarial) string to the request.

    Args:
        suffix: The string to append.
        separator: Put between the request and the suffix (default one space).

    Example:
        >>> add = suffix_transform("the fox eats berries .")
        >>> add("hello , describe the doomsalt .")
        'hello , describe the doomsalt . the fox eats berries .'
    """
    if not isinstance(suffix, str) or not isinstance(separator, str):
        raise InputTypeError("suffix and separator must be strings.")
    if not suffix:
        raise InputError("suffix is empty: pass the string to append.")
    return _AppendSuffix(suffix, separator)


@dataclass
class _AppendSuffix:
    """``request + separator + suffix``: the transformation :func:`suffix_transform` returns."""

    suffix: str
    separator: str

    def __post_init__(self) -> None:
        self.__name__ = f"suffix_transform({self.suffix[:20]!r})"

    def __call__(self, text: str) -> str:
        return f"{text}{self.separator}{self.suffix}"


@dataclass(frozen=True)
class TransformationComparison:
    """TuCo of every request under every transformation, and the separation from the reference.

    Attributes:
        table: One row per (transformation, request): ``transformation``, ``index`` (request
            position), ``request`` (as given), ``prompt`` (after the transformation and
            ``wrap``, before any chat template), ``tuco``.
        summary: One row per transformation, **ordered by mean TuCo, highest first**:
            ``transformation``, ``n``, ``mean_tuco``, ``sem_tuco``, ``median_tuco``,
            ``auc_vs_reference`` (ROC AUC of TuCo with the reference prompts as the positive
            set: the probability that a reference prompt scores above a transformed one; NaN
            for the reference), ``tpr_at_5_fpr`` (same roles), ``mean_delta`` (mean paired
            difference transformed − reference, per request), ``frac_lower`` (fraction of
            requests whose transformed TuCo is strictly below the reference's).
        reference: Name of the reference transformation.
        chat_template: Whether the chat template was applied after the transformation.
        norm: The norm TuCo used.
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    reference: str
    chat_template: bool
    norm: str

    @property
    def order(self) -> list[str]:
        """Transformations by decreasing mean TuCo."""
        return list(self.summary["transformation"])

    def scores(self, name: str) -> np.ndarray:
        """TuCo of the requests under transformation ``name``, in request order. ``[n]``"""
        if name not in self.order:
            raise InputError(f"Unknown transformation {name!r}; they are {self.order}.")
        return self.table.loc[self.table["transformation"] == name, "tuco"].to_numpy(dtype=np.float64)

    def auc(self, name: str) -> float:
        """ROC AUC of TuCo separating the reference (positive) from transformation ``name``."""
        if name == self.reference:
            raise InputError(f"{name!r} is the reference; pick another transformation.")
        return auc_or_nan(self.scores(self.reference), self.scores(name))

    def to_dataframe(self) -> pd.DataFrame:
        """A copy of :attr:`table`."""
        return self.table.copy()

    def figure(self, kind: Literal["histogram", "violin"] = "violin", *, title: str | None = None) -> go.Figure:
        """TuCo distribution per transformation (ordered by mean TuCo), AUC vs the reference in
        each trace's name."""
        s = self.summary.set_index("transformation")
        fig = plot_prompt_sets(
            {name: self.scores(name) for name in self.order},  # colours follow the names
            kind=kind,
            title=title or (
                "TuCo by prompt transformation"
                f"<br><sup>AUC in the legend: {escape(self.reference)} as positive · "
                f"n = {len(self.scores(self.reference))} requests each</sup>"
            ),
        )
        for i, name in enumerate(self.order):
            if name != self.reference:
                fig.update_traces(name=f"{escape(shorten(name))} (AUC {s.loc[name, 'auc_vs_reference']:.3f})", selector=i)
        return fig


def compare_transformations(
    pair: TuCoPair,
    requests: PromptSource,
    transforms: Mapping[str, Transform],
    *,
    reference: str = "original",
    wrap: Transform | None = None,
    chat_template: bool = False,
    batch_size: int | None = None,
    show_progress: bool = False,
    norm: str = "l1",
) -> TransformationComparison:
    """TuCo of the same requests under several transformations, ordered, with AUCs.

    Reproduces the paper's §5.3 analyses: adversarial (GCG) strings appended to harmful
    instructions lower TuCo (AUC 0.78–1.0 separating plain from attacked, plain as positive),
    and in conjugate prompting the same requests in other languages order as
    En > Ja > Hu > Sw ≈ Ml. Each prompt is built as ``wrap(transform(request))`` and then, with
    ``chat_template=True``, wrapped in the fine-tuned chat template **after** the transformation
    (so a translated or suffixed request is still a well-formed user turn).

    Args:
        pair: The pre-trained / fine-tuned pair.
        requests: The requests: a list, a DataFrame with a ``prompt`` column, or a ``.jsonl`` /
            ``.txt`` path.
        transforms: ``{name: function(request) -> prompt}``, e.g. ``{"japanese": translate_ja,
            "gcg 1": suffix_transform(gcg_string)}``. Order is kept for ties.
        reference: Name of the reference (positive) transformation. If it is ``"original"``
            and not in ``transforms``, the unchanged requests are added under that name.
        wrap: Optional function applied after every transformation (e.g. a hand-written chat
            format or a system prompt); applied to the reference too.
        chat_template: Apply the fine-tuned chat template after the transformation and wrap.
        batch_size: Prompts per forward pass (``None``: one pass per transformation).
        show_progress: Progress bars.
        norm: ``"l1"`` (the paper's) or ``"l2"``.

    Returns:
        A :class:`TransformationComparison` (``table``, ordered ``summary`` with AUCs,
        ``figure()``).

    Raises:
        InputError: No transformations (besides the reference), no requests, an unknown
            reference, a transformation that fails or gives an empty prompt.
        InputTypeError: A transformation that is not callable or does not return a string.

    Example:
        >>> from tuco_lens import demo
        >>> from tuco_lens.analyses import compare_transformations, suffix_transform
        >>> harmful = [r.text for r in demo.requests("heldout", ["potions"])][:10]
        >>> cmp = compare_transformations(pair, harmful, {
        ...     "language 2": demo.translate,
        ...     "suffix": suffix_transform("the fox eats berries ."),
        ... }, chat_template=True)
        >>> cmp.summary[["transformation", "mean_tuco", "auc_vs_reference"]].round(3)
          transformation  mean_tuco  auc_vs_reference
        0       original      0.551               NaN
        1     language 2      0.315               1.0
        2         suffix      0.277               1.0
    """
    pair = check_pair(pair)
    norm = check_common(batch_size, norm)
    request_list = read_prompts(requests, name="requests")
    all_transforms = _with_reference(transforms, reference)
    check_callable(wrap, "wrap")
    frames = []
    for name, fn in all_transforms.items():
        prompts = [_transformed(fn, name, wrap, request, i) for i, request in enumerate(request_list)]
        tuco = score(pair, prompts, chat_template=chat_template, batch_size=batch_size, show_progress=show_progress, norm=norm)
        frames.append(
            pd.DataFrame({"transformation": name, "index": range(len(prompts)), "request": request_list, "prompt": prompts, "tuco": tuco})
        )
    table = pd.concat(frames, ignore_index=True)
    return TransformationComparison(
        table=table, summary=_summary(table, reference), reference=reference, chat_template=bool(chat_template), norm=norm
    )


def _with_reference(transforms: Mapping[str, Transform], reference: str) -> dict[str, Transform]:
    """The checked transformations, with ``"original"`` (:func:`identity`) first if it is the
    reference and not among them."""
    if not isinstance(transforms, Mapping):
        raise InputTypeError(f"transforms must be a dict {{name: function}}, got {type(transforms).__name__}.")
    for name, fn in transforms.items():
        if not isinstance(name, str):
            raise InputTypeError(f"Transformation names must be strings, got {name!r}.")
        if not callable(fn):
            raise InputTypeError(f"Transformation {name!r} is not a function ({type(fn).__name__}).")
    all_transforms = dict(transforms)
    if reference not in all_transforms:
        if reference != "original":
            raise InputError(f"Unknown reference {reference!r}; the transformations are {list(all_transforms)}.")
        all_transforms = {"original": identity, **all_transforms}
    if len(all_transforms) < 2:
        raise InputError("Pass at least one transformation besides the reference.")
    return all_transforms


def _transformed(fn: Transform, name: str, wrap: Transform | None, request: str, i: int) -> str:
    """``wrap(fn(request))``, checked to be a non-empty string; errors name the transformation and request."""
    text = apply_checked(fn, request, f"Transformation {name!r} on request {i}")
    if wrap is not None:
        text = apply_checked(wrap, text, f"wrap on request {i} after {name!r}")
    if not isinstance(text, str):
        raise InputTypeError(f"Transformation {name!r} returned {type(text).__name__} for request {i}, not a str.")
    if not text:
        raise InputError(f"Transformation {name!r} returned an empty prompt for request {i}.")
    return text


def _summary(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """One row per transformation, ordered by mean TuCo (highest first; ties in input order)."""
    groups = groups_of(table, "transformation", "tuco")
    ref = groups[reference]
    rows = []
    for position, (name, values) in enumerate(groups.items()):
        is_ref = name == reference
        rows.append(
            {
                "transformation": name,
                "n": values.size,
                **mean_sem(values, "tuco"),
                "median_tuco": float(np.median(values)),
                "auc_vs_reference": float("nan") if is_ref else auc_or_nan(ref, values),
                "tpr_at_5_fpr": float("nan") if is_ref else tpr_or_nan(ref, values, 0.05),
                "mean_delta": 0.0 if is_ref else float((values - ref).mean()),
                "frac_lower": float("nan") if is_ref else float((values < ref).mean()),
                "_position": position,
            }
        )
    return (
        pd.DataFrame(rows)
        .sort_values(["mean_tuco", "_position"], ascending=[False, True], kind="stable")
        .drop(columns="_position")
        .reset_index(drop=True)
    )
