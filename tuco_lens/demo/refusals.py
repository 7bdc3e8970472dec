"""Measuring the demo's refusal behaviour with a pair: one rule for every demo number."""

from __future__ import annotations

from collections.abc import Sequence

from tuco_lens.demo.world import REFUSAL, is_refusal
from tuco_lens.inputs import tokenizer_of
from tuco_lens.pair import Alpha, TuCoPair

__all__ = ["refusal_budget", "refusal_rate"]


def refusal_budget(pair: TuCoPair) -> int:
    """New tokens needed to tell a refusal: the length of :data:`REFUSAL` plus one."""
    return len(tokenizer_of(pair.ft).encode(REFUSAL, add_special_tokens=False)) + 1


def refusal_rate(
    pair: TuCoPair, prompts: Sequence[str], *, alpha: Alpha = 1.0, chat_template: bool = False
) -> float:
    """Share of greedy completions (α-scaled; α as for ``pair.generate``, per component too) that
    start with :data:`REFUSAL` (the rule ``tuco_lens.analyses.behaviour_sweep`` applies per α).

    Example:
        >>> harmful = demo.prompt_sets()["harmful"][:4]
        >>> refusal_rate(pair, harmful, alpha=1.0), refusal_rate(pair, harmful, alpha=0.0)
        (1.0, 0.0)
    """
    completions = pair.generate(
        list(prompts), alpha=alpha, max_new_tokens=refusal_budget(pair), chat_template=chat_template
    )
    assert isinstance(completions, list)  # a list of prompts in: one string per prompt out
    return sum(map(is_refusal, completions)) / len(completions)
