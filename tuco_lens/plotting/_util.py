"""Shared helpers for the figure functions: validation, escaping, labels, colours."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import plotly.colors
import torch
from torch import Tensor

from tuco_lens.decomposition import Decomposition
from tuco_lens.errors import InputError, InputTypeError

DEFAULT_COLORSCALE = "YlOrRd"
"""Sequential scale used for β and per-token TuCo (0 = all pre-training, 1 = all fine-tuning)."""

PALETTE = plotly.colors.qualitative.Plotly


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


def prompt_label(dec: Decomposition, index: int, max_chars: int = 40) -> str:
    """``"prompt i: <start of prompt>"`` (unescaped), or ``"prompt i"`` when prompts are unknown."""
    if dec.prompts is None or dec.prompts[index] is None:
        return f"prompt {index}"
    text = " ".join(str(dec.prompts[index]).split())
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return f"prompt {index}: {text}"


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
    colour = plotly.colors.sample_colorscale(colorscale, [value], colortype="tuple")[0]  # 0-1 floats
    return tuple(int(round(255 * c)) for c in colour)  # type: ignore[return-value]


def text_colour(rgb: tuple[int, int, int]) -> str:
    """Black or white, whichever reads better on ``rgb``."""
    r, g, b = rgb
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"
