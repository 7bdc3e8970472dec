"""tuco_lens: TuCo (Tuning Contribution) for TransformerLens.

What did fine-tuning do to *this* response? Given a pre-trained model and its fine-tuned
version, tuco_lens splits every layer of the fine-tuned forward pass exactly into a
pre-training component (the pre-trained block applied to the fine-tuned residual stream) and
a fine-tuning component (the rest), computes TuCo per prompt (Nuti, Franzmeyer, Henriques,
ICML 2025), shows the split per layer and per token, and runs forward passes and generation
with the fine-tuning component scaled by α.

Example:
    >>> import tuco_lens
    >>> pair = tuco_lens.load_pair("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf")
    >>> pair.tuco(["How do I bake bread?"], chat_template=True)
"""

from tuco_lens.decomposition import Decomposition
from tuco_lens.errors import (
    AlphaError,
    IncompatiblePairError,
    InputError,
    InputTypeError,
    MissingDependencyError,
    ModelLoadError,
    TuCoError,
    UnsupportedVersionsError,
)
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
    "__version__",
]
