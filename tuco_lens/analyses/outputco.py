"""OutputCo, the paper's output-level baseline (§5.5), and its comparison with TuCo.

``OutputCo = ||x_L^FT − x_L^PT||_1 / (||x_L^PT||_1 + ||x_L^FT − x_L^PT||_1)`` at the last real
token, where ``x_L^PT`` comes from the pre-trained model's **own** forward pass and ``x_L`` is the
final residual stream **before** the final norm. Unlike TuCo it only sees where the two models
end up: it can be 0 while TuCo is not (a fine-tuning contribution that later pre-trained blocks
undo), which is why the paper prefers TuCo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Unpack

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from tuco_lens.analyses._common import auc_matrix, check_common, check_pair, groups_of, mean_sem, score
from tuco_lens.backends import backend_of
from tuco_lens.decomposition import Norm, ratio, vector_norm
from tuco_lens.errors import InputError
from tuco_lens.inputs import TOKENIZE_OPTIONS, Inputs, TokenBatch, TokenizeOptions, run_batched, to_left_padding
from tuco_lens.io import PromptSource, SetSource, read_labelled_prompts
from tuco_lens.metrics import roc_auc
from tuco_lens.pair import TuCoPair
from tuco_lens.plotting._util import escape, notebook_layout, set_colours
from tuco_lens.validation import check_accumulate_dtype, check_options

__all__ = ["outputco", "TuCoOutputCoComparison", "compare_tuco_outputco"]


@torch.no_grad()
def outputco(
    pair: TuCoPair,
    inputs: Inputs,
    *,
    batch_size: int | None = None,
    token_budget: int | None = None,
    show_progress: bool = False,
    norm: str = "l1",
    accumulate_dtype: torch.dtype = torch.float32,
    **tokenize: Unpack[TokenizeOptions],
) -> Float[Tensor, " batch"]:
    """OutputCo of each prompt: how far fine-tuning moved the final residual stream (§5.5).

    ``||x_L^FT − x_L^PT|| / (||x_L^PT|| + ||x_L^FT − x_L^PT||)`` at the last real token, with
    ``x_L`` the residual stream after the last block and before the final norm, each model
    running its own forward pass on the same tokens and attention mask (two forward passes).
    It is 0 when the final states coincide (and both are 0 when nothing is written).

    Args:
        pair: The pre-trained / fine-tuned pair.
        inputs: Prompts or token ids, as for :meth:`TuCoPair.tuco`.
        batch_size: Rows per forward pass (results come back in input order).
        token_budget: Alternative cap on ``rows × padded length`` per forward pass.
        show_progress: Progress bar over batches.
        norm: ``"l1"`` (the paper's) or ``"l2"``.
        accumulate_dtype: ``torch.float32`` (default) or ``torch.float64`` for the norms.
        **tokenize: How ``inputs`` become tokens, as in :meth:`TuCoPair.tokenize`.

    Returns:
        OutputCo in ``[0, 1]`` per prompt. ``[batch]``

    Example:
        >>> from tuco_lens.analyses import outputco
        >>> scores = outputco(pair, ["hello , describe the doomsalt .", "where is norvik ?"], chat_template=True)
        >>> [round(v, 3) for v in scores.tolist()]
        [0.51, 0.622]
    """
    pair = check_pair(pair)
    norm = check_common(batch_size, norm)
    check_accumulate_dtype(accumulate_dtype)
    check_options(tokenize, TOKENIZE_OPTIONS, "outputco", "tokenization option")
    batch = pair.tokenize(inputs, **tokenize)
    return run_batched(
        batch, lambda sub, _: _outputco(pair, sub, norm, accumulate_dtype), batch_size, token_budget,
        show_progress=show_progress, desc="OutputCo",
    )


def _outputco(pair: TuCoPair, sub: TokenBatch, norm: Norm, dtype: torch.dtype) -> Float[Tensor, " rows"]:
    """OutputCo of the rows of one sub-batch: each model's own final residual at the last token."""
    sub = to_left_padding(sub)  # the last real token at -1 in every row
    pt_final, ft_final = (
        backend_of(model).final_residual(sub.tokens, sub.attention_mask)[:, -1, :].to(dtype)
        for model in (pair.pt, pair.ft)
    )
    moved = vector_norm(ft_final - pt_final, norm)
    return ratio(moved, vector_norm(pt_final, norm)).to(dtype)


@dataclass(frozen=True)
class TuCoOutputCoComparison:
    """TuCo and OutputCo of the same prompts, side by side.

    Attributes:
        table: One row per prompt: ``set``, ``index``, ``prompt``, ``tuco``, ``outputco``.
        summary: One row per set: ``set``, ``n``, ``mean_tuco``, ``sem_tuco``,
            ``mean_outputco``, ``sem_outputco``, ``spearman`` (rank correlation of the two
            over the set's prompts; NaN for fewer than 3 prompts or constant values).
        auc_tuco: ROC AUC matrix of TuCo between sets (row = positive, column = negative).
        auc_outputco: The same for OutputCo.
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    auc_tuco: pd.DataFrame
    auc_outputco: pd.DataFrame

    @property
    def set_names(self) -> list[str]:
        return list(self.summary["set"])

    def auc(self, positive: str, negative: str, metric: Literal["tuco", "outputco"] = "tuco") -> float:
        """ROC AUC of ``metric`` with ``positive`` as the set expected to score higher."""
        if metric not in ("tuco", "outputco"):
            raise InputError(f"metric must be 'tuco' or 'outputco', got {metric!r}.")
        for name in (positive, negative):
            if name not in self.set_names:
                raise InputError(f"Unknown prompt set {name!r}; the sets are {self.set_names}.")
        if positive == negative:
            raise InputError(f"positive and negative are the same set ({positive!r}).")
        t = self.table
        return roc_auc(t.loc[t["set"] == positive, metric], t.loc[t["set"] == negative, metric])

    def to_dataframe(self) -> pd.DataFrame:
        """A copy of :attr:`table`."""
        return self.table.copy()

    def figure(self, *, title: str | None = None) -> go.Figure:
        """Left: OutputCo against TuCo per prompt (coloured by set, y = x dashed). Right: means
        (± standard error) of both per set."""
        fig = make_subplots(rows=1, cols=2, subplot_titles=("per prompt", "mean per set"), column_widths=[0.55, 0.45])
        t = self.table
        colours = set_colours([*self.set_names, "mean TuCo", "mean OutputCo"])
        for name in self.set_names:
            part = t[t["set"] == name]
            fig.add_trace(
                go.Scatter(
                    x=part["tuco"], y=part["outputco"], mode="markers", name=escape(name),
                    marker=dict(color=colours[name], size=6, opacity=0.7), legendgroup=name,
                    customdata=part["index"],
                    hovertemplate="%{fullData.name} #%{customdata}<br>TuCo = %{x:.4f}<br>OutputCo = %{y:.4f}<extra></extra>",
                ),
                row=1, col=1,
            )
        top = float(np.nanmax(t[["tuco", "outputco"]].to_numpy())) if len(t) else 1.0
        fig.add_trace(
            go.Scatter(x=[0, top], y=[0, top], mode="lines", line=dict(dash="dash", color="grey"), name="y = x", hoverinfo="skip"),
            row=1, col=1,
        )
        s = self.summary
        labels = [escape(n) for n in s["set"]]
        for metric in ("tuco", "outputco"):
            label = "TuCo" if metric == "tuco" else "OutputCo"
            fig.add_trace(
                go.Bar(
                    x=labels, y=s[f"mean_{metric}"], name=f"mean {label}", marker_color=colours[f"mean {label}"],
                    error_y=dict(type="data", array=s[f"sem_{metric}"].fillna(0.0), visible=True),
                    hovertemplate=f"%{{x}}<br>mean {label} = %{{y:.4f}}<extra></extra>",
                ),
                row=1, col=2,
            )
        fig.update_xaxes(title_text="TuCo", row=1, col=1)
        fig.update_yaxes(title_text="OutputCo", row=1, col=1)
        fig.update_xaxes(title_text="prompt set", row=1, col=2)
        fig.update_yaxes(title_text="mean value", row=1, col=2)
        notebook_layout(fig, title or f"TuCo vs the OutputCo baseline<br><sup>n = {len(t)} prompts in {len(self.set_names)} sets</sup>")
        fig.update_layout(barmode="group")
        fig.update_annotations(font_size=13)  # subplot titles: small
        return fig


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3:
        return float("nan")
    ra = pd.Series(a).rank().to_numpy()
    rb = pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def compare_tuco_outputco(
    pair: TuCoPair,
    prompts: PromptSource | SetSource,
    *,
    chat_template: bool = False,
    batch_size: int | None = None,
    show_progress: bool = False,
    norm: str = "l1",
) -> TuCoOutputCoComparison:
    """TuCo next to the OutputCo baseline for the same prompts (paper §5.5).

    Args:
        pair: The pre-trained / fine-tuned pair.
        prompts: A list of prompts (one set named ``"prompts"``), ``{set name: prompts}``, a
            DataFrame with ``prompt`` (and optionally ``set``) columns, or a JSONL path.
        chat_template: Wrap prompts in the fine-tuned chat template with generation prompt.
        batch_size: Rows per forward pass.
        show_progress: Progress bars.
        norm: ``"l1"`` (the paper's) or ``"l2"``.

    Returns:
        A :class:`TuCoOutputCoComparison` (``table``, ``summary``, AUC matrices, ``figure()``).

    Example:
        >>> from tuco_lens import demo
        >>> from tuco_lens.analyses import compare_tuco_outputco
        >>> sets = demo.prompt_sets()
        >>> cmp = compare_tuco_outputco(pair, {k: sets[k][:10] for k in ("web", "chat", "harmful")})
        >>> cmp.summary.round(3)
               set   n  mean_tuco  sem_tuco  mean_outputco  sem_outputco  spearman
        0      web  10      0.210     0.006          0.223         0.010     0.758
        1     chat  10      0.325     0.017          0.628         0.019    -0.576
        2  harmful  10      0.581     0.010          0.590         0.016     0.770
        >>> round(cmp.auc("chat", "web", metric="outputco"), 3)
        1.0
    """
    pair = check_pair(pair)
    norm = check_common(batch_size, norm)
    table = read_labelled_prompts(prompts)
    texts = table["prompt"].tolist()
    table["tuco"] = score(pair, texts, chat_template=chat_template, batch_size=batch_size, show_progress=show_progress, norm=norm)
    scores = outputco(pair, texts, chat_template=chat_template, batch_size=batch_size, show_progress=show_progress, norm=norm)
    table["outputco"] = scores.detach().cpu().double().numpy()
    groups_t, groups_o = groups_of(table, "set", "tuco"), groups_of(table, "set", "outputco")
    summary = pd.DataFrame(
        [
            {"set": name, "n": len(t), **mean_sem(t, "tuco"), **mean_sem(o, "outputco"), "spearman": _spearman(t, o)}
            for (name, t), o in zip(groups_t.items(), groups_o.values())
        ]
    )
    return TuCoOutputCoComparison(table=table, summary=summary, auc_tuco=auc_matrix(groups_t), auc_outputco=auc_matrix(groups_o))
