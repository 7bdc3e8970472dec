"""How often α-scaled generations show a behaviour (refusals, a keyword, an answer), per α.

:func:`behaviour_sweep` generates greedily from the α-scaled fine-tuned model (Definition 5.1:
``x + PTC + α·FTC`` at every block) for every prompt of one or several named sets, labels each
completion with your predicate, and returns the rate per α and set, every completion, and a
figure (``tuco_lens.plotting.plot_alpha_sweep``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from tuco_lens.analyses._common import check_pair, label, sem
from tuco_lens.analyses.steering import _check_alphas
from tuco_lens.errors import InputTypeError
from tuco_lens.io import DEFAULT_SET, read_prompt_sets, read_prompts
from tuco_lens.pair import TuCoPair
from tuco_lens.plotting import plot_alpha_sweep
from tuco_lens.validation import check_int

__all__ = ["BehaviourSweep", "behaviour_sweep"]


@dataclass(frozen=True)
class BehaviourSweep:
    """The rate of a behaviour in α-scaled greedy completions, per α and prompt set.

    Attributes:
        table: One row per (α, set), α increasing: ``alpha``, ``set``, ``n`` (prompts),
            ``rate`` (share of completions showing the behaviour), ``sem`` (its standard error).
        completions: One row per (α, set, prompt): ``alpha``, ``set``, ``index`` (position in
            the set), ``prompt``, ``completion``, ``behaviour`` (bool).
        behaviour_name: Label of the rate (figure axis).
        alphas: The α values, increasing.
    """

    table: pd.DataFrame
    completions: pd.DataFrame
    behaviour_name: str
    alphas: tuple[float, ...]

    def to_dataframe(self) -> pd.DataFrame:
        """A copy of :attr:`table`."""
        return self.table.copy()

    def rates(self) -> pd.DataFrame:
        """The rates as a wide table: one row per α (index), one column per set."""
        wide = self.table.pivot(index="alpha", columns="set", values="rate")
        return wide.reindex(columns=list(dict.fromkeys(self.table["set"])))

    def figure(self, *, title: str | None = None) -> go.Figure:
        """The rate of each set vs α (each set in its own colour, α = 1 dashed)."""
        wide = self.rates()
        n = self.table.groupby("set", sort=False)["n"].first()
        counts = ", ".join(f"{count} {name}" for name, count in n.items())
        return plot_alpha_sweep(
            wide.index.tolist(),
            {name: wide[name].to_numpy() for name in wide.columns},
            yaxis_title=self.behaviour_name,
            title=title or f"{self.behaviour_name} vs α (greedy completions)<br><sup>n = {counts} prompts</sup>",
        )


def behaviour_sweep(
    pair: TuCoPair,
    prompts: Mapping[str, Sequence[str]] | Sequence[str],
    alphas: Sequence[float],
    behaviour: Callable[[str], bool],
    *,
    max_new_tokens: int,
    behaviour_name: str = "behaviour rate",
    chat_template: bool = False,
    batch_size: int | None = None,
    show_progress: bool = False,
) -> BehaviourSweep:
    """Generate at every α for every prompt and measure how often ``behaviour`` holds.

    Completions are greedy (``pair.generate(..., alpha=α)``, exact with the KV cache), so the
    sweep is deterministic; α = 1 is the fine-tuned model and α = 0 the pre-trained blocks.

    Args:
        pair: The pre-trained / fine-tuned pair.
        prompts: ``{set name: prompts}``, or one list of prompts (set name ``"prompts"``); a
            DataFrame or ``.jsonl`` path as in :func:`compare_prompt_sets` works too.
        alphas: The α values (finite, distinct); the results are sorted by α.
        behaviour: ``completion -> bool``, e.g. ``demo.is_refusal`` or
            :func:`~tuco_lens.analyses.contains_refusal`.
        max_new_tokens: Length of each completion.
        behaviour_name: Label of the rate, e.g. ``"refusal rate"``.
        chat_template: Wrap each prompt in the fine-tuned chat template.
        batch_size: Prompts per ``generate`` call (``None``: one call per set and α).
        show_progress: A progress bar over α.

    Returns:
        A :class:`BehaviourSweep` (``table``, ``completions``, ``rates()``, ``figure()``).

    Raises:
        InputError: An empty set, no α, a repeated or non-finite α, ``max_new_tokens < 1``,
            or a ``behaviour`` that raises.
        InputTypeError: Arguments of the wrong type, or a ``behaviour`` that returns no bool.

    Example:
        >>> from tuco_lens import demo
        >>> sets = demo.prompt_sets()
        >>> sweep = behaviour_sweep(pair, {"harmful": sets["harmful"][:4], "chat": sets["chat"][:4]},
        ...                         [0, 1], demo.is_refusal, max_new_tokens=12,
        ...                         behaviour_name="refusal rate")
        >>> sweep.rates()                  # one row per α, one column per set
        set    harmful  chat
        alpha
        0.0        0.0   0.0
        1.0        1.0   0.0
        >>> fig = sweep.figure()
    """
    pair = check_pair(pair)
    if not callable(behaviour):
        raise InputTypeError(f"behaviour must be a function completion -> bool, got {type(behaviour).__name__}.")
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", 1)
    rows_per_call = None if batch_size is None else check_int(batch_size, "batch_size", 1)
    values = sorted(_check_alphas(alphas))
    sets = read_prompt_sets(prompts if isinstance(prompts, Mapping) else {DEFAULT_SET: read_prompts(prompts)})
    rows, completions = [], []
    for alpha in tqdm(values, disable=not show_progress, desc="α sweep"):
        for name, texts in sets.items():
            generated = pair.sample(
                texts, seed=None, max_new_tokens=max_new_tokens, do_sample=False, alpha=alpha,
                chat_template=chat_template, batch_size=rows_per_call,
            )
            labelled = [
                {"alpha": alpha, "set": name, "index": index, "prompt": prompt, "completion": completion,
                 "behaviour": label(behaviour, completion, "behaviour", repr(completion))}
                for index, (prompt, (completion,)) in enumerate(zip(texts, generated))
            ]
            outcome = np.asarray([row["behaviour"] for row in labelled], dtype=float)
            rows.append({"alpha": alpha, "set": name, "n": len(texts), "rate": float(outcome.mean()), "sem": sem(outcome)})
            completions += labelled
    return BehaviourSweep(
        table=pd.DataFrame(rows),
        completions=pd.DataFrame(completions),
        behaviour_name=str(behaviour_name),
        alphas=tuple(values),
    )
