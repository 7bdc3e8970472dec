"""Where the demo pair's refusal lives: the split inside the blocks, measured (docs/components.md).

:func:`component_findings` is what ``tuco-lens demo`` reports in its "Inside the blocks" section and
what ``docs/components.md`` quotes: the TuCo shares of attention, MLP and MLP←attention per prompt
set, the refusal rate on forbidden requests with the fine-tuning of each sub-block removed
(α per component), layer by layer, and the tokens each component promotes at the last token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from tuco_lens.attribution import LogitAttribution
from tuco_lens.decomposition import COMPONENTS, Decomposition
from tuco_lens.demo.refusals import refusal_rate
from tuco_lens.pair import TuCoPair

__all__ = ["ComponentFindings", "component_findings"]


@dataclass(frozen=True)
class ComponentFindings:
    """The component split on the demo pair.

    Attributes:
        shares: ``set name -> component -> mean share of TuCo`` (``Decomposition.tuco_shares``;
            the three shares of a prompt add up to its TuCo).
        refusal: Refusal rate on the forbidden requests (greedy, α per component) with
            ``"fine-tuned"``, ``"attention fine-tuning removed"`` (``{"attn": 0}``), ``"MLP
            fine-tuning removed"`` (``{"mlp": 0}``) and ``"both removed"``.
        mlp_layer_removed: ``layer -> refusal rate`` with the MLP fine-tuning of that layer alone
            removed (everything else fine-tuned).
        mlp_layer_only: ``layer -> refusal rate`` with MLP fine-tuning kept in that layer alone
            (attention fine-tuned everywhere).
        top_tokens: For ``ftc``, ``ftc_attn`` and ``ftc_mlp``: the tokens with the largest mean
            direct effect on the logits over the forbidden requests (``part``, ``rank``,
            ``token``, ``mean_logit_effect``).
        decomposition: ``pair.decompose(harmful, components=True)``, for the figures.
        attribution: ``pair.logit_attribution(harmful, components=True)``.
    """

    shares: dict[str, dict[str, float]]
    refusal: dict[str, float]
    mlp_layer_removed: dict[int, float]
    mlp_layer_only: dict[int, float]
    top_tokens: pd.DataFrame
    decomposition: Decomposition
    attribution: LogitAttribution

    def summary(self) -> dict:
        """The numbers as plain JSON-ready values (``summary.json`` of ``tuco-lens demo``)."""
        return {
            "tuco_shares": self.shares,
            "refusal": self.refusal,
            "refusal_mlp_layer_removed": {str(k): v for k, v in self.mlp_layer_removed.items()},
            "refusal_mlp_layer_only": {str(k): v for k, v in self.mlp_layer_only.items()},
            "top_tokens": {
                part: group.sort_values("rank").token.tolist() for part, group in self.top_tokens.groupby("part")
            },
        }


def _one_hot(n_layers: int, layer: int, on: float, off: float) -> list[float]:
    return [on if l == layer else off for l in range(n_layers)]


def component_findings(pair: TuCoPair, sets: Mapping[str, Sequence[str]], *, k: int = 5) -> ComponentFindings:
    """Measure the component split of the demo pair (or any pair with a refusal).

    Args:
        pair: The pair.
        sets: Named prompt sets; ``"harmful"`` holds the forbidden requests.
        k: Tokens per component in :attr:`ComponentFindings.top_tokens`.

    Example:
        >>> sets = demo.prompt_sets()
        >>> findings = component_findings(pair, {k: v[:4] for k, v in sets.items()})
        >>> findings.refusal["MLP fine-tuning removed"]
        0.0
    """
    harmful = list(sets["harmful"])
    shares = {}
    for name, prompts in sets.items():
        dec = pair.decompose(list(prompts), components=True, heads=name == "harmful")
        shares[name] = {c: round(float(v.mean()), 4) for c, v in dec.tuco_shares().items()}
        if name == "harmful":
            decomposition = dec
    removed = {
        "fine-tuned": 1.0,
        "attention fine-tuning removed": {"attn": 0.0},
        "MLP fine-tuning removed": {"mlp": 0.0},
        "both removed": {"attn": 0.0, "mlp": 0.0},
    }
    refusal = {label: refusal_rate(pair, harmful, alpha=alpha) for label, alpha in removed.items()}
    n = pair.n_layers
    layer_removed = {l: refusal_rate(pair, harmful, alpha={"mlp": _one_hot(n, l, 0.0, 1.0)}) for l in range(n)}
    layer_only = {l: refusal_rate(pair, harmful, alpha={"mlp": _one_hot(n, l, 1.0, 0.0)}) for l in range(n)}
    attribution = pair.logit_attribution(harmful, components=True)
    vocab = attribution.token_strings
    assert vocab is not None  # the pair has a tokenizer: refusal_rate generated text with it above
    rows = []
    for part in ("ftc",) + tuple(f"ftc_{c}" for c in COMPONENTS[:2]):
        mean = attribution.direct[part].mean(0)
        values, ids = torch.topk(mean, k)
        for rank, (value, token_id) in enumerate(zip(values.tolist(), ids.tolist()), 1):
            rows.append({"part": part, "rank": rank, "token": vocab[token_id],
                         "mean_logit_effect": value})
    return ComponentFindings(
        shares=shares, refusal=refusal, mlp_layer_removed=layer_removed, mlp_layer_only=layer_only,
        top_tokens=pd.DataFrame(rows), decomposition=decomposition, attribution=attribution,
    )
