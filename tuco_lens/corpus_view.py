"""Corpus views of a score table: the highest- and lowest-TuCo prompts on one offline page (``tuco-lens top``).

The "max-activating examples" page: the ``k`` prompts with the highest TuCo and the ``k`` with the
lowest, each with its tokens coloured by per-token TuCo when the table has them (``tuco-lens
score --per-token``; otherwise the prompt text), and the distribution of TuCo per label (a
``set`` or ``label`` column, or any column named) with ROC AUCs when there are two labels. The
page embeds plotly.js and opens offline.

Example:
    >>> from tuco_lens.scoring import score_prompts
    >>> sets = demo.prompt_sets()
    >>> records = [{"prompt": p, "set": "chat"} for p in sets["chat"][:3]] + [{"prompt": p, "set": "web"} for p in sets["web"][:3]]
    >>> result = score_prompts(records, "scores.jsonl", pair=pair)
    >>> write_top_page("scores.jsonl", "top.html", k=2)
    PosixPath('top.html')
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, SupportsFloat, SupportsInt, cast

import pandas as pd
import plotly.graph_objects as go

from tuco_lens.errors import InputError

if TYPE_CHECKING:
    from tuco_lens.plotting.tokens import TokenHTML

__all__ = ["LABEL_COLUMNS", "TopPrompts", "top_prompts", "top_page_items", "write_top_page"]

#: Columns taken as the label of a prompt when none is named (the first present).
LABEL_COLUMNS = ("set", "label")


@dataclass(frozen=True)
class TopPrompts:
    """The highest- and lowest-TuCo rows of a score table.

    Attributes:
        highest: The ``k`` rows with the highest TuCo, highest first (ties: lower index first).
        lowest: The ``k`` rows with the lowest TuCo, lowest first.
        label: The label column used for the distributions (``None``: no label).
        scores: The whole table (rows with a NaN TuCo left out).
    """

    highest: pd.DataFrame
    lowest: pd.DataFrame
    label: str | None
    scores: pd.DataFrame

    def to_dataframe(self) -> pd.DataFrame:
        """Both lists in one table, with ``which`` (``"highest"`` / ``"lowest"``) and ``rank`` (1 = most extreme)."""
        parts = []
        for which, frame in (("highest", self.highest), ("lowest", self.lowest)):
            parts.append(frame.assign(which=which, rank=range(1, len(frame) + 1)))
        return pd.concat(parts, ignore_index=True)


def _as_table(scores: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    if isinstance(scores, pd.DataFrame):
        return scores
    from tuco_lens.scoring import read_scores

    return read_scores(scores)


def top_prompts(scores: pd.DataFrame | str | os.PathLike, k: int = 20, *, label: str | None = None) -> TopPrompts:
    """The ``k`` highest- and ``k`` lowest-TuCo prompts of a score table.

    Args:
        scores: A score table (``.csv``, ``.jsonl``, ``.parquet`` from ``tuco-lens score``) or a
            DataFrame with ``index``, ``prompt`` and ``tuco`` columns.
        k: Prompts per list.
        label: The label column (default: ``set`` or ``label`` if present; ``""`` for none).

    Raises:
        InputError: ``k`` not positive, a missing column, or no finite TuCo.

    Example:
        >>> from tuco_lens.scoring import score_prompts
        >>> sets = demo.prompt_sets()
        >>> records = [{"prompt": p, "set": "chat"} for p in sets["chat"][:3]] + [{"prompt": p, "set": "web"} for p in sets["web"][:3]]
        >>> result = score_prompts(records, "scores.jsonl", pair=pair)
        >>> top = top_prompts("scores.jsonl", k=2)
        >>> top.highest[["index", "set", "tuco"]].round(3)
           index   set   tuco
        0      0  chat  0.409
        1      2  chat  0.321
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    table = _as_table(scores)
    missing = [c for c in ("index", "prompt", "tuco") if c not in table]
    if missing:
        raise InputError(f"the score table has no {missing} column(s); its columns are {list(table.columns)}")
    if label is None:
        label = next((c for c in LABEL_COLUMNS if c in table), None)
    elif label == "":
        label = None
    elif label not in table:
        raise InputError(f"the score table has no label column {label!r}; its columns are {list(table.columns)}")
    # A boolean mask selects rows (a DataFrame); pandas types DataFrame[...] as possibly a Series.
    table = cast(pd.DataFrame, table[table["tuco"].notna()]).sort_values("index", kind="stable")
    if table.empty:
        raise InputError("the score table holds no prompt with a finite TuCo")
    ordered = table.sort_values(["tuco", "index"], ascending=[False, True], kind="stable")
    lowest = table.sort_values(["tuco", "index"], ascending=[True, True], kind="stable")
    return TopPrompts(ordered.head(k).reset_index(drop=True), lowest.head(k).reset_index(drop=True), label,
                      table.reset_index(drop=True))


