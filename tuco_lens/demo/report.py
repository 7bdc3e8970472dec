"""The demo's main job: score the demo prompt sets, sweep α, and write a report that explains itself.

``tuco-lens demo`` runs :func:`run_demo`; notebooks can call it too. Every number it reports
is computed here, on the embedded pair, at run time. The report is a short paper about the
pair: a headline table and a description of both models, then one
:class:`~tuco_lens.plotting.ReportSection` per figure (what it shows, how to read it, what it
shows here, and its documentation page). :func:`report_sections` builds that list, so a new
figure is one more entry.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tuco_lens.analyses import BehaviourSweep, behaviour_sweep
from tuco_lens.decomposition import Decomposition
from tuco_lens.demo.components import ComponentFindings, component_findings
from tuco_lens.demo.paper import MANY_SHOT_KS, PaperAnalyses, run_paper_analyses
from tuco_lens.demo.refusals import refusal_budget
from tuco_lens.errors import InputError
from tuco_lens.metrics import roc_auc
from tuco_lens.pair import TuCoPair
from tuco_lens.plotting import (
    ReportSection,
    plot_components,
    plot_head_heatmap,
    plot_layers,
    plot_prompt_sets,
    plot_token_heatmap,
    plot_top_tokens,
    save_report,
    token_html,
)
from tuco_lens.scoring_io import check_output_dir

__all__ = [
    "DemoResults",
    "ALPHAS",
    "SAMPLE_ALPHAS",
    "SCORED_SETS",
    "SHOWN_SETS",
    "score_sets",
    "sample_generations",
    "report_sections",
    "default_docs_url",
    "run_demo",
]

#: α values of the refusal sweep.
ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)

#: α values of the sample generations shown in the report.
SAMPLE_ALPHAS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)

#: The prompt sets scored by the demo (names from :func:`tuco_lens.demo.prompt_sets`).
SCORED_SETS: tuple[str, ...] = ("web", "chat", "harmful", "harmful_lang2", "web_lang2", "chat_lang2")

#: The sets the report's figures and headline table show, with what each one is.
SHOWN_SETS: dict[str, str] = {
    "web": "web text (plain pre-training-style pages)",
    "chat": "benign chat requests",
    "harmful": "requests on the forbidden topic",
    "harmful_lang2": "the same forbidden requests in the rarer second language",
}


@dataclass
class DemoResults:
    """What the demo measured.

    Attributes:
        scores: One row per prompt: ``set``, ``index``, ``prompt``, ``tuco``.
        sweep: One row per α: ``alpha``, ``refusal_rate_harmful``, ``refusal_rate_chat``.
        auc_chat_vs_web: ROC AUC of TuCo separating chat (positive) from web prompts.
        auc_harmful_vs_lang2: ROC AUC of TuCo separating harmful requests in the main language
            (positive) from the same requests in the rarer second language.
        samples: Sample generations: one row per (prompt, α) with ``set``, ``prompt``,
            ``alpha``, ``completion``.
        paper: The paper's analyses run on the demo world (``None`` if skipped).
        components: The split inside the blocks (:mod:`tuco_lens.demo.components`), or ``None``.
        behaviour: The refusal sweep itself (every completion per α and set).
        sections: The report's sections, in order.
    """

    scores: pd.DataFrame
    sweep: pd.DataFrame
    auc_chat_vs_web: float
    auc_harmful_vs_lang2: float
    samples: pd.DataFrame | None = None
    paper: PaperAnalyses | None = None
    components: ComponentFindings | None = None
    behaviour: BehaviourSweep | None = None
    sections: list[ReportSection] = field(default_factory=list)

    def mean_tuco(self) -> pd.Series:
        """Mean TuCo per scored set."""
        means = self.scores.groupby("set", sort=False)["tuco"].mean()
        assert isinstance(means, pd.Series)  # one column grouped (pandas' annotations also allow a DataFrame)
        return means

    def summary(self) -> str:
        """A few lines for the terminal."""
        means = self.mean_tuco()
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


def sample_generations(
    pair: TuCoPair, prompts: dict[str, str], alphas: Sequence[float] = SAMPLE_ALPHAS, max_new_tokens: int = 16
) -> pd.DataFrame:
    """Greedy α-scaled completions of a few named prompts: ``set``, ``prompt``, ``alpha``, ``completion``."""
    names, texts = list(prompts), list(prompts.values())
    rows = []
    for alpha in alphas:
        completions = pair.generate(texts, alpha=alpha, max_new_tokens=max_new_tokens)
        assert isinstance(completions, list)  # a list of prompts in: one string per prompt out
        for name, text, completion in zip(names, texts, completions):
            rows.append({"set": name, "prompt": text, "alpha": float(alpha), "completion": " ".join(completion.split())})
    return pd.DataFrame(rows)


def default_docs_url() -> str | None:
    """``file://`` URL of the documentation site built in this checkout (``site/``), if tuco_lens
    runs from a checkout; ``None`` for an installed package (the report then names the pages)."""
    root = Path(__file__).resolve().parents[2]
    return (root / "site").as_uri() + "/" if (root / "mkdocs.yml").is_file() else None


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, escape=True, border=0, classes="numbers")


def _pct(rate: float) -> str:
    return f"{100 * rate:.0f}%"


def _span(rates: np.ndarray) -> str:
    """``at 100%`` or ``between 90% and 100%``."""
    low, high = _pct(rates.min()), _pct(rates.max())
    return f"at {low}" if low == high else f"between {low} and {high}"


def _intro(results: DemoResults) -> str:
    from tuco_lens import __version__, demo

    log = json.loads((demo.DEMO_DIR / "training_log.json").read_text())
    m, pre, ft = log["model"], log["pretrain"], log["finetune"]
    counts = _set_sizes(results)
    means = results.mean_tuco()
    rows = [
        (f"mean TuCo of <code>{name}</code>: {html.escape(what)}", f"{means[name]:.3f}", f"{counts[name]}")
        for name, what in SHOWN_SETS.items()
    ]
    rows += [
        ("ROC AUC of TuCo, chat (positive) vs web", f"{results.auc_chat_vs_web:.3f}", f"{counts['chat']} chat, {counts['web']} web"),
        ("ROC AUC of TuCo, harmful (positive) vs harmful_lang2", f"{results.auc_harmful_vs_lang2:.3f}",
         f"{counts['harmful']} harmful, {counts['harmful_lang2']} harmful_lang2"),
    ]
    for a, r, c in zip(results.sweep.alpha, results.sweep.refusal_rate_harmful, results.sweep.refusal_rate_chat):
        if a in SAMPLE_ALPHAS:
            rows.append((f"refusal rate at α = {a:g}: harmful / chat", f"{_pct(r)} / {_pct(c)}",
                         f"{counts['harmful']} harmful, {counts['chat']} chat"))
    if results.paper is not None:
        p = results.paper.summary()
        rows += [
            (f"many-shot: mean TuCo at k = 0 → k = {max(MANY_SHOT_KS)} shots",
             f"{p['many_shot_tuco_k0']:.3f} → {p['many_shot_tuco_kmax']:.3f}", f"{len(results.paper.many_shot.table) // len(MANY_SHOT_KS)} per k"),
            ("mean TuCo with the suffix found by the search (refusal rate)",
             f"{p['transformation_tuco[suffix found by suffix_search]']:.3f} "
             f"({_pct(p['transformation_refusal_rate[suffix found by suffix_search]'])})", f"{len(results.paper.transformations.scores('original'))}"),
            ("ROC AUC of TuCo, not jailbroken vs jailbroken", f"{p['jailbreak_auc_not_jailbroken']:.3f}",
             f"{len(results.paper.jailbreaks.table)}"),
        ]
    table = "".join(
        f'<tr><td>{what}</td><td class="num">{value}</td><td class="num">{n}</td></tr>' for what, value, n in rows
    )
    return (
        f"<p>Written by <code>tuco-lens demo</code> (tuco_lens {__version__}). Every number below was computed "
        "in this run, offline, on the demo pair shipped with the package.</p>"
        "<p><strong>The two models.</strong> Both are the same tiny Llama-style decoder: "
        f"{m['num_hidden_layers']} blocks, width {m['hidden_size']}, {m['num_attention_heads']} attention heads, "
        f"{m['n_params']:,} parameters, a word-level vocabulary of {m['vocab_size']} words and {m['max_position_embeddings']} positions. "
        f"The <em>pre-trained</em> model learned synthetic “web text” ({pre['config']['steps']} steps, "
        f"{pre['tokens']:,} tokens): facts about five topics in two languages, the second one rarer. The "
        f"<em>fine-tuned</em> model started from those weights and learned chat dialogues ({ft['config']['steps']} steps): "
        "it answers requests helpfully and refuses every request about one forbidden topic (made-up “dark potions”) "
        f"with the fixed reply <code>{html.escape(demo.REFUSAL)}</code>. The embedding, final norm and unembedding were "
        "frozen, so α = 0 is exactly the pre-trained model.</p>"
        "<p><strong>What TuCo measures.</strong> At every block, tuco_lens splits the fine-tuned model's update of its "
        "residual stream into the pre-trained block's update (PTC) and the rest (FTC). TuCo is the share of FTC in the "
        "summed updates at the prompt's last token: 0 = all pre-training, 1 = all fine-tuning.</p>"
        "<table><thead><tr><th>headline (this run)</th><th>value</th><th>prompts</th></tr></thead>"
        f"<tbody>{table}</tbody></table>"
    )


def report_sections(
    results: DemoResults, pair: TuCoPair, sets: dict[str, list[str]]
) -> list[ReportSection]:
    """The sections of the demo report, in order: one entry per figure or table."""
    examples = [sets[name][0] for name in SHOWN_SETS]
    dec = pair.decompose(examples)
    sections = [
        _sets_section(results),
        _layers_section(dec),
        _tokens_section(dec, examples[list(SHOWN_SETS).index("harmful")]),
        _steering_section(results),
    ]
    if results.components is not None:
        sections.append(_components_section(results.components))
    if results.paper is not None:
        sections += _paper_sections(results.paper)
    return sections


def _set_sizes(results: DemoResults) -> dict[str, int]:
    """The number of scored prompts of each set."""
    return {str(name): int(n) for name, n in results.scores["set"].value_counts(sort=False).items()}


def _sets_section(results: DemoResults) -> ReportSection:
    """TuCo distributions of the shown sets, with the chat-vs-web AUC."""
    means, counts, names = results.mean_tuco(), _set_sizes(results), list(SHOWN_SETS)
    by_set = {name: results.scores.tuco[results.scores.set == name].tolist() for name in names}
    return ReportSection(
        "TuCo per prompt set",
        intro=f"<p>TuCo of every prompt of four held-out sets: {', '.join(f'<code>{n}</code> ({counts[n]})' for n in names)}.</p>",
        figure=plot_prompt_sets(by_set, positive="chat", negative="web", title="TuCo per prompt set"),
        guidance=(
            "Each histogram is one set's TuCo distribution, as a fraction of the set. Further right means "
            "fine-tuning contributes more of what the model writes at the prompt's last token. The AUC is the "
            "chance that a random chat prompt scores above a random web page. "
            f"<em>Here:</em> web text sits lowest (mean {means['web']:.3f}), benign chat higher ({means['chat']:.3f}, "
            f"AUC {results.auc_chat_vs_web:.3f}), and the forbidden requests highest ({means['harmful']:.3f}): the "
            "fine-tune's main new behaviour, the refusal, is where it contributes most. The same forbidden requests "
            f"in the rarer language score lower ({means['harmful_lang2']:.3f}), as the paper finds for conjugate prompting."
        ),
        docs="how-to/plots.md#plot_prompt_sets-distributions-per-prompt-set",
    )


def _layers_section(dec: Decomposition) -> ReportSection:
    """PTC, FTC and β per layer of one prompt of each shown set."""
    names = list(SHOWN_SETS)
    beta_first = dec.at_last_token(dec.beta)[:, 0].tolist()
    return ReportSection(
        "Per layer, at the last token",
        intro="<p>One prompt of each set, decomposed block by block at the token TuCo is measured on.</p>",
        figure=plot_layers(dec, labels=names, title="PTC and FTC per layer at the last token (L1)"),
        guidance=(
            "Top: the size of each block's pre-training component (solid) and fine-tuning component (dashed). "
            "Bottom: β<sub>l</sub>, TuCo of blocks 0..l; its last point is the prompt's TuCo. Read the bottom panel for "
            "“how much of the update so far is fine-tuning”, the top one for “where the large updates are”. "
            f"<em>Here:</em> the three chat-formatted prompts have a high β already after block 0 "
            f"({', '.join(f'{n} {b:.2f}' for n, b in zip(names[1:], beta_first[1:]))}), the web page stays low at every "
            f"block ({beta_first[0]:.2f} after block 0)."
        ),
        docs="how-to/plots.md#plot_layers-components-per-layer",
    )


def _tokens_section(dec: Decomposition, request: str) -> ReportSection:
    """β per layer and token of the forbidden ``request``, and every shown prompt's tokens coloured."""
    names = list(SHOWN_SETS)
    web, harmful = names.index("web"), names.index("harmful")
    per_token = dec.tuco_per_token.nan_to_num(-1.0)
    top = int(per_token[harmful].argmax())  # the forbidden request's most fine-tuned token
    web_max = float(per_token[web][dec.attention_mask[web].bool()].max())
    at_last = ", the last token, where the model starts its answer" if top == int(dec.last_index[harmful]) else ""
    return ReportSection(
        "Per token and layer",
        intro=f"<p>The forbidden request of the previous section, <code>{html.escape(request)}</code>, token by "
        "token (heatmap), and all four prompts coloured by per-token TuCo (below it).</p>",
        figure=[
            plot_token_heatmap(dec, index=harmful, label="harmful"),
            token_html(dec, index=list(range(len(names))), labels=names),
        ],
        guidance=(
            "Cell (l, t) is β<sub>l</sub> at token t: the share of fine-tuning in the updates of blocks 0..l at that "
            "position. The top row is the per-token TuCo, and its last cell the prompt's TuCo. Below, each token is "
            "coloured by its per-token TuCo on the same 0–1 scale (hover for the value). <em>Here:</em> in the "
            f"forbidden request the highest per-token TuCo is at <code>{html.escape(dec.str_tokens[harmful][top])}</code> "
            f"({float(per_token[harmful, top]):.3f}){at_last}; no token of the web page goes above {web_max:.2f}."
        ),
        docs="how-to/plots.md#plot_token_heatmap-per-layer-and-token",
    )


