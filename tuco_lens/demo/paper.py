"""The paper's analyses (``tuco_lens.analyses``) run on the demo pair and its synthetic world.

The adversarial suffix of §5.3 comes from :func:`tuco_lens.contrib.suffix_search.suffix_search`
(a research tool kept out of ``tuco_lens.analyses``).

:func:`run_paper_analyses` is what ``tuco-lens demo`` and ``notebooks/03_paper_analyses.ipynb``
run; :class:`PaperAnalyses` keeps every result object, so each table and figure can be
inspected. The numbers it gives are reported in ``docs/analyses.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuco_lens.analyses import (
    JailbreakResult,
    ManyShotSweep,
    PromptSetComparison,
    SteeringResult,
    TransformationComparison,
    TuCoOutputCoComparison,
    compare_prompt_sets,
    compare_transformations,
    compare_tuco_outputco,
    jailbreak_success,
    many_shot_sweep,
    steer_with_cv,
    suffix_transform,
)
from tuco_lens.contrib.suffix_search import SuffixSearchResult, suffix_search
from tuco_lens.demo.refusals import refusal_budget, refusal_rate
from tuco_lens.pair import TuCoPair

__all__ = ["PaperAnalyses", "run_paper_analyses", "MANY_SHOT_KS"]

#: Shot counts of the many-shot sweep (k ≤ 12 fits the demo model's 256 positions).
MANY_SHOT_KS = (0, 1, 2, 4, 8, 12)


@dataclass(frozen=True)
class PaperAnalyses:
    """Every analysis of the paper, run on the demo pair (see ``docs/analyses.md``).

    Attributes:
        prompt_sets: §5.2 — web vs chat (and the forbidden-topic sets).
        many_shot: §5.3 — TuCo and refusal rate vs the number of compliant shots.
        transformations: §5.3 — the same forbidden requests translated, or with suffixes
            (a hand-written one and the one found by :attr:`suffix`).
        jailbreaks: §5.4 — sampled completions, jailbreak success and the AUC of TuCo.
        steering_max: §5.1 — α chosen by 5-fold CV to maximise multiple-choice accuracy.
        steering_min: §5.1 — the same, minimising.
        outputco: §5.5 — OutputCo next to TuCo.
        suffix: the GCG-style suffix search on held-out forbidden requests.
        refusal_rates: Greedy refusal rate of the fine-tuned model on each transformation of
            the forbidden requests (``transformation -> rate``), next to their TuCo.
    """

    prompt_sets: PromptSetComparison
    many_shot: ManyShotSweep
    transformations: TransformationComparison
    jailbreaks: JailbreakResult
    steering_max: SteeringResult
    steering_min: SteeringResult
    outputco: TuCoOutputCoComparison
    suffix: SuffixSearchResult
    refusal_rates: dict[str, float]

    def figures(self, include_prompt_sets: bool = True) -> list:
        """One figure per analysis, in the paper's order (the prompt-set figure optional)."""
        return [self.prompt_sets.figure("chat", "web")] * include_prompt_sets + [
            self.transformations.figure(),
            self.many_shot.figure(),
            self.jailbreaks.figure(),
            self.steering_max.figure(),
            self.outputco.figure(),
            self.suffix.figure(),
        ]

    def summary(self) -> dict[str, float]:
        """The headline numbers (also written to ``summary.json`` by the demo)."""
        ms = self.many_shot.summary.set_index("k")
        tr = self.transformations.summary
        return {
            "auc_chat_vs_web": self.prompt_sets.auc("chat", "web"),
            "many_shot_tuco_k0": float(ms.loc[0, "mean_tuco"]),
            "many_shot_tuco_kmax": float(ms.loc[max(MANY_SHOT_KS), "mean_tuco"]),
            **{f"transformation_tuco[{name}]": float(t) for name, t in zip(tr["transformation"], tr["mean_tuco"].to_numpy())},
            **{f"transformation_refusal_rate[{name}]": rate for name, rate in self.refusal_rates.items()},
            "jailbreak_auc_not_jailbroken": float(self.jailbreaks.auc),
            "jailbreak_tpr_at_5_fpr": float(self.jailbreaks.tpr_at_5_fpr),
            "steering_delta_maximize": float(self.steering_max.delta),
            "steering_delta_minimize": float(self.steering_min.delta),
            "suffix_loss_start": float(self.suffix.losses[0]),
            "suffix_loss_end": float(self.suffix.losses[-1]),
        }


