"""Figures across many prompts: TuCo distributions of prompt sets, and metrics versus α."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import plotly.graph_objects as go
from torch import Tensor

from tuco_lens.decomposition import Decomposition
from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.metrics import as_scores, roc_auc, tpr_at_fpr
from tuco_lens.plotting._util import escape, notebook_layout, set_colours, title_lines

__all__ = ["plot_prompt_sets", "plot_alpha_sweep"]

Values = Tensor | np.ndarray | Sequence[float]


def _named_scores(scores: Mapping[str, Values | Decomposition]) -> dict[str, np.ndarray]:
    if not isinstance(scores, Mapping):
        raise InputTypeError(f"scores must be a dict {{set name: scores}}, got {type(scores).__name__}.")
    if not scores:
        raise InputError("scores is empty: pass at least one named prompt set.")
    out = {}
    for name, values in scores.items():
        if isinstance(values, Decomposition):
            values = values.tuco
        out[str(name)] = as_scores(values, f"prompt set {name!r}")
    return out


def _other_set(names: list[str], given: str) -> str:
    """The set that is not ``given``, when there are exactly two."""
    others = [n for n in names if n != given]
    if len(others) != 1:
        raise InputError(
            "Pass both positive= and negative= (the two sets to compare); with exactly two sets "
            "one of them is enough."
        )
    return others[0]


def _pick_pair(names: list[str], positive: str | None, negative: str | None) -> tuple[str, str] | None:
    if positive is None:
        if negative is None:
            return None
        positive = _other_set(names, negative)
    elif negative is None:
        negative = _other_set(names, positive)
    for role, name in (("positive", positive), ("negative", negative)):
        if name not in names:
            raise InputError(f"Unknown prompt set {name!r} for {role}=; the sets are {names}.")
    if positive == negative:
        raise InputError(f"positive and negative are the same set ({positive!r}).")
    return positive, negative


def plot_prompt_sets(
    scores: Mapping[str, Values | Decomposition],
    kind: Literal["histogram", "violin"] = "histogram",
    positive: str | None = None,
    negative: str | None = None,
    *,
    nbins: int = 30,
    value_name: str = "TuCo",
    title: str | None = None,
) -> go.Figure:
    """Distributions of TuCo (or any score) for several named prompt sets, with ROC AUC.

    With ``positive`` and ``negative`` set, the subtitle reports ``roc_auc(positive, negative)``
    (the probability that a positive prompt scores higher, ties 1/2), the TPR at 5% FPR and
    the size of each of the two sets. Histograms share one set of bins and are normalised per
    set (fraction of the set), so sets of different sizes compare. Each set has the colour of
    its name (:func:`~tuco_lens.plotting.set_colours`), the same in every figure; the
    legend sits under the plot.

    Args:
        scores: ``{set name: scores}``; each value a 1-D tensor / array / list (e.g.
            ``dec.tuco``), or a :class:`~tuco_lens.Decomposition` (its ``tuco`` is used).
        kind: ``"histogram"`` (overlaid) or ``"violin"`` (box and mean line inside).
        positive: Name of the set expected to score higher (e.g. chat prompts).
        negative: Name of the other set. With exactly two sets, giving one of the two is enough.
        nbins: Number of shared histogram bins.
        value_name: Axis label of the scores.
        title: Title (plotly text; HTML tags allowed); the AUC line is appended to it.

    Returns:
        A ``plotly.graph_objects.Figure`` with one trace per set, in the dict's order.

    Raises:
        InputError: If ``scores`` or a set is empty, a set has NaN, a set name is unknown, or
            ``kind`` is not supported.

    Example:
        >>> sets = demo.prompt_sets()
        >>> chat, web = pair.decompose(sets["chat"][:5]), pair.decompose(sets["web"][:5])
        >>> fig = plot_prompt_sets({"chat": chat.tuco, "web text": web.tuco}, positive="chat",
        ...                        negative="web text")
        >>> type(fig).__name__
        'Figure'
    """
    if kind not in ("histogram", "violin"):
        raise InputError(f"kind must be 'histogram' or 'violin', got {kind!r}.")
    if isinstance(nbins, bool) or not isinstance(nbins, int) or nbins < 1:
        raise InputError(f"nbins must be a positive int, got {nbins!r}.")
    sets = _named_scores(scores)
    pair = _pick_pair(list(sets), positive, negative)
    fig = go.Figure()
    colours = set_colours(list(sets))
    if kind == "histogram":
        bins = _shared_bins(sets, nbins)
        for name, values in sets.items():
            fig.add_trace(_histogram(name, values, colours[name], bins, value_name))
        fig.update_layout(barmode="overlay", xaxis_title=value_name, yaxis_title="fraction of set")
    else:
        for name, values in sets.items():
            fig.add_trace(_violin(name, values, colours[name], value_name))
        fig.update_layout(xaxis_title="prompt set", yaxis_title=value_name)
    notebook_layout(fig, _sets_heading(sets, pair, title if title else f"{value_name} by prompt set"))
    fig.update_layout(legend_title_text="prompt set")
    return fig


def _shared_bins(sets: dict[str, np.ndarray], nbins: int) -> dict[str, float]:
    """``nbins`` equal histogram bins over the finite values of every set."""
    everything = np.concatenate(list(sets.values()))
    finite = everything[np.isfinite(everything)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    # Bins are left-closed: widen them a hair so the maximum falls in the last of nbins bins.
    size = (high - low) / nbins * (1 + 1e-9) if high > low else 1.0 / nbins
    return dict(start=low, end=low + nbins * size, size=size)


def _histogram(name: str, values: np.ndarray, colour: str, bins: dict[str, float], axis: str) -> go.Histogram:
    """One set's histogram, as a fraction of the set."""
    return go.Histogram(
        x=values, name=escape(name), xbins=bins, histnorm="probability", marker_color=colour,
        opacity=0.6, autobinx=False,
        hovertemplate=f"%{{fullData.name}}<br>{axis} in %{{x}}<br>fraction = %{{y:.4f}}<extra></extra>",
    )