def _prompt_html(row: pd.Series, label: str | None, rank: int) -> str:
    from tuco_lens.plotting.tokens import tokens_row

    # The cells are scalars; pandas types Series[label] as possibly a Series.
    index, tuco = cast(SupportsInt, row["index"]), cast(SupportsFloat, row["tuco"])
    name = f"#{rank} · prompt {int(index)}" + (f" · {label} = {row[label]}" if label else "")
    tokens, values = row.get("tokens"), row.get("tuco_per_token")
    if isinstance(tokens, list) and isinstance(values, list) and len(tokens) == len(values):
        return tokens_row(tokens, values, label=name, tuco=float(tuco))
    return (
        '<div style="margin:6px 0">'
        f'<div style="font-size:12px;color:#444">{html.escape(name, quote=False)} — TuCo = {float(tuco):.4f}</div>'
        f'<div style="font-family:monospace;white-space:pre-wrap">{html.escape(str(row["prompt"]), quote=False)}</div>'
        "</div>"
    )


def _distribution(top: TopPrompts) -> go.Figure:
    from tuco_lens.plotting import plot_prompt_sets

    table = top.scores
    if top.label is None:
        return plot_prompt_sets({"all prompts": table["tuco"].to_numpy()}, title="TuCo of all prompts")
    sets = {str(name): group["tuco"].to_numpy() for name, group in table.groupby(top.label, sort=False)}
    return plot_prompt_sets(sets, title=f"TuCo by {html.escape(top.label)}")


def top_page_items(top: TopPrompts) -> list[go.Figure | TokenHTML | str]:
    """The page's parts, in order, for :func:`~tuco_lens.plotting.save_report`: summary, distribution, both lists."""
    from tuco_lens.plotting.tokens import TokenHTML, tokens_block

    table = top.scores
    has_tokens = "tuco_per_token" in table
    summary = (
        f"<p>{len(table)} prompts; TuCo mean {table['tuco'].mean():.4f}, median {table['tuco'].median():.4f}, "
        f"min {table['tuco'].min():.4f}, max {table['tuco'].max():.4f}."
        + ("" if has_tokens else " Tokens are not coloured: score with <code>--per-token</code> for per-token TuCo.")
        + "</p>"
    )
    items: list[go.Figure | TokenHTML | str] = [summary, _distribution(top)]
    for heading, frame in ((f"Highest TuCo (top {len(top.highest)})", top.highest),
                           (f"Lowest TuCo (bottom {len(top.lowest)})", top.lowest)):
        rows = [_prompt_html(row, top.label, rank) for rank, (_, row) in enumerate(frame.iterrows(), start=1)]
        block = tokens_block(rows) if has_tokens else TokenHTML("".join(rows))
        items += [f"<h2>{heading}</h2>", block]
    return items


def write_top_page(scores: pd.DataFrame | str | os.PathLike, path: str | os.PathLike, k: int = 20, *,
                   label: str | None = None, title: str | None = None) -> Path:
    """Write the offline HTML page of the highest- and lowest-TuCo prompts of ``scores``; returns its path.

    Args:
        scores: A score file or DataFrame (see :func:`top_prompts`).
        path: The ``.html`` file to write (its directory must exist).
        k: Prompts per list.
        label: The label column for the distributions (default ``set`` / ``label``; ``""``: none).
        title: Page title (default names the file).

    Example:
        >>> from tuco_lens.scoring import score_prompts
        >>> sets = demo.prompt_sets()
        >>> records = [{"prompt": p, "set": "chat"} for p in sets["chat"][:3]] + [{"prompt": p, "set": "web"} for p in sets["web"][:3]]
        >>> result = score_prompts(records, "scores.jsonl", pair=pair)
        >>> write_top_page("scores.jsonl", "top.html", k=2, label="set")
        PosixPath('top.html')
    """
    from tuco_lens.plotting import save_report

    top = top_prompts(scores, k, label=label)
    name = Path(scores).name if not isinstance(scores, pd.DataFrame) else "a score table"
    return save_report(top_page_items(top), Path(path), title=title or f"Highest and lowest TuCo in {name}")
