"""Shared helpers for the figure functions: validation, escaping, labels, colours, layout."""

from __future__ import annotations

import hashlib
import html
import math
import re
from collections.abc import Sequence
from typing import cast

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import torch
from torch import Tensor

from tuco_lens.decomposition import Decomposition
from tuco_lens.errors import InputError, InputTypeError

DEFAULT_COLORSCALE = "YlOrRd"
"""Sequential scale used for β and per-token TuCo (0 = all pre-training, 1 = all fine-tuning)."""

PALETTE = plotly.colors.qualitative.Plotly

NOTEBOOK_WIDTH = 650
"""Width (px) a figure must fit: a Jupyter output cell or a documentation page."""

LABEL_CHARS = 28
"""Longest prompt label in a legend or title (characters, ``…`` included)."""


def set_colours(names: Sequence[str]) -> dict[str, str]:
    """The colour of each named set: a fixed function of the name, not of its position.

    A name's colour is the palette entry picked by a hash of the name, so ``"web"`` has the
    same colour in every figure, notebook and report, whatever the order or company of the
    other sets. Two names of one call that hash to the same entry are separated: in
    alphabetical order, the later one takes the next free entry (with more names than
    palette entries, colours repeat).

    Args:
        names: Set (or trace) names.

    Returns:
        ``{name: colour}`` in the order of ``names``.

    Example:
        >>> set_colours(["chat", "web"])["web"] == set_colours(["web", "harmful"])["web"]
        True
    """
    taken: set[int] = set()
    colours: dict[str, str] = {}
    for name in sorted(set(map(str, names))):
        slot = int(hashlib.md5(name.encode("utf-8"), usedforsecurity=False).hexdigest(), 16) % len(PALETTE)
        while slot in taken and len(taken) < len(PALETTE):
            slot = (slot + 1) % len(PALETTE)
        taken.add(slot)
        colours[name] = PALETTE[slot]
    return {str(name): colours[str(name)] for name in names}


def title_lines(text: str) -> list[str]:
    """The visible lines of a plotly title (``<br>`` splits, tags dropped, entities decoded)."""
    return [html.unescape(re.sub(r"<[^>]+>", "", line)) for line in re.split(r"<br\s*/?>", text)]


def figure_height(fig: go.Figure) -> int | float | None:
    """The height (px) set in ``fig``'s layout, or ``None``."""
    height = cast(go.Layout, fig.layout).height  # plotly's layout property is a go.Layout, though untyped
    return height if isinstance(height, (int, float)) else None


def notebook_layout(fig: go.Figure, title: str, *, legend: bool = True, height: int | None = None) -> go.Figure:
    """Title, margins and legend placement that keep the plot area wide at 650 px.

    The legend goes under the plot (horizontal, wrapping), never beside it, so the plot keeps
    the width; margins are fixed and small; the top margin grows with the title's lines.
    """
    lines = len(title_lines(title))
    px = height or figure_height(fig) or 450
    top = 40 + 24 * lines
    bottom = 60
    plot_height = max(px - top - bottom, 100)
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", xref="paper"),
        margin=dict(l=60, r=24, t=top, b=bottom, autoexpand=True),
        height=px,
        showlegend=legend,
        legend=dict(orientation="h", x=0, xanchor="left", y=-70 / plot_height, yanchor="top"),
    )
    return fig


def escape(text: str) -> str:
    """Escape a token or prompt for plotly text (which renders a subset of HTML).

    ``<``, ``>`` and ``&`` become entities (plotly decodes them back); quotes are left alone
    because plotly does not decode ``&quot;``. Newlines and tabs are made visible.
    """
    return html.escape(text, quote=False).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def check_decomposition(dec: object) -> Decomposition:
    if not isinstance(dec, Decomposition):
        raise InputTypeError(f"Expected a tuco_lens.Decomposition, got {type(dec).__name__}.")
    return dec


def check_index(dec: Decomposition, index: object) -> int:
    """A prompt index (negative allowed), or :class:`InputError` naming the valid range."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise InputTypeError(f"Prompt index must be an int, got {type(index).__name__}.")
    n = dec.n_prompts
    if not -n <= int(index) < n:
        raise InputError(f"Prompt index {index} is out of range: the decomposition has {n} prompt(s).")
    return int(index) % n


def check_indices(dec: Decomposition, indices: int | Sequence[int] | None) -> list[int]:
    """``None`` → every prompt; an int or a sequence of ints → checked, in the given order."""
    if indices is None:
        return list(range(dec.n_prompts))
    if isinstance(indices, (int, np.integer)) and not isinstance(indices, bool):
        return [check_index(dec, indices)]
    if isinstance(indices, Tensor):
        indices = indices.reshape(-1).tolist()
    if isinstance(indices, (str, bytes)) or not isinstance(indices, (Sequence, np.ndarray)):
        raise InputTypeError(f"prompts must be None, an int or a list of ints, got {type(indices).__name__}.")
    chosen = [check_index(dec, i) for i in indices]
    if not chosen:
        raise InputError("No prompt selected: pass None (all prompts) or at least one index.")
    return chosen


def real_positions(dec: Decomposition, index: int) -> np.ndarray:
    """Positions of the real (unpadded) tokens of prompt ``index``. ``[n_real]``"""
    positions = dec.attention_mask[index].bool().cpu().nonzero().reshape(-1).numpy()
    if positions.size == 0:
        raise InputError(f"Prompt {index} has no real tokens (its attention mask is all 0).")
    return positions


def shorten(text: str, max_chars: int = LABEL_CHARS) -> str:
    """Whitespace collapsed, cut to ``max_chars`` with ``…``."""
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"


def prompt_label(dec: Decomposition, index: int, max_chars: int = LABEL_CHARS) -> str:
    """``"i: <start of the prompt>"`` (unescaped), without the tokenizer's special tokens.

    ``"prompt i"`` when the prompt's text is unknown (token ids in).
    """
    if dec.prompts is None or dec.prompts[index] is None:
        return f"prompt {index}"
    text = str(dec.prompts[index])
    for special in sorted(dec.special_tokens, key=len, reverse=True):
        text = text.replace(special, " ")
    return shorten(f"{index}: {text}", max_chars)


def check_labels(labels: Sequence[str] | None, n: int) -> list[str] | None:
    """User labels (e.g. set names) for ``n`` drawn prompts, or :class:`InputError`."""
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise InputTypeError(f"labels must be a list of strings (one per drawn prompt), got {type(labels).__name__}.")
    if len(labels) != n:
        raise InputError(f"labels has {len(labels)} entries for {n} drawn prompt(s): give one label per prompt.")
    if len(set(map(str, labels))) != n:
        raise InputError(f"labels must be distinct (they name the legend entries), got {list(labels)}.")
    return [str(label) for label in labels]


def norm_name(dec: Decomposition) -> str:
    return dec.norm.upper()


def to_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):  # NumPy has no bfloat16
        t = t.float()
    return t.numpy()


def colour_at(value: float, colorscale: str | list = DEFAULT_COLORSCALE) -> tuple[int, int, int]:
    """The RGB colour of ``value`` (clipped to [0, 1]) on a plotly colorscale."""
    value = 0.0 if not math.isfinite(value) else min(max(value, 0.0), 1.0)
    r, g, b = plotly.colors.sample_colorscale(colorscale, [value], colortype="tuple")[0]  # 0-1 floats
    return int(round(255 * float(r))), int(round(255 * float(g))), int(round(255 * float(b)))


def text_colour(rgb: tuple[int, int, int]) -> str:
    """Black or white, whichever reads better on ``rgb``."""
    r, g, b = rgb
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"