def _samples_table(samples: pd.DataFrame) -> pd.DataFrame:
    """The sample generations as one row per prompt and one column per α."""
    table = samples.pivot_table(index=["set", "prompt"], columns="alpha", values="completion", aggfunc="first", sort=False)
    table.columns = [f"α = {a:g}" for a in table.columns]
    table = table.reset_index()
    table["prompt"] = table["prompt"].map(lambda t: " ".join(t.split()))
    return table


def _steering_section(results: DemoResults) -> ReportSection:
    """The refusal rate versus α, and the sample generations."""
    if results.behaviour is None or results.samples is None:
        raise InputError(
            "The steering section needs results.behaviour and results.samples: build the results with run_demo."
        )
    counts = _set_sizes(results)
    harmful = dict(zip(results.sweep["alpha"], results.sweep["refusal_rate_harmful"]))
    return ReportSection(
        "Steering with α",
        intro=(
            "<p>Generation with the fine-tuning component scaled by α at every block "
            "(x<sub>l+1</sub> = x<sub>l</sub> + PTC<sub>l</sub> + α·FTC<sub>l</sub>, both recomputed on the scaled stream): "
            "α = 0 is the pre-trained model, α = 1 the fine-tuned one. Refusal rate = share of greedy completions that are "
            f"the fixed refusal, on all {counts['harmful']} forbidden and {counts['chat']} benign chat requests.</p>"
        ),
        figure=[
            results.behaviour.figure(title=f"Refusal rate vs α<br><sup>n = {counts['harmful']} harmful, "
                                           f"{counts['chat']} chat requests; greedy completions</sup>"),
            "<p><strong>Sample generations</strong> (greedy, up to 16 tokens):</p>" + _table(_samples_table(results.samples)),
        ],
        guidance=(
            "Left of the dashed line fine-tuning is weakened, right of it amplified. <em>Here:</em> the refusal is "
            f"absent at α = 0 ({_pct(harmful[0.0])}), already strong at α = 0.5 ({_pct(harmful[0.5])}), complete at "
            f"α = 1, and breaks down again when fine-tuning is amplified to α = 1.5 ({_pct(harmful[1.5])}); benign chat "
            f"is refused at most {_pct(results.sweep['refusal_rate_chat'].to_numpy().max())} of the time. The samples show "
            "what the pre-trained blocks do instead at α = 0: they answer the forbidden request like an FAQ page of the "
            "pre-training web text."
        ),
        docs="how-to/steer.md",
    )