def _violin(name: str, values: np.ndarray, colour: str, axis: str) -> go.Violin:
    """One set's violin, with its box, mean line and (up to 200) points."""
    return go.Violin(
        y=values, name=escape(name), line_color=colour, box_visible=True, meanline_visible=True,
        points="all" if values.size <= 200 else "outliers",
        hovertemplate=f"%{{fullData.name}}<br>{axis} = %{{y:.4f}}<extra></extra>",
    )


def _sets_heading(sets: dict[str, np.ndarray], pair: tuple[str, str] | None, heading: str) -> str:
    """The title, with the ROC AUC, TPR at 5% FPR and sizes of ``pair`` below it (one line if it fits)."""
    if pair is None:
        return heading
    pos, neg = pair
    auc = roc_auc(sets[pos], sets[neg])
    tpr = tpr_at_fpr(sets[pos], sets[neg], fpr=0.05)
    scores_line = f"ROC AUC ({escape(pos)} vs {escape(neg)}) = {auc:.4f} · TPR at 5% FPR = {tpr:.4f}"
    counts = f"n = {sets[pos].size} {escape(pos)}, {sets[neg].size} {escape(neg)}"
    fits = len(title_lines(f"{scores_line} · {counts}")[0]) <= 95  # one subtitle line at 650 px
    return heading + (f"<br><sup>{scores_line} · {counts}</sup>" if fits else f"<br><sup>{scores_line}</sup><br><sup>{counts}</sup>")


