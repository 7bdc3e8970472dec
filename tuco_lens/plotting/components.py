"""Figures of the split inside a block: components per layer, heads, and promoted / suppressed tokens."""

from __future__ import annotations

import plotly.graph_objects as go

from tuco_lens.attribution import LogitAttribution
from tuco_lens.decomposition import Decomposition
from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.plotting._util import (
    PALETTE,
    check_decomposition,
    check_index,
    escape,
    norm_name,
    notebook_layout,
    prompt_label,
    to_numpy,
)

__all__ = ["plot_components", "plot_head_heatmap", "plot_top_tokens"]

_NAMES = {
    "attn": "attention A_FT(x) − A_PT(x)",
    "mlp": "MLP M_FT(y) − M_PT(y)",
    "mlp_via_attn": "MLP←attention M_PT(y) − M_PT(y′)",
}


def _with_components(dec: object, what: str) -> Decomposition:
    dec = check_decomposition(dec)
    if not dec.has_components:
        raise InputError(f"{what} needs pair.decompose(..., components=True).")
    return dec


def plot_components(dec: Decomposition, index: int = 0, *, label: str | None = None,
                    title: str | None = None) -> go.Figure:
    """Per layer, stacked norms of FTC's three components at the last real token of one prompt.

    Bars: ``||FTC_attn,l||``, ``||FTC_mlp,l||`` and ``||FTC_mlp←attn,l||`` (norms do not add up;
    stacking shows their relative size per layer). The line is ``||FTC_l||`` itself.

    Args:
        dec: A decomposition with components (``pair.decompose(..., components=True)``).
        index: The prompt.
        label: Name of the prompt in the subtitle (default: the start of its text).
        title: Figure title.

    Returns:
        A ``plotly.graph_objects.Figure`` with three bar traces and one line.

    Example:
        >>> fig = plot_components(pair.decompose(prompts, chat_template=True, components=True), 0)
        >>> type(fig).__name__
        'Figure'
    """
    dec = _with_components(dec, "plot_components")
    i = check_index(dec, index)
    layers = list(range(dec.n_layers))
    fig = go.Figure()
    for colour, (name, label) in zip(PALETTE, _NAMES.items()):
        values = to_numpy(dec.at_last_token(getattr(dec, f"ftc_{name}_norm"))[i].float())
        fig.add_bar(x=layers, y=values, name=label, marker_color=colour,
                    hovertemplate=f"layer %{{x}}<br>{label}<br>%{{y:.4g}}<extra></extra>")
    total = to_numpy(dec.at_last_token(dec.ftc_norm)[i].float())
    fig.add_scatter(x=layers, y=total, name="‖FTC_l‖, whole block", mode="lines+markers",
                    line=dict(color="black", dash="dot"), hovertemplate="layer %{x}<br>‖FTC_l‖ %{y:.4g}<extra></extra>")
    name = escape(label or prompt_label(dec, i))
    default = f"FTC per layer, by sub-block ({norm_name(dec)} norms, last token)<br><sup>{name}</sup>"
    notebook_layout(fig, title or default)
    fig.update_layout(barmode="stack", xaxis=dict(title="layer", tickmode="array", tickvals=layers),
                      yaxis=dict(title=f"{norm_name(dec)} norm"))
    return fig


def plot_head_heatmap(dec: Decomposition, index: int = 0, *, shares: bool = False, label: str | None = None,
                      title: str | None = None) -> go.Figure:
    """A layer × head heatmap of ``||FTC_head||`` (or each head's share of TuCo) at the last token.

    Args:
        dec: A decomposition with heads (``pair.decompose(..., components=True)``).
        index: The prompt.
        shares: Colour by :meth:`~tuco_lens.Decomposition.head_shares` (signed, diverging scale)
            instead of the norms.
        label: Name of the prompt in the subtitle (default: the start of its text).
        title: Figure title.

    Example:
        >>> fig = plot_head_heatmap(pair.decompose(prompts, chat_template=True, components=True), 0)
        >>> type(fig).__name__
        'Figure'
    """
    dec = _with_components(dec, "plot_head_heatmap")
    if dec.ftc_head is None or dec.ftc_head_norm is None:
        raise InputError("plot_head_heatmap needs the heads: pair.decompose(..., components=True, heads=True).")
    i = check_index(dec, index)
    values = dec.head_shares()[i] if shares else dec.ftc_head_norm[i]
    z = to_numpy(values.float())
    what_z = "share of TuCo" if shares else f"‖o_h^FT − o_h^PT‖ ({norm_name(dec)})"
    heatmap = dict(colorscale="RdBu", zmid=0.0) if shares else dict(colorscale="YlOrRd", zmin=0.0)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(z.shape[1])), y=list(range(z.shape[0])), colorbar=dict(title=what_z), **heatmap,
        hovertemplate="layer %{y}, head %{x}<br>" + what_z + ": %{z:.4g}<extra></extra>",
    ))
    what = "share of TuCo" if shares else "‖FTC‖"
    default = f"FTC per attention head, {what} (last token)<br><sup>{escape(label or prompt_label(dec, i))}</sup>"
    notebook_layout(fig, title or default, legend=False)
    fig.update_layout(xaxis=dict(title="head", tickmode="linear", dtick=1),
                      yaxis=dict(title="layer", tickmode="linear", dtick=1))
    return fig


def plot_top_tokens(attr: LogitAttribution, index: int = 0, *, part: str = "ftc", k: int = 10,
                    title: str | None = None) -> go.Figure:
    """The tokens a part of the final stream promotes and suppresses most, as a diverging bar chart.

    Args:
        attr: From ``pair.logit_attribution(...)``.
        index: The prompt.
        part: A key of ``attr.direct`` (``"ftc"``, ``"ftc_mlp"``...) or ``"head L.H"``.
        k: Tokens per direction.
        title: Figure title.

    Example:
        >>> attr = pair.logit_attribution(prompts, chat_template=True, components=True)
        >>> fig = plot_top_tokens(attr, 0, part="ftc_mlp")
        >>> type(fig).__name__
        'Figure'
    """
    if not isinstance(attr, LogitAttribution):
        raise InputTypeError(f"Expected a tuco_lens LogitAttribution, got {type(attr).__name__}.")
    n = attr.logits.shape[0]
    if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
        raise InputError(f"Prompt index {index!r} is out of range: the attribution has {n} prompt(s).")
    heads = None
    if part.startswith("head "):
        layer, head = (int(v) for v in part.split()[1].split("."))
        heads, parts = [(layer, head)], []
    else:
        parts = [part]
    table = attr.top_tokens(k, parts=parts, heads=heads)
    table = table.loc[table.prompt == index % n].sort_values("logit_effect")
    colours = ["#2166ac" if d == "promoted" else "#b2182b" for d in table.direction]
    fig = go.Figure(go.Bar(
        x=table.logit_effect, y=[f"{escape(t)!s} ({i})" for t, i in zip(table.token, table.token_id)],
        orientation="h", marker_color=colours,
        hovertemplate="%{y}<br>direct effect on the logit: %{x:.4g}<extra></extra>",
    ))
    default = f"Tokens {escape(part)} promotes and suppresses<br><sup>prompt {index % n}: blue promoted, red suppressed</sup>"
    notebook_layout(fig, title or default, legend=False, height=max(300, 22 * len(table) + 140))
    fig.update_layout(xaxis=dict(title="direct effect on the fine-tuned logit", zeroline=True),
                      yaxis=dict(title="token (id)"))
    return fig