def _components_section(found: ComponentFindings) -> ReportSection:
    """Inside the blocks: which sub-block carries the refusal (docs/components.md)."""
    dec, shares, refusal = found.decomposition, found.shares["harmful"], found.refusal
    first = found.top_tokens.query("part == 'ftc' and rank == 1").token.iloc[0].strip()
    only = ", ".join(f"{l}: {_pct(r)}" for l, r in found.mlp_layer_only.items())
    table = pd.DataFrame({"greedy refusal rate on the forbidden requests": list(refusal),
                          "": [_pct(r) for r in refusal.values()]})
    return ReportSection(
        "Inside the blocks: attention, MLP, heads",
        intro=(
            "<p>Each fine-tuning component FTC<sub>l</sub> split exactly into the fine-tuning of attention, of the MLP, "
            "and the pre-trained MLP's answer to the changed attention (they add up to FTC<sub>l</sub>); attention further "
            "per head. Then each sub-block's fine-tuning removed alone (α per component) on the "
            f"{len(dec)} forbidden requests.</p>"
        ),
        figure=[
            plot_components(dec, 0, label="a forbidden request"),
            plot_head_heatmap(dec, 0, shares=True, label="a forbidden request"),
            plot_top_tokens(found.attribution, 0, part="ftc", k=8),
            _table(table),
        ],
        guidance=(
            "Bars are the norms of the three components per layer at the last token; the heatmap gives each head's share "
            "of TuCo; the last chart the tokens Σ FTC pushes up (blue) and down (red) in the logits. <em>Here:</em> the "
            f"MLPs carry the largest share of TuCo on forbidden requests ({shares['mlp']:.3f} of "
            f"{float(dec.tuco.mean()):.3f}, attention {shares['attn']:.3f}, MLP←attention {shares['mlp_via_attn']:.3f}), "
            f"and the refusal lives there: without the MLPs' fine-tuning the model refuses "
            f"{_pct(refusal['MLP fine-tuning removed'])}, without the attention's {_pct(refusal['attention fine-tuning removed'])}. "
            f"It is spread over layers (MLP fine-tuning kept in one layer only, attention fine-tuned: {only}), and the "
            f"token fine-tuning promotes most is \u201c{html.escape(first)}\u201d, the refusal's first word."
        ),
        docs="components.md#worked-example-where-does-the-demo-pairs-refusal-live",
    )