def plot_alpha_sweep(
    alphas: Values,
    metrics: Mapping[str, Values] | Values,
    errors: Mapping[str, Values] | None = None,
    *,
    reference: float | None = 1.0,
    yaxis_title: str = "metric",
    title: str | None = None,
) -> go.Figure:
    """User metrics (refusal rate, answer probability, accuracy...) as functions of α.

    Points are drawn with lines in increasing α; a vertical dashed line marks α = 1 (the
    fine-tuned model) and α = 0 is the pre-trained blocks on the fine-tuned embedding. Each
    metric has the colour of its name (name a metric after its prompt set, e.g. ``"harmful"``,
    to colour it like that set elsewhere).

    Args:
        alphas: The α grid. ``[n_alpha]``
        metrics: ``{metric name: values}``, each ``[n_alpha]``; a single sequence is named
            ``"metric"``.
        errors: Optional ``{metric name: symmetric error}`` (e.g. standard errors), each
            ``[n_alpha]``; names must be keys of ``metrics``.
        reference: Where to draw the dashed vertical line (``None``: no line).
        yaxis_title: Label of the y axis.
        title: Figure title.

    Returns:
        A ``plotly.graph_objects.Figure`` with one ``Scatter`` per metric.

    Raises:
        InputError: If a length differs from ``len(alphas)``, a set is empty, an α is not
            finite, or an error name is not a metric.

    Example:
        >>> alphas = [0.75, 0.9, 1.0, 1.1, 1.25]
        >>> fig = plot_alpha_sweep(alphas, {"refusal rate": [0.2, 0.4, 0.6, 0.7, 0.9]},
        ...                        errors={"refusal rate": [0.05] * 5})
        >>> [trace.name for trace in fig.data]
        ['refusal rate']
    """
    x = as_scores(alphas, "alphas")
    if not np.isfinite(x).all():
        raise InputError("alphas must be finite numbers.")
    order = np.argsort(x, kind="stable")
    curves = _sweep_curves(x, order, metrics, errors)
    fig = go.Figure()
    colours = set_colours([name for name, _, _ in curves])
    for name, y, error in curves:
        fig.add_trace(
            go.Scatter(
                x=x[order], y=y, name=escape(name), mode="lines+markers",
                error_y=None if error is None else dict(type="data", array=error, visible=True),
                line_color=colours[name],
                hovertemplate="%{fullData.name}<br>α = %{x:.4f}<br>value = %{y:.4f}<extra></extra>",
            )
        )
    if reference is not None:
        fig.add_vline(
            x=float(reference), line_dash="dash", line_color="grey",
            annotation_text="fine-tuned (α = 1)" if float(reference) == 1.0 else f"α = {float(reference):g}",
            annotation_position="top",
        )
    notebook_layout(fig, title or "Metrics under FTC α-scaling")
    fig.update_layout(
        xaxis_title="α (scale of the fine-tuning component)",
        yaxis_title=yaxis_title,
        legend_title_text="",
        hovermode="x unified" if len(curves) > 1 else "closest",
    )
    return fig


def _sweep_curves(
    x: np.ndarray, order: np.ndarray, metrics: Mapping[str, Values] | Values, errors: Mapping[str, Values] | None
) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """``(name, values, error or None)`` of each metric, checked against ``x`` and sorted by it."""
    if not isinstance(metrics, Mapping):
        metrics = {"metric": metrics}
    if not metrics:
        raise InputError("metrics is empty: pass at least one {name: values}.")
    errors = dict(errors or {})
    unknown = sorted(set(map(str, errors)) - set(map(str, metrics)))
    if unknown:
        raise InputError(f"errors has names that are not metrics: {unknown}; metrics are {list(metrics)}.")
    curves = []
    for name, values in metrics.items():
        y = _sorted_like(values, x, order, f"metrics[{name!r}]")
        error = errors.get(name)
        curves.append((str(name), y, None if error is None else _sorted_like(error, x, order, f"errors[{name!r}]")))
    return curves


def _sorted_like(values: Values, x: np.ndarray, order: np.ndarray, what: str) -> np.ndarray:
    """``values`` as float64, checked to have the shape of ``x``, in the order ``order``."""
    if isinstance(values, Tensor):
        values = values.detach().cpu()
    array = np.asarray(values, dtype=np.float64)
    if array.shape != x.shape:
        raise InputError(f"{what} has shape {tuple(array.shape)}, expected ({x.size},) like alphas.")
    return array[order]
