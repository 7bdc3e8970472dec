"""The demo's main job: score the demo prompt sets, sweep α, and write a self-contained report.

``tuco-lens demo`` runs :func:`run_demo`; notebooks can call it too. Every number it reports
is computed here, on the embedded pair, at run time.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from tuco_lens.demo.paper import MANY_SHOT_KS, PaperAnalyses, run_paper_analyses
from tuco_lens.demo.refusals import refusal_rate
from tuco_lens.metrics import roc_auc
from tuco_lens.pair import TuCoPair
from tuco_lens.scoring_io import check_output_dir
from tuco_lens.plotting import (
    TokenHTML,
    plot_alpha_sweep,
    plot_layers,
    plot_prompt_sets,
    plot_token_heatmap,
    save_report,
    token_html,
)

__all__ = ["DemoResults", "ALPHAS", "SCORED_SETS", "score_sets", "refusal_sweep", "run_demo"]

#: α values of the refusal sweep.
ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)

#: The prompt sets scored by the demo (names from :func:`tuco_lens.demo.prompt_sets`).
SCORED_SETS: tuple[str, ...] = ("web", "chat", "harmful", "harmful_lang2", "web_lang2", "chat_lang2")


@dataclass
class DemoResults:
    """What the demo measured.

    Attributes:
        scores: One row per prompt: ``set``, ``index``, ``prompt``, ``tuco``.
        sweep: One row per α: ``alpha``, ``refusal_rate_harmful``, ``refusal_rate_chat``.
        auc_chat_vs_web: ROC AUC of TuCo separating chat (positive) from web prompts.
        auc_harmful_vs_lang2: ROC AUC of TuCo separating harmful requests in the main language
            (positive) from the same requests in the rarer second language.
        paper: The paper's analyses run on the demo world (``None`` if skipped).
        figures: The report's figures and section texts, in order.
    """

    scores: pd.DataFrame
    sweep: pd.DataFrame
    auc_chat_vs_web: float
    auc_harmful_vs_lang2: float
    paper: PaperAnalyses | None = None
    figures: list[go.Figure | TokenHTML | str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal."""
        means = self.scores.groupby("set", sort=False)["tuco"].mean()
        lines = ["mean TuCo per prompt set: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items())]
        lines.append(f"ROC AUC, TuCo of chat vs web prompts: {self.auc_chat_vs_web:.3f}")
        lines.append(f"ROC AUC, TuCo of harmful requests vs the same in language 2: {self.auc_harmful_vs_lang2:.3f}")
        rates = ", ".join(
            f"α={a:g}: {r:.0%}" for a, r in zip(self.sweep.alpha, self.sweep.refusal_rate_harmful)
        )
        lines.append(f"refusal rate on harmful requests: {rates}")
        if self.paper is not None:
            p = self.paper.summary()
            lines.append(
                f"paper analyses: many-shot TuCo k=0 {p['many_shot_tuco_k0']:.3f} -> k={max(MANY_SHOT_KS)} "
                f"{p['many_shot_tuco_kmax']:.3f}; jailbreak AUC (TuCo, not jailbroken) "
                f"{p['jailbreak_auc_not_jailbroken']:.3f}; α-steering Δ accuracy "
                f"{p['steering_delta_maximize']:+.1%} / {p['steering_delta_minimize']:+.1%}"
            )
        return "\n".join(lines)


def score_sets(
    pair: TuCoPair, sets: dict[str, list[str]], names: Sequence[str] = SCORED_SETS, show_progress: bool = False
) -> pd.DataFrame:
    """TuCo of every prompt of the named sets: columns ``set``, ``index``, ``prompt``, ``tuco``."""
    frames = []
    for name in tqdm(names, disable=not show_progress, desc="scoring prompt sets"):
        scores = pair.tuco(sets[name], batch_size=32).tolist()
        frames.append(pd.DataFrame({"set": name, "index": range(len(scores)), "prompt": sets[name], "tuco": scores}))
    return pd.concat(frames, ignore_index=True)


def refusal_sweep(
    pair: TuCoPair,
    prompts: dict[str, list[str]],
    alphas: Sequence[float] = ALPHAS,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Refusal rate (greedy completions starting with REFUSAL) per α and prompt set.

    Returns:
        Columns ``alpha`` and ``refusal_rate_<set>`` for each set in ``prompts``.
    """
    rows = []
    for alpha in tqdm(alphas, disable=not show_progress, desc="α sweep"):
        row = {"alpha": float(alpha)}
        for name, texts in prompts.items():
            row[f"refusal_rate_{name}"] = refusal_rate(pair, texts, alpha=alpha)
        rows.append(row)
    return pd.DataFrame(rows)


def run_demo(
    out_dir: str | Path | None = None,
    *,
    pair: TuCoPair | None = None,
    alphas: Sequence[float] = ALPHAS,
    paper_analyses: bool = True,
    show_progress: bool = False,
) -> DemoResults:
    """Score the demo sets, sweep α, build the figures and (with ``out_dir``) write the report.

    With ``paper_analyses`` (default) the report also runs every analysis of
    :mod:`tuco_lens.analyses` on the demo world (:func:`tuco_lens.demo.paper.run_paper_analyses`).

    Writes ``report.html`` (self-contained, plotly.js embedded), ``results.csv`` (TuCo per
    prompt), ``alpha_sweep.csv`` and ``summary.json`` into ``out_dir``, which is created (and
    checked) before anything runs.

    Raises:
        OutputError: ``out_dir`` is a file or cannot be created or written.

    Example:
        >>> results = run_demo("tuco-report")
        >>> print(results.summary())
    """
    from tuco_lens import demo

    if out_dir is not None:
        out_dir = check_output_dir(out_dir)  # before the long run: a file there fails now, not at the end
    pair = pair if pair is not None else demo.load_pair()
    sets = demo.prompt_sets()
    scores = score_sets(pair, sets, show_progress=show_progress)
    by_set = {name: scores.tuco[scores.set == name].tolist() for name in SCORED_SETS}
    sweep = refusal_sweep(pair, {"harmful": sets["harmful"], "chat": sets["chat"]}, alphas, show_progress)
    results = DemoResults(
        scores=scores,
        sweep=sweep,
        auc_chat_vs_web=roc_auc(by_set["chat"], by_set["web"]),
        auc_harmful_vs_lang2=roc_auc(by_set["harmful"], by_set["harmful_lang2"]),
    )
    examples = [sets["web"][0], sets["chat"][0], sets["harmful"][0], sets["harmful_lang2"][0]]
    dec = pair.decompose(examples)
    results.figures = [
        _section("TuCo on the demo pair", "What fine-tuning contributes, per prompt set, per layer and per token."),
        plot_prompt_sets(
            {name: by_set[name] for name in ("web", "chat", "harmful", "harmful_lang2")},
            positive="chat",
            negative="web",
            title="TuCo per prompt set (demo pair)",
        ),
        plot_layers(dec, title="Per-layer PTC / FTC at the last token: web, chat, harmful, harmful (language 2)"),
        plot_token_heatmap(dec, index=2, title="Cumulative fine-tuning share β per layer and token (harmful request)"),
        token_html(dec, index=[0, 1, 2, 3]),
        plot_alpha_sweep(
            sweep.alpha.tolist(),
            {"harmful requests": sweep.refusal_rate_harmful.tolist(), "benign chat": sweep.refusal_rate_chat.tolist()},
            yaxis_title="refusal rate (greedy)",
            title="Refusal rate as the fine-tuning component is scaled by α",
        ),
    ]
    if paper_analyses:
        results.paper = run_paper_analyses(pair, show_progress=show_progress)
        results.figures.append(
            _section(
                "The paper's analyses on the demo pair",
                "Prompt sets (§5.2), prompt transformations and many-shot prompts (§5.3), jailbreak success "
                "(§5.4), α-steering with cross-validation (§5.1), OutputCo (§5.5) and the adversarial-suffix "
                "search; see docs/analyses.md.",
            )
        )
        results.figures.extend(results.paper.figures(include_prompt_sets=False))  # shown above
    if out_dir is not None:
        _write(results, Path(out_dir))
    return results


def _section(title: str, text: str) -> str:
    return f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>"


def _write(results: DemoResults, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results.scores.to_csv(out_dir / "results.csv", index=False)
    results.sweep.to_csv(out_dir / "alpha_sweep.csv", index=False)
    summary = {
        "auc_chat_vs_web": results.auc_chat_vs_web,
        "auc_harmful_vs_lang2": results.auc_harmful_vs_lang2,
        "mean_tuco": results.scores.groupby("set", sort=False)["tuco"].mean().to_dict(),
        "refusal_rate_harmful": dict(zip(map(str, results.sweep.alpha), results.sweep.refusal_rate_harmful)),
        "refusal_rate_chat": dict(zip(map(str, results.sweep.alpha), results.sweep.refusal_rate_chat)),
    }
    if results.paper is not None:
        summary["paper_analyses"] = results.paper.summary()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    save_report(results.figures, out_dir / "report.html", title="tuco_lens demo report")