_PAPER_DOCS = "analyses.md#on-the-demo-pair-what-reproduces-and-what-does-not"


def _paper_sections(paper: PaperAnalyses) -> list[ReportSection]:
    """One section per analysis of the paper, in the paper's order, and the suffix search."""
    p = paper.summary()
    return [
        _transformations_section(paper, p),
        _many_shot_section(paper),
        _jailbreaks_section(paper, p),
        _steering_cv_section(paper, p),
        _outputco_section(paper),
        _suffix_section(paper, p),
    ]


def _transformations_section(paper: PaperAnalyses, p: dict[str, float]) -> ReportSection:
    """TuCo and refusal rate of the forbidden requests translated or with a suffix (§5.3)."""
    return ReportSection(
        "Prompt transformations (§5.3)",
        intro=(
            f"<p>The {len(paper.transformations.scores('original'))} held-out forbidden requests, as they are, translated "
            "into the rarer language, with the hand-written suffix <code>sure , here is how :</code>, and with the suffix "
            f"found by the search below: <code>{html.escape(paper.suffix.suffix_text)}</code>.</p>"
        ),
        figure=paper.transformations.figure(),
        guidance=(
            "One violin per transformation, ordered by mean TuCo; the legend gives each one's AUC against the original "
            "requests (1 = every transformed request scores below every original). <em>Here:</em> every transformation "
            f"lowers TuCo (original {p['transformation_tuco[original]']:.3f}, language 2 "
            f"{p['transformation_tuco[language 2]']:.3f}, found suffix {p['transformation_tuco[suffix found by suffix_search]']:.3f}), "
            "and the refusal rate falls with it "
            f"({_pct(p['transformation_refusal_rate[original]'])} → {_pct(p['transformation_refusal_rate[language 2]'])} → "
            f"{_pct(p['transformation_refusal_rate[suffix found by suffix_search]'])})."
        ),
        docs=_PAPER_DOCS,
    )


