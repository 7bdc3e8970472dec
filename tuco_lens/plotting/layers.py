"""Per-layer and per-token figures of one :class:`~tuco_lens.Decomposition`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tuco_lens.decomposition import Decomposition
from tuco_lens.plotting._util import (
    DEFAULT_COLORSCALE,
    PALETTE,
    check_decomposition,
    check_index,
    check_indices,
    check_labels,
    escape,
    norm_name,
    notebook_layout,
    prompt_label,
    real_positions,
    set_colours,
    to_numpy,
)

__all__ = ["MASSIVE_NORM_RATIO", "plot_layers", "plot_token_heatmap"]

#: ``plot_layers`` draws its norms on a log axis when the largest per-layer norm exceeds this
#: many times their median (a massive activation at the scored token).
MASSIVE_NORM_RATIO = 100.0


def _has_massive_norm(norms: np.ndarray) -> bool:
    """Whether the largest positive norm exceeds :data:`MASSIVE_NORM_RATIO` times their median."""
    positive = norms[np.isfinite(norms) & (norms > 0)]
    return positive.size > 0 and float(positive.max()) > MASSIVE_NORM_RATIO * float(np.median(positive))


def plot_layers(
    dec: Decomposition,
    prompts: int | Sequence[int] | None = None,
    *,
    labels: Sequence[str] | None = None,
    cumulative_norms: bool = False,
    log_norms: bool | None = None,
    title: str | None = None,
) -> go.Figure:
    """PTC/FTC norms per layer and the cumulative ratio β_l, at the last real token.

    Top panel: ``||PTC_l||`` (solid) and ``||FTC_l||`` (dashed) per layer, or with
    ``cumulative_norms=True`` the norms of the running sums ``||Σ_{s≤l} PTC_s||`` and
    ``||Σ_{s≤l} FTC_s||``. Bottom panel: ``β_l`` (TuCo of blocks ``0..l``; its last point is
    the prompt's TuCo), y fixed to [0, 1]. One colour and one legend group per prompt; the
    legend sits under the plot. A prompt's label is the start of its text without special
    tokens, or the name you give in ``labels`` (then coloured like that set in every figure,
    see :func:`~tuco_lens.plotting.set_colours`).

    Massive activations: real models write a few huge values (|x| ≈ 10^3-10^4) into the stream
    at the first token and at some delimiters, such as the newline that ends a ChatML generation
    prompt. When the scored token is one of them, one layer's norm is hundreds of times the
    others' and a linear axis flattens every other layer to zero; the norm axis is then
    logarithmic (``log_norms=None``: when the largest per-layer norm ``||PTC_l||`` or
    ``||FTC_l||`` of the drawn prompts exceeds :data:`MASSIVE_NORM_RATIO` times their median,
    whichever norms the top panel draws). On a log axis exact zeros (blocks the fine-tune left
    unchanged) are not drawn.

    Reads ``dec.ptc_norm``, ``dec.ftc_norm`` (or the ``*_cum_norm`` tables) and ``dec.beta``,
    all ``[batch, layer, pos]``, at ``dec.last_index``.

    Args:
        dec: The decomposition.
        prompts: Prompt index or indices to draw; ``None`` draws every prompt.
        labels: One legend label per drawn prompt, e.g. the names of the sets the prompts
            come from.
        cumulative_norms: Plot the norms of the cumulative sums instead of per-layer norms.
        log_norms: Logarithmic norm axis: ``True``, ``False``, or ``None`` (automatic, above).
        title: Figure title (a default names the norm).

    Returns:
        A two-row ``plotly.graph_objects.Figure``; three traces per prompt (PTC, FTC, β).

    Raises:
        InputError: If a prompt index is out of range, or ``labels`` does not give one
            distinct label per drawn prompt.

    Example:
        >>> dec = pair.decompose(prompts, chat_template=True)
        >>> fig = plot_layers(dec)                       # fig.show() in a notebook
        >>> fig = plot_layers(dec, labels=["forbidden", "harmless"])
        >>> fig = plot_layers(dec, prompts=[1], cumulative_norms=True)
        >>> type(fig).__name__
        'Figure'
    """
    dec = check_decomposition(dec)
    indices = check_indices(dec, prompts)
    names, colours = _names_and_colours(dec, indices, labels)
    series = _layer_series(dec, cumulative_norms)
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=(
            f"{'norms of the running sums' if cumulative_norms else 'norms'}: PTC solid, FTC dashed",
            "β<sub>l</sub> = TuCo of blocks 0..l",
        ),
    )
    for k, i in enumerate(indices):
        for row, trace in _prompt_traces(dec, i, escape(names[k]), colours[k], series):
            fig.add_trace(trace, row=row, col=1)
    _layers_axes(fig, dec, indices, log_norms)
    notebook_layout(fig, title or f"PTC and FTC per layer at the last token ({norm_name(dec)})", height=600)
    fig.update_layout(hovermode="closest")
    fig.update_annotations(x=0, xanchor="left", font_size=13)  # the subplot titles: left-aligned, small
    return fig


def _names_and_colours(
    dec: Decomposition, indices: list[int], labels: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Legend names and colours of the drawn prompts: the labels' set colours, else palette order."""
    names = check_labels(labels, len(indices))
    if names is None:
        return [prompt_label(dec, i) for i in indices], [PALETTE[k % len(PALETTE)] for k in range(len(indices))]
    return names, list(set_colours(names).values())


def _layer_series(dec: Decomposition, cumulative_norms: bool) -> list[tuple[np.ndarray, str]]:
    """PTC, FTC and β at the last token (each ``[batch, layer]``), with the names their hovers give."""
    norm = norm_name(dec)
    if cumulative_norms:
        ptc, ftc = dec.at_last_token(dec.ptc_cum_norm), dec.at_last_token(dec.ftc_cum_norm)
        ptc_name, ftc_name = f"‖Σ<sub>s≤l</sub> PTC<sub>s</sub>‖ ({norm})", f"‖Σ<sub>s≤l</sub> FTC<sub>s</sub>‖ ({norm})"
    else:
        ptc, ftc = dec.at_last_token(dec.ptc_norm), dec.at_last_token(dec.ftc_norm)
        ptc_name, ftc_name = f"‖PTC<sub>l</sub>‖ ({norm})", f"‖FTC<sub>l</sub>‖ ({norm})"
    return [(to_numpy(ptc), ptc_name), (to_numpy(ftc), ftc_name), (to_numpy(dec.at_last_token(dec.beta)), "β<sub>l</sub>")]


#: The style and the panel (row) of the PTC, FTC and β traces of a prompt; only PTC is in the legend.
_TRACE_STYLES: tuple[tuple[int, dict[str, object]], ...] = (
    (1, {"line_dash": "solid"}),
    (1, {"showlegend": False, "line_dash": "dash", "marker_symbol": "diamond"}),
    (2, {"showlegend": False}),
)


def _prompt_traces(
    dec: Decomposition, i: int, label: str, colour: str, series: list[tuple[np.ndarray, str]]
) -> list[tuple[int, go.Scatter]]:
    """``(row, trace)`` of prompt ``i``'s PTC, FTC and β, in one legend group."""
    meta = [label, escape(dec.str_tokens[i][int(dec.last_index[i])])]
    head = "%{meta[0]}<br>last token: %{meta[1]}<br>layer %{x}<br>"
    common = dict(x=np.arange(dec.n_layers), legendgroup=f"prompt{i}", meta=meta, line_color=colour, mode="lines+markers")
    return [
        (row, go.Scatter(y=values[i], name=label, hovertemplate=f"{head}{name} = %{{y:.4f}}<extra></extra>",
                         **style, **common))
        for (row, style), (values, name) in zip(_TRACE_STYLES, series)
    ]


def _layers_axes(fig: go.Figure, dec: Decomposition, indices: list[int], log_norms: bool | None) -> None:
    """The layer axis, the norm axis (logarithmic on request or, with ``None``, for a massive norm) and β's."""
    norm = norm_name(dec)
    fig.update_xaxes(title_text="layer (block)", dtick=1 if dec.n_layers <= 40 else None, row=2, col=1)
    if log_norms is None:  # decided on the per-layer norms, whichever are drawn
        per_layer = [to_numpy(dec.at_last_token(t))[indices] for t in (dec.ptc_norm, dec.ftc_norm)]
        log_norms = _has_massive_norm(np.concatenate(per_layer, axis=None))
    if log_norms:
        fig.update_yaxes(title_text=f"{norm} norm (log scale)", type="log", row=1, col=1)
    else:
        fig.update_yaxes(title_text=f"{norm} norm", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="β<sub>l</sub>", range=[0, 1], row=2, col=1)


def plot_token_heatmap(
    dec: Decomposition,
    index: int = 0,
    *,
    label: str | None = None,
    colorscale: str | list = DEFAULT_COLORSCALE,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of the cumulative ratio β (layers × real tokens) for one prompt.

    Cell ``(l, t)`` is ``β_l`` at token ``t``: the share of fine-tuning in the residual-stream
    updates of blocks ``0..l`` at that token; the top row is the per-token TuCo and its last
    cell the prompt's TuCo. x values are real-token positions (0 = first real token) with
    the token strings as tick labels, so repeated tokens stay separate columns. The colour
    scale is fixed to [0, 1]. One ``go.Heatmap`` trace, no per-cell shapes: 512 tokens × 32
    layers stays small and responsive.

    Reads ``dec.beta[index]`` (``[layer, pos]``), ``dec.attention_mask[index]`` (``[pos]``) and
    ``dec.str_tokens[index]``.

    Args:
        dec: The decomposition.
        index: Which prompt.
        label: Name of the prompt in the subtitle (e.g. its set); default: the start of its
            text without special tokens.
        colorscale: Any plotly colorscale.
        title: Figure title (default: what is shown, with the prompt's label and TuCo below).

    Returns:
        A ``plotly.graph_objects.Figure`` with one ``Heatmap`` trace.

    Raises:
        InputError: If ``index`` is out of range.

    Example:
        >>> fig = plot_token_heatmap(pair.decompose(prompts, chat_template=True), index=0)
        >>> type(fig).__name__                           # fig.show() in a notebook
        'Figure'
    """
    dec = check_decomposition(dec)
    i = check_index(dec, index)
    positions = real_positions(dec, i)
    z = to_numpy(dec.beta[i])[:, positions]  # [layer, n_real], NaN-free
    labels = [escape(dec.str_tokens[i][p]) for p in positions]
    x = np.arange(len(positions))
    text = [labels] * dec.n_layers  # hover text per cell: the token of that column
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=np.arange(dec.n_layers),
            text=text,
            zmin=0.0,
            zmax=1.0,
            colorscale=colorscale,
            colorbar=dict(title=dict(text="β<sub>l</sub>"), thickness=14),
            hovertemplate="token: %{text}<br>position: %{x}<br>layer: %{y}<br>β<sub>l</sub> = %{z:.4f}<extra></extra>",
        )
    )
    tuco = float(dec.tuco[i])
    default = f"β<sub>l</sub> per layer and token<br><sup>{escape(label or prompt_label(dec, i))} · TuCo = {tuco:.4f}</sup>"
    notebook_layout(fig, title or default, legend=False)
    fig.update_layout(
        xaxis=dict(title="token", tickmode="array", tickvals=x, ticktext=labels, tickangle=-45 if len(x) > 8 else 0),
        yaxis=dict(title="layer (blocks 0..l)", dtick=1 if dec.n_layers <= 40 else None),
    )
    return fig
