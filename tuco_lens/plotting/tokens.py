"""Prompts as HTML text, each token coloured by its per-token TuCo."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuco_lens.decomposition import Decomposition
from tuco_lens.plotting._util import (
    DEFAULT_COLORSCALE,
    check_decomposition,
    check_indices,
    check_labels,
    colour_at,
    prompt_label,
    real_positions,
    text_colour,
    to_numpy,
)

__all__ = ["TokenHTML", "token_html", "tokens_row", "tokens_block"]


@dataclass(frozen=True)
class TokenHTML:
    """An HTML fragment that renders itself in Jupyter.

    Attributes:
        html: The fragment (a ``<div>``), to embed in a page or pass to
            :func:`~tuco_lens.plotting.save_report`.
    """

    html: str

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page holding this fragment; returns the path."""
        path = Path(path)
        path.write_text(
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>tuco_lens tokens</title></head>'
            f"<body>{self.html}</body></html>\n",
            encoding="utf-8",
        )
        return path


def _colour_bar(colorscale: str | list) -> str:
    stops = ", ".join(f"rgb{colour_at(v / 10, colorscale)} {v * 10}%" for v in range(11))
    return (
        '<div style="display:flex;align-items:center;gap:6px;margin:4px 0 8px 0;font-size:12px">'
        "<span>per-token TuCo:</span><span>0</span>"
        f'<span style="display:inline-block;width:200px;height:12px;border:1px solid #999;'
        f'background:linear-gradient(to right, {stops})"></span><span>1</span>'
        '<span style="color:#666">(share of fine-tuning in blocks 0..L−1; hover a token for its value)</span>'
        "</div>"
    )


def token_html(
    dec: Decomposition,
    index: int | Sequence[int] = 0,
    *,
    labels: Sequence[str] | None = None,
    colorscale: str | list = DEFAULT_COLORSCALE,
) -> TokenHTML:
    """Each real token of one or several prompts, coloured by its per-token TuCo.

    The background of a token is ``tuco_per_token`` on ``colorscale`` over [0, 1] (a colour
    bar is included); hovering shows its position and exact value (4 decimals) in a
    ``title=`` tooltip. Token text is HTML-escaped and whitespace is preserved.

    Reads ``dec.tuco_per_token[index]`` (``[pos]``), ``dec.attention_mask[index]``,
    ``dec.str_tokens[index]`` and ``dec.tuco[index]``.

    Args:
        dec: The decomposition.
        index: A prompt index or a list of them (one line per prompt).
        labels: One label per shown prompt (e.g. its set's name); default: the start of its
            text without special tokens.
        colorscale: Any plotly colorscale.

    Returns:
        A :class:`TokenHTML`; it displays in Jupyter, ``.html`` is the raw fragment.

    Raises:
        InputError: If an index is out of range, or ``labels`` does not give one distinct
            label per shown prompt.

    Example:
        >>> dec = pair.decompose(prompts, chat_template=True)
        >>> page = token_html(dec, index=[0, 1])       # shown as HTML in a notebook cell
        >>> page = token_html(dec, index=[0, 1], labels=["forbidden", "harmless"])
        >>> n = open("tokens.html", "w").write(token_html(dec).html)
        >>> "doomsalt" in page.html
        True
    """
    dec = check_decomposition(dec)
    indices = check_indices(dec, index)
    names = check_labels(labels, len(indices)) or [prompt_label(dec, i) for i in indices]
    rows = []
    for i, name in zip(indices, names):
        values = to_numpy(dec.tuco_per_token[i])
        positions = real_positions(dec, i)
        rows.append(
            tokens_row(
                [dec.str_tokens[i][p] for p in positions], [float(values[p]) for p in positions],
                label=name, tuco=float(dec.tuco[i]), positions=[int(p) for p in positions],
                colorscale=colorscale,
            )
        )
    return tokens_block(rows, colorscale)


def tokens_row(
    tokens: Sequence[str],
    values: Sequence[float],
    *,
    label: str,
    tuco: float,
    positions: Sequence[int] | None = None,
    colorscale: str | list = DEFAULT_COLORSCALE,
) -> str:
    """One prompt as HTML: a heading (``label — TuCo = ...``, escaped) and its tokens coloured by ``values``.

    The building block of :func:`token_html`, for per-token values that come from elsewhere (a
    score table written with ``--per-token``). ``positions`` label the tooltips (default 0, 1, ...).

    Example:
        >>> block = tokens_block([tokens_row(["<bos>", "hi"], [0.0, 0.4], label="prompt 3", tuco=0.4)])
        >>> "prompt 3" in block.html
        True
    """
    positions = list(range(len(tokens))) if positions is None else positions
    spans = []
    for p, token, value in zip(positions, tokens, values):
        rgb = colour_at(float(value), colorscale)
        tip = html.escape(f"position {p}: {token!r} — per-token TuCo {float(value):.4f}", quote=True)
        spans.append(
            f'<span title="{tip}" style="background-color:rgb{rgb};color:{text_colour(rgb)};'
            f'padding:1px 2px;margin:0 1px 0 0;border-radius:2px;border:1px solid rgba(0,0,0,0.12)">'
            f'{html.escape(token, quote=False)}</span>'
        )
    return (
        '<div style="margin:6px 0">'
        f'<div style="font-size:12px;color:#444">{html.escape(label, quote=False)} — TuCo = {tuco:.4f}</div>'
        f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.7">{"".join(spans)}</div>'
        "</div>"
    )


def tokens_block(rows: Sequence[str], colorscale: str | list = DEFAULT_COLORSCALE) -> TokenHTML:
    """Rows from :func:`tokens_row` under one colour bar, as a :class:`TokenHTML`."""
    return TokenHTML(f'<div class="tuco-lens-tokens">{_colour_bar(colorscale)}{"".join(rows)}</div>')