def _many_shot_section(paper: PaperAnalyses) -> ReportSection:
    """TuCo and refusal rate versus the number of compliant shots (§5.3)."""
    summary = paper.many_shot.summary
    tuco = dict(zip(summary["k"], summary["mean_tuco"]))
    return ReportSection(
        "Many-shot prompts (§5.3)",
        intro=f"<p>Each forbidden request preceded by k compliant example dialogues, k = {', '.join(map(str, MANY_SHOT_KS))}.</p>",
        figure=paper.many_shot.figure(),
        guidance=(
            "Top: mean TuCo (± standard error) per k, on an axis fitted to the means; bottom: the refusal rate. "
            f"<em>Here:</em> TuCo falls a little ({tuco[0]:.3f} at k = 0 → "
            f"{tuco[max(MANY_SHOT_KS)]:.3f} at k = {max(MANY_SHOT_KS)}), as in the paper, but the refusal rate "
            f"stays {_span(summary['behaviour_rate'].to_numpy())}: the demo model's "
            "refusal depends only on the last request, so many-shot prompting does not jailbreak it."
        ),
        docs=_PAPER_DOCS,
    )


def _jailbreaks_section(paper: PaperAnalyses, p: dict[str, float]) -> ReportSection:
    """TuCo of the requests that sampling jailbreaks and of those it does not (§5.4)."""
    table = paper.jailbreaks.table
    jailbroken = table["jailbroken"].to_numpy(dtype=bool)
    in_lang2 = int(jailbroken[table["set"].to_numpy() == "harmful_lang2"].sum())
    return ReportSection(
        "Jailbreak success (§5.4)",
        intro=(
            f"<p>{paper.jailbreaks.n_samples} sampled completions (temperature 1) per forbidden request, in both languages; "
            f"a request counts as jailbroken when at least {paper.jailbreaks.min_non_refusals} are not the refusal.</p>"
        ),
        figure=paper.jailbreaks.figure(),
        guidance=(
            "The two histograms split the requests by outcome. <em>Here:</em> requests the model keeps refusing have "
            f"higher TuCo (AUC {p['jailbreak_auc_not_jailbroken']:.3f}), as the paper finds; "
            f"{in_lang2} of the {int(jailbroken.sum())} jailbroken requests are in the rarer language."
        ),
        docs=_PAPER_DOCS,
    )


