"""The Analyze view without its page: TuCo of one prompt, per token and per layer.

:func:`analyze` runs :meth:`~tuco_lens.TuCoPair.decompose` once on one prompt; the page draws
the result with the registered panels (:mod:`tuco_lens.app.panels`) and the ``/analyze`` API
endpoint returns :meth:`AnalyzeResult.to_dict`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tuco_lens.attribution import LogitAttribution
from tuco_lens.decomposition import Decomposition
from tuco_lens.errors import InputTypeError, TuCoError
from tuco_lens.plotting._util import real_positions

__all__ = ["AnalyzeResult", "analyze", "headline_html"]


@dataclass(frozen=True)
class AnalyzeResult:
    """What the Analyze view shows for one prompt.

    Attributes:
        prompt: The prompt as typed (before any chat template).
        chat_template: Whether it was wrapped in the fine-tuned chat template.
        decomposition: ``pair.decompose([prompt], components=True)``: one row, no padding,
            with the attention / MLP split (and the heads where the model allows them).
        attribution: ``pair.logit_attribution([prompt], components=True)``: the tokens
            fine-tuning promotes and suppresses, or None when not computed.
    """

    prompt: str
    chat_template: bool
    decomposition: Decomposition
    attribution: LogitAttribution | None = None

    @property
    def tuco(self) -> float:
        """The prompt's TuCo (at its last token)."""
        return float(self.decomposition.tuco[0])

    @property
    def tokens(self) -> list[str]:
        """The prompt's tokens as the model sees them (chat template included)."""
        return [self.decomposition.str_tokens[0][p] for p in real_positions(self.decomposition, 0)]

    @property
    def tuco_per_token(self) -> list[float]:
        """Per-token TuCo, one value per entry of :attr:`tokens`."""
        values = self.decomposition.tuco_per_token[0].detach().cpu().double()
        return [float(values[p]) for p in real_positions(self.decomposition, 0)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what the ``/analyze`` endpoint returns.

        Example:
            >>> round(analyze(pair, "the fox eats berries .").to_dict()["tuco"], 3)
            0.254
        """
        return {
            "prompt": self.prompt,
            "chat_template": self.chat_template,
            "norm": self.decomposition.norm,
            "tuco": self.tuco,
            "tokens": self.tokens,
            "tuco_per_token": self.tuco_per_token,
            **({"tuco_shares": {k: float(v[0]) for k, v in self.decomposition.tuco_shares().items()}}
               if self.decomposition.has_components else {}),
        }

    def to_dataframe(self) -> pd.DataFrame:
        """One row per token: ``position``, ``token``, ``tuco_per_token``."""
        return pd.DataFrame(
            {"position": range(len(self.tokens)), "token": self.tokens, "tuco_per_token": self.tuco_per_token}
        )


def analyze(pair: Any, prompt: str, *, chat_template: bool = False) -> AnalyzeResult:
    """Decompose one prompt for the Analyze view.

    Args:
        pair: A :class:`~tuco_lens.TuCoPair`.
        prompt: The prompt (a non-empty string).
        chat_template: Wrap it as a user turn in the fine-tuned chat template.

    Returns:
        An :class:`AnalyzeResult` holding ``pair.decompose([prompt], chat_template=...,
        components=True)`` and the prompt's logit attribution.

    Raises:
        InputTypeError: ``prompt`` is not a string.
        InputError: From :meth:`~tuco_lens.TuCoPair.decompose`: an empty prompt, one longer
            than the model's context, a missing chat template.

    Example:
        >>> result = analyze(pair, "how do i brew the venom ?", chat_template=True)
        >>> round(result.tuco, 3), result.tokens[:3]
        (0.564, ['<bos>', '<user>', 'how'])
    """
    if not isinstance(prompt, str):
        raise InputTypeError(f"The prompt must be a string, got {type(prompt).__name__}.")
    chat_template = bool(chat_template)
    try:
        dec = pair.decompose([prompt], chat_template=chat_template, components=True)
        heads = True
    except TuCoError as error:  # a norm after the attention output: no per-head split
        if "per-head" not in str(error):
            raise
        dec = pair.decompose([prompt], chat_template=chat_template, components=True, heads=False)
        heads = False
    attribution = pair.logit_attribution([prompt], chat_template=chat_template, components=True, heads=heads)
    return AnalyzeResult(prompt=prompt, chat_template=chat_template, decomposition=dec, attribution=attribution)


def headline_html(result: AnalyzeResult) -> str:
    """The line above the panels: TuCo, PreCo, number of tokens and the scored token (escaped)."""
    dec = result.decomposition
    last = html.escape(result.tokens[-1], quote=False)
    return (
        f'<div class="tuco-headline"><span class="tuco-value" data-tuco="{result.tuco!r}">'
        f"TuCo = {result.tuco:.4f}</span> · PreCo = {1.0 - result.tuco:.4f} · "
        f"{len(result.tokens)} tokens · measured at the last token <code>{last}</code> · "
        f"{dec.norm.upper()} norm{' · chat template' if result.chat_template else ''}</div>"
    )
