"""tuco_lens: TuCo (Tuning Contribution) for TransformerLens.

What did fine-tuning do to *this* response? Given a pre-trained model and its fine-tuned
version, tuco_lens splits every layer of the fine-tuned forward pass exactly into a
pre-training component (the pre-trained block applied to the fine-tuned residual stream) and
a fine-tuning component (the rest), computes TuCo per prompt (Nuti, Franzmeyer, Henriques,
ICML 2025), shows the split per layer and per token, and runs forward passes and generation
with the fine-tuning component scaled by α.

The names below are imported on first use (PEP 562), so ``import tuco_lens`` and the
``tuco-lens`` command line start without loading torch or TransformerLens.

Example:
    >>> import tuco_lens
    >>> pair = tuco_lens.load_pair("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf")  # doctest: +SKIP
    >>> pair = tuco_lens.demo.load_pair()        # offline: the embedded demo pair
    >>> scores = pair.tuco(["hello , describe the doomsalt .", "where is norvik ?"], chat_template=True)
    >>> [round(v, 3) for v in scores.tolist()]
    [0.559, 0.334]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tuco_lens.errors import (
    AlphaError,
    IncompatiblePairError,
    InputError,
    InputTypeError,
    MissingDependencyError,
    ModelLoadError,
    NonFiniteError,
    TuCoError,
    UnsupportedVersionsError,
)

if TYPE_CHECKING:  # what the lazy names below resolve to (read by type checkers and the docs)
    from tuco_lens.decomposition import Decomposition
    from tuco_lens.hooks import PairedBlocks, alpha_hooks
    from tuco_lens.inputs import TokenBatch
    from tuco_lens.loading import load_model, load_pair
    from tuco_lens.pair import TuCoPair
    from tuco_lens.scoring import ScoringResult, score_prompts

__version__ = "0.1.0"

__all__ = [
    "TuCoPair",
    "load_pair",
    "score_prompts",
    "ScoringResult",
    "load_model",
    "Decomposition",
    "TokenBatch",
    "PairedBlocks",
    "alpha_hooks",
    "TuCoError",
    "IncompatiblePairError",
    "ModelLoadError",
    "InputError",
    "InputTypeError",
    "AlphaError",
    "UnsupportedVersionsError",
    "MissingDependencyError",
    "NonFiniteError",
    "__version__",
]

#: Public name -> the module that defines it (imported on first access).
_LAZY = {
    "TuCoPair": "tuco_lens.pair",
    "load_pair": "tuco_lens.loading",
    "load_model": "tuco_lens.loading",
    "Decomposition": "tuco_lens.decomposition",
    "TokenBatch": "tuco_lens.inputs",
    "PairedBlocks": "tuco_lens.hooks",
    "alpha_hooks": "tuco_lens.hooks",
    "score_prompts": "tuco_lens.scoring",
    "ScoringResult": "tuco_lens.scoring",
}

_SUBMODULES = frozenset(
    "adapters analyses app attribution backend cli compatibility components corpus_view dataset_records "
    "decomposition demo errors generation hooks inputs loading metrics pair plotting ray_data reproduce "
    "scoring scoring_io sharding versions".split()
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"tuco_lens.{name}")
    else:
        raise AttributeError(f"module 'tuco_lens' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