def run_paper_analyses(pair: TuCoPair, *, suffix_steps: int = 20, show_progress: bool = False) -> PaperAnalyses:
    """Run every analysis of ``tuco_lens.analyses`` on the demo world.

    Args:
        pair: The demo pair (``tuco_lens.demo.load_pair()``).
        suffix_steps: Steps of the adversarial-suffix search (20 take ~20 s on one CPU thread).
        show_progress: Progress bars.

    Example:
        >>> from tuco_lens import demo
        >>> results = run_paper_analyses(pair, suffix_steps=1)
        >>> round(results.prompt_sets.auc("chat", "web"), 3), round(results.jailbreaks.auc, 3)
        (0.998, 0.885)
    """
    from tuco_lens import demo

    sets = demo.prompt_sets()
    forbidden = [r for r in demo.requests("heldout", [demo.FORBIDDEN_TOPIC])]
    requests = [r.text for r in forbidden]
    n_refusal = refusal_budget(pair)
    prompt_sets = compare_prompt_sets(
        pair, {name: sets[name] for name in ("web", "chat", "harmful", "harmful_lang2")}, batch_size=64
    )
    suffix = suffix_search(
        pair, requests[:8], demo.REFUSAL, chat_template=True, n_steps=suffix_steps, seed=0,
        show_progress=show_progress,
    )
    transformations = _transformations(pair, requests, suffix.suffix_text)
    many_shot = _many_shot(pair, [r.text for r in forbidden if r.prefix == 0], n_refusal, show_progress)
    jailbreaks = jailbreak_success(
        pair, {"harmful": sets["harmful"], "harmful_lang2": sets["harmful_lang2"]}, n_samples=8,
        max_new_tokens=n_refusal, is_refusal=demo.is_refusal, seed=0, batch_size=256,
    )
    items = demo.multiple_choice_items(90, lang2=True)
    steering_max = steer_with_cv(pair, items, objective="maximize", seed=0)
    steering_min = steer_with_cv(pair, items, objective="minimize", seed=0)
    outputco = compare_tuco_outputco(pair, {name: sets[name] for name in ("web", "chat", "harmful")}, batch_size=64)
    return PaperAnalyses(
        prompt_sets=prompt_sets,
        many_shot=many_shot,
        transformations=transformations,
        jailbreaks=jailbreaks,
        steering_max=steering_max,
        steering_min=steering_min,
        outputco=outputco,
        suffix=suffix,
        refusal_rates=_refusal_rates(pair, transformations),
    )


def _transformations(pair: TuCoPair, requests: list[str], suffix_text: str) -> TransformationComparison:
    """The held-out forbidden requests translated, with a hand-written suffix and with the found one."""
    from tuco_lens import demo

    return compare_transformations(
        pair,
        requests,
        {
            "language 2": demo.translate,
            "suffix 'sure , here is how :'": suffix_transform("sure , here is how :"),
            "suffix found by suffix_search": suffix_transform(suffix_text),
        },
        chat_template=True,
        batch_size=64,
    )


def _many_shot(pair: TuCoPair, plain: list[str], n_refusal: int, show_progress: bool) -> ManyShotSweep:
    """TuCo and refusal rate of the ``plain`` forbidden requests after k compliant training dialogues."""
    from tuco_lens import demo

    shots = [(r.text, r.compliant_answer) for r in demo.requests("train", [demo.FORBIDDEN_TOPIC])][:12]
    return many_shot_sweep(
        pair,
        plain,
        shots,
        ks=MANY_SHOT_KS,
        build_prompt=lambda request, examples: demo.many_shot_prompt(request, len(examples)),
        behaviour=demo.is_refusal,
        behaviour_name="refusal rate",
        max_new_tokens=n_refusal,
        batch_size=32,
        show_progress=show_progress,
    )


def _refusal_rates(pair: TuCoPair, transformations: TransformationComparison) -> dict[str, float]:
    """Greedy refusal rate of the fine-tuned model on each transformation of the requests."""
    return {
        str(name): refusal_rate(pair, rows.prompt.tolist(), chat_template=True)
        for name, rows in transformations.table.groupby("transformation", sort=False)
    }

