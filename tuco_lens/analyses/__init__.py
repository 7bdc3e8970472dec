"""The paper's analyses as a toolkit: reusable on any pair, data passed in by the user.

Every function takes a :class:`~tuco_lens.TuCoPair` first and the data second (lists,
``.jsonl`` paths or DataFrames; nothing is downloaded), and returns a frozen dataclass with
tidy pandas tables and a ``figure()`` method returning a ``plotly.graph_objects.Figure``.

- :func:`compare_prompt_sets` — TuCo per prompt of named sets, ROC AUC between any two
  (paper §5.2, Table 1: web text vs chat).
- :func:`many_shot_sweep` — TuCo (and optionally a behaviour rate) vs the number of shots
  (§5.3, many-shot jailbreaking).
- :func:`compare_transformations` — TuCo of the same requests under transformations such as
  translation or adversarial suffixes (:func:`suffix_transform`), ordered, with AUCs (§5.3).
- :func:`jailbreak_success` — sampled completions, refusal labels, jailbreak success and the
  AUC of TuCo for "not jailbroken" (§5.4, Table 2).
- :func:`outputco`, :func:`compare_tuco_outputco` — the OutputCo baseline next to TuCo (§5.5).
- :func:`steer_with_cv`, :func:`alpha_accuracy` — multiple-choice accuracy under α-scaling, α
  chosen by cross-validation (§5.1, Table 3).
- :func:`behaviour_sweep` — how often α-scaled greedy completions show a behaviour (a
  refusal, a keyword), per α and prompt set, with every completion (§5.1-style steering of
  generation).

The GCG-style adversarial-suffix search that finds attack strings for models without published
ones (``suffix_search``) is a research tool, not one of these analyses: it lives in
:mod:`tuco_lens.contrib` (``from tuco_lens.contrib import suffix_search``), which
``import tuco_lens.analyses`` does not import.

Example:
    >>> from tuco_lens import demo
    >>> from tuco_lens.analyses import compare_prompt_sets
    >>> sets = demo.prompt_sets()
    >>> result = compare_prompt_sets(pair, {"web": sets["web"][:20], "chat": sets["chat"][:20]})
    >>> round(result.auc("chat", "web"), 3)
    1.0
    >>> fig = result.figure("chat", "web")          # a plotly Figure: fig.show() in a notebook
"""

from tuco_lens.analyses.behaviour import BehaviourSweep, behaviour_sweep
from tuco_lens.analyses.jailbreaks import (
    DEFAULT_REFUSAL_STRINGS,
    JailbreakResult,
    contains_refusal,
    jailbreak_success,
)
from tuco_lens.analyses.many_shot import ManyShotSweep, chat_template_builder, many_shot_sweep
from tuco_lens.analyses.outputco import TuCoOutputCoComparison, compare_tuco_outputco, outputco
from tuco_lens.analyses.prompt_sets import PromptSetComparison, compare_prompt_sets
from tuco_lens.analyses.steering import (
    DEFAULT_ALPHAS,
    SteeringResult,
    alpha_accuracy,
    choose_alpha,
    cv_folds,
    steer_with_cv,
)
from tuco_lens.analyses.transformations import (
    TransformationComparison,
    compare_transformations,
    suffix_transform,
)

__all__ = [
    "compare_prompt_sets",
    "PromptSetComparison",
    "many_shot_sweep",
    "ManyShotSweep",
    "chat_template_builder",
    "compare_transformations",
    "TransformationComparison",
    "suffix_transform",
    "jailbreak_success",
    "JailbreakResult",
    "contains_refusal",
    "DEFAULT_REFUSAL_STRINGS",
    "outputco",
    "compare_tuco_outputco",
    "TuCoOutputCoComparison",
    "alpha_accuracy",
    "steer_with_cv",
    "SteeringResult",
    "cv_folds",
    "choose_alpha",
    "DEFAULT_ALPHAS",
    "behaviour_sweep",
    "BehaviourSweep",
]
