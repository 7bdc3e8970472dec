"""The Compare view without its page: TuCo distributions of two prompt lists and their ROC AUC.

Each list is pasted (one prompt per line, blank lines skipped) or uploaded as a ``.txt`` or
``.jsonl`` file, read exactly as ``tuco-lens score`` reads it
(:func:`tuco_lens.io.read_prompt_records`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float

from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.io import read_prompt_records
from tuco_lens.metrics import roc_auc
from tuco_lens.plotting import plot_prompt_sets

__all__ = ["CompareResult", "compare", "prompt_list", "headline_html"]


def prompt_list(name: str, text: str | None = None, path: str | Path | None = None) -> list[str]:
    """The prompts of one set: pasted ``text`` (one per line) or a ``.txt`` / ``.jsonl`` file.

    Args:
        name: The set's name (for error messages).
        text: Pasted prompts, one per line; blank lines are skipped.
        path: A file read like ``tuco-lens score --prompts`` reads it.

    Raises:
        InputError: Both or neither given, no prompt in them, or a file that cannot be read
            (its message says why).

    Example:
        >>> prompt_list("chat", "how are you ?\\n\\nwhat is a cat ?")
        ['how are you ?', 'what is a cat ?']
    """
    pasted = text is not None and text.strip() != ""
    if pasted and path is not None:
        raise InputError(f"Set {name!r}: paste prompts or upload a file, not both (clear one of them).")
    if path is not None:
        try:
            return [record["prompt"] for record in read_prompt_records(path)]
        except InputError as error:
            raise InputError(f"Set {name!r}: {error}") from None
    if text is None or not pasted:
        raise InputError(f"Set {name!r} has no prompt: paste one prompt per line or upload a .txt/.jsonl file.")
    return [line for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class CompareResult:
    """TuCo of every prompt of two named sets.

    Attributes:
        names: ``(positive, negative)``: the first set is the one expected to score higher.
        prompts: The prompts of each set, in input order.
        scores: ``pair.tuco`` of each set, ``[n_prompts]`` float64 arrays, in input order.
        chat_template: Whether prompts were wrapped in the fine-tuned chat template.
    """

    names: tuple[str, str]
    prompts: tuple[list[str], list[str]]
    scores: tuple[Float[np.ndarray, " n_positive"], Float[np.ndarray, " n_negative"]]
    chat_template: bool

    @property
    def auc(self) -> float:
        """ROC AUC of TuCo, first set positive (:func:`tuco_lens.metrics.roc_auc`)."""
        return roc_auc(self.scores[0], self.scores[1])

    def figure(self) -> go.Figure:
        """The two distributions with the AUC in the title (:func:`~tuco_lens.plotting.plot_prompt_sets`)."""
        positive, negative = self.names
        return plot_prompt_sets(dict(zip(self.names, self.scores)), positive=positive, negative=negative)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per prompt: ``set``, ``index`` (position in its set), ``tuco``, ``prompt``."""
        frames = [
            pd.DataFrame({"set": name, "index": range(len(prompts)), "tuco": scores, "prompt": prompts})
            for name, prompts, scores in zip(self.names, self.prompts, self.scores)
        ]
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: names, ``auc`` and per-set TuCo lists."""
        return {
            "names": list(self.names),
            "auc": self.auc,
            "chat_template": self.chat_template,
            "tuco": {name: scores.tolist() for name, scores in zip(self.names, self.scores)},
        }


def compare(
    pair: Any,
    positive: list[str],
    negative: list[str],
    *,
    names: tuple[str, str] = ("A", "B"),
    chat_template: bool = False,
    batch_size: int = 16,
    show_progress: bool = False,
) -> CompareResult:
    """``pair.tuco`` of two prompt lists, for their distributions and ROC AUC.

    Args:
        pair: A :class:`~tuco_lens.TuCoPair`.
        positive: Prompts expected to score higher (e.g. chat requests).
        negative: The other prompts (e.g. web text).
        names: Display names of the two sets (distinct).
        chat_template: Wrap every prompt in the fine-tuned chat template.
        batch_size: Prompts per forward pass (length-sorted; results in input order).
        show_progress: Show a tqdm bar over batches (the page shows it).

    Raises:
        InputError: An empty list or prompt, a prompt longer than the context, equal or
            empty names.

    Example:
        >>> sets = demo.prompt_sets()
        >>> result = compare(pair, sets["chat"][:5], sets["web"][:5], names=("chat", "web"))
        >>> round(result.auc, 3)
        1.0
        >>> fig = result.figure()
    """
    cleaned = tuple(str(n).strip() for n in names)
    if len(cleaned) != 2 or not all(cleaned):
        raise InputError(f"Give the two sets non-empty names, got {cleaned!r}.")
    names = (cleaned[0], cleaned[1])
    if names[0] == names[1]:
        raise InputError(f"The two sets need different names, both are {names[0]!r}.")
    lists = []
    for name, prompts in zip(names, (positive, negative)):
        if isinstance(prompts, str) or not isinstance(prompts, list):
            raise InputTypeError(f"Set {name!r} must be a list of prompts, got {type(prompts).__name__}.")
        if not prompts:
            raise InputError(f"Set {name!r} has no prompt.")
        lists.append(list(prompts))
    scores = tuple(
        pair.tuco(prompts, chat_template=bool(chat_template), batch_size=batch_size, show_progress=show_progress)
        .detach()
        .cpu()
        .double()
        .numpy()
        for prompts in lists
    )
    return CompareResult(names=names, prompts=(lists[0], lists[1]), scores=scores, chat_template=bool(chat_template))


def headline_html(result: CompareResult) -> str:
    """The line above the figure: sizes, mean TuCo of each set and the ROC AUC (escaped)."""
    sets = " · ".join(
        f"<b>{html.escape(name, quote=False)}</b>: {len(scores)} prompts, mean TuCo {float(np.mean(scores)):.4f}"
        for name, scores in zip(result.names, result.scores)
    )
    positive, negative = (html.escape(n, quote=False) for n in result.names)
    return (
        f'<div class="tuco-headline">{sets}<br><span class="tuco-auc" data-auc="{result.auc!r}">'
        f"ROC AUC ({positive} above {negative}) = {result.auc:.4f}</span></div>"
    )