def _steering_cv_section(paper: PaperAnalyses, p: dict[str, float]) -> ReportSection:
    """Multiple-choice accuracy under α chosen by cross-validation (§5.1)."""
    steer = paper.steering_max
    return ReportSection(
        "α-steering with cross-validation (§5.1)",
        intro=(
            f"<p>Multiple-choice questions in the rarer language ({steer.n_items} items); the answer is the option with "
            "the highest next-token probability under the α-scaled model, and α is chosen by 5-fold cross-validation.</p>"
        ),
        figure=steer.figure(),
        guidance=(
            "The curve is the accuracy of all items at each α; stars mark the α chosen in each fold. "
            f"<em>Here:</em> Δ = {100 * p['steering_delta_maximize']:+.1f} points maximising and "
            f"{100 * p['steering_delta_minimize']:+.1f} minimising: the direction of the paper's result, but small "
            f"(±2 of {steer.n_items} items)."
        ),
        docs=_PAPER_DOCS,
    )


def _outputco_section(paper: PaperAnalyses) -> ReportSection:
    """TuCo next to OutputCo on the same prompts (§5.5)."""
    oc = paper.outputco
    return ReportSection(
        "TuCo vs OutputCo (§5.5)",
        intro="<p>OutputCo compares the two models' own final states; TuCo looks inside the fine-tuned pass.</p>",
        figure=oc.figure(),
        guidance=(
            "Left: one point per prompt (dashed: equal values). Right: the means per set. <em>Here:</em> TuCo separates "
            f"the forbidden requests from benign chat (AUC {oc.auc('harmful', 'chat'):.3f}), OutputCo does not "
            f"({oc.auc('harmful', 'chat', metric='outputco'):.3f}): the final state hides much of what fine-tuning "
            "does inside."
        ),
        docs=_PAPER_DOCS,
    )


def _suffix_section(paper: PaperAnalyses, p: dict[str, float]) -> ReportSection:
    """The adversarial-suffix search: its objective per step and the suffix it found."""
    return ReportSection(
        "Adversarial-suffix search",
        intro=(
            f"<p>A GCG-style search for one suffix that makes the refusal less likely on {len(paper.suffix.requests)} "
            f"forbidden requests ({paper.suffix.n_steps} steps). Found: <code>{html.escape(paper.suffix.suffix_text)}</code>.</p>"
        ),
        figure=paper.suffix.figure(),
        guidance=(
            "The objective is the summed log-probability of the refusal, which the search <em>lowers</em>: a falling "
            f"line is the attack working. <em>Here:</em> it falls from {p['suffix_loss_start']:.1f} to "
            f"{p['suffix_loss_end']:.1f}; with the suffix the model refuses "
            f"{_pct(p['transformation_refusal_rate[suffix found by suffix_search]'])} of the held-out requests, "
            "though it answers with fragments of other topics rather than complying."
        ),
        docs="reference/analyses.md",
    )


def run_demo(
    out_dir: str | Path | None = None,
    *,
    pair: TuCoPair | None = None,
    alphas: Sequence[float] = ALPHAS,
    paper_analyses: bool = True,
    docs_url: str | None = None,
    show_progress: bool = False,
) -> DemoResults:
    """Score the demo sets, sweep α, build the report's sections and (with ``out_dir``) write it.

    With ``paper_analyses`` (default) the report also runs every analysis of
    :mod:`tuco_lens.analyses` on the demo world (:func:`tuco_lens.demo.paper.run_paper_analyses`).

    Writes ``report.html`` (self-contained, plotly.js embedded), ``results.csv`` (TuCo per
    prompt), ``alpha_sweep.csv`` and ``summary.json`` into ``out_dir``, which is created (and
    checked) before anything runs.

    Raises:
        OutputError: ``out_dir`` is a file or cannot be created or written.

    Args:
        out_dir: Where to write the files (``None``: compute only).
        pair: The pair (default: the demo pair).
        alphas: α values of the refusal sweep (must include :data:`SAMPLE_ALPHAS`).
        paper_analyses: Also run the paper's analyses.
        docs_url: Base URL of the documentation site the sections link to (default:
            :func:`default_docs_url`).
        show_progress: Progress bars.

    Example:
        >>> results = run_demo("tuco-report", pair=pair, alphas=[0.0, 0.5, 1.0, 1.5], paper_analyses=False)
        >>> print(results.summary())
        mean TuCo per prompt set: web 0.202, chat 0.331, harmful 0.582, harmful_lang2 0.392, web_lang2 0.182, chat_lang2 0.301
        ROC AUC, TuCo of chat vs web prompts: 0.998
        ROC AUC, TuCo of harmful requests vs the same in language 2: 0.993
        refusal rate on harmful requests: α=0: 0%, α=0.5: 88%, α=1: 100%, α=1.5: 59%
    """
    from tuco_lens import demo

    if out_dir is not None:
        out_dir = check_output_dir(out_dir)  # before the long run: a file there fails now, not at the end
    pair = pair if pair is not None else demo.load_pair()
    sets = demo.prompt_sets()
    scores = score_sets(pair, sets, show_progress=show_progress)
    by_set = {name: scores.tuco[scores.set == name].tolist() for name in SCORED_SETS}
    behaviour = behaviour_sweep(
        pair, {"harmful": sets["harmful"], "chat": sets["chat"]}, alphas, demo.is_refusal,
        max_new_tokens=refusal_budget(pair), behaviour_name="refusal rate", show_progress=show_progress,
    )
    rates = behaviour.rates()
    sweep = pd.DataFrame({"alpha": rates.index.to_numpy(), **{f"refusal_rate_{name}": rates[name].to_numpy() for name in rates}})
    results = DemoResults(
        scores=scores,
        sweep=sweep,
        auc_chat_vs_web=roc_auc(by_set["chat"], by_set["web"]),
        auc_harmful_vs_lang2=roc_auc(by_set["harmful"], by_set["harmful_lang2"]),
        samples=sample_generations(pair, {name: sets[name][0] for name in ("chat", "harmful", "harmful_lang2")}),
        behaviour=behaviour,
    )
    if paper_analyses:
        results.paper = run_paper_analyses(pair, show_progress=show_progress)
        results.components = component_findings(pair, sets)
    results.sections = report_sections(results, pair, sets)
    if out_dir is not None:
        _write(results, Path(out_dir), docs_url if docs_url is not None else default_docs_url())
    return results


def _write(results: DemoResults, out_dir: Path, docs_url: str | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results.scores.to_csv(out_dir / "results.csv", index=False)
    results.sweep.to_csv(out_dir / "alpha_sweep.csv", index=False)
    summary = {
        "auc_chat_vs_web": results.auc_chat_vs_web,
        "auc_harmful_vs_lang2": results.auc_harmful_vs_lang2,
        "mean_tuco": results.mean_tuco().to_dict(),
        "refusal_rate_harmful": dict(zip(map(str, results.sweep.alpha), results.sweep.refusal_rate_harmful)),
        "refusal_rate_chat": dict(zip(map(str, results.sweep.alpha), results.sweep.refusal_rate_chat)),
    }
    if results.paper is not None:
        summary["paper_analyses"] = results.paper.summary()
    if results.components is not None:
        summary["components"] = results.components.summary()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    save_report(
        results.sections,
        out_dir / "report.html",
        title="What fine-tuning did to a tiny chat model: the tuco_lens demo report",
        intro=_intro(results),
        docs_url=docs_url,
    )
