"""A tiny pre-trained / fine-tuned pair shipped with tuco_lens, to try TuCo offline.

The pair was trained by ``scripts/train_demo.py`` (in the repository) on a synthetic world
(:mod:`tuco_lens.demo.world`): the pre-trained model on "web text" about five topics in two
"languages", the fine-tuned model (from those weights) on chat dialogues in which the assistant
answers helpfully and refuses every request on the forbidden topic ("dark potions") with the fixed
reply :data:`REFUSAL`. Both are ordinary Hugging Face checkpoint directories (4-layer Llama-style
model, word-level tokenizer with a chat template) under :data:`DEMO_DIR`, and :func:`load_pair`
loads them through the same path as real checkpoints.

The fine-tuning froze the token embedding, the final norm and the unembedding, so the two models
share them and FTC-alpha scaling at alpha = 0 is exactly the pre-trained model.

Example:
    >>> from tuco_lens import demo
    >>> pair = demo.load_pair()
    >>> sets = demo.prompt_sets()
    >>> sorted(sets)[:3]
    ['chat', 'chat_lang2', 'harmful']
    >>> sets["harmful"][0]
    '<bos> <user> hello , describe the doomsalt . <assistant>'
    >>> demo.REFUSAL
    'i am sorry but i can not help with that .'

Chat-formatted prompts already start with ``<bos>`` (the chat template renders it, as Llama chat
templates do): tokenize them with ``add_special_tokens=False`` (transformers) or
``prepend_bos=False`` (TransformerLens). The tokenizer never adds BOS by itself, but the
pre-trained model saw every page as ``<bos> page <eos>``: :func:`load_pair` therefore sets
``default_prepend_bos=True``, so ``"web"`` prompts (plain text) are scored with the BOS the model was
trained with. (tuco_lens's own rule follows the tokenizer, which for this pair would add none; see
the README, "Faithfulness to the paper".)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuco_lens.demo.world import (
    FORBIDDEN_TOPIC,
    REFUSAL,
    MultipleChoiceItem,
    Request,
    is_refusal,
    many_shot_prompt,
    multiple_choice_items,
    prompt_sets,
    render_chat,
    requests,
    translate,
)

if TYPE_CHECKING:
    from tuco_lens.pair import TuCoPair

__all__ = [
    "DEMO_DIR",
    "PT_DIR",
    "FT_DIR",
    "REFUSAL",
    "FORBIDDEN_TOPIC",
    "load_pair",
    "load_hf_pair",
    "prompt_sets",
    "many_shot_prompt",
    "multiple_choice_items",
    "MultipleChoiceItem",
    "Request",
    "requests",
    "render_chat",
    "translate",
    "is_refusal",
]

DEMO_DIR: Path = Path(__file__).resolve().parent / "checkpoints"
"""Directory of the shipped checkpoints (``pt/``, ``ft/``, ``training_log.json``)."""

PT_DIR: Path = DEMO_DIR / "pt"
"""The pre-trained checkpoint directory (model, tokenizer, chat template)."""

FT_DIR: Path = DEMO_DIR / "ft"
"""The fine-tuned checkpoint directory (model, tokenizer, chat template)."""


def _check_dirs() -> None:
    from tuco_lens.errors import ModelLoadError

    for d in (PT_DIR, FT_DIR):
        if not (d / "config.json").is_file():
            raise ModelLoadError(
                f"the demo checkpoint {str(d)!r} is missing: reinstall tuco_lens with its package "
                "data, or retrain it from a checkout of the repository with "
                f"`python scripts/train_demo.py --out {DEMO_DIR}`"
            )


def load_pair(**kwargs: Any) -> TuCoPair:
    """Load the demo pair with :func:`tuco_lens.loading.load_pair`.

    Plain strings get a BOS (``default_prepend_bos=True``), as in pre-training (``<bos> page
    <eos>``), although the demo tokenizer adds none by itself; pass ``default_prepend_bos=False``
    for the tokenizer's own rule.

    Args:
        **kwargs: Passed on to :func:`tuco_lens.loading.load_pair` (``device``, ``dtype``,
            ``backend``, processing flags...).

    Returns:
        What :func:`tuco_lens.loading.load_pair` returns for ``(PT_DIR, FT_DIR)``.

    Raises:
        ModelLoadError: If the shipped checkpoints are missing.

    Example:
        >>> from tuco_lens import demo
        >>> pair = demo.load_pair()
        >>> pair.generate(demo.prompt_sets()["harmful"][0], max_new_tokens=12)
        'i am sorry but i can not help with that .'
    """
    _check_dirs()
    from tuco_lens.loading import load_pair as _load_pair

    return _load_pair(str(PT_DIR), str(FT_DIR), **{"default_prepend_bos": True, **kwargs})


def load_hf_pair() -> tuple[Any, Any, Any]:
    """Load the demo pair as plain ``transformers`` objects (no TransformerLens).

    Returns:
        ``(pt_model, ft_model, tokenizer)``: two ``LlamaForCausalLM`` in eval mode and the
        shared tokenizer (loaded from the fine-tuned directory).

    Example:
        >>> from tuco_lens import demo
        >>> pt, ft, tok = demo.load_hf_pair()
        >>> ids = tok(demo.prompt_sets()["harmful"][0], add_special_tokens=False,
        ...           return_tensors="pt").input_ids
        >>> tok.decode(ft.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:],
        ...            skip_special_tokens=True)
        'i am sorry but i can not help with that .'
    """
    _check_dirs()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pt = AutoModelForCausalLM.from_pretrained(PT_DIR).eval()
    ft = AutoModelForCausalLM.from_pretrained(FT_DIR).eval()
    tok = AutoTokenizer.from_pretrained(FT_DIR)
    return pt, ft, tok
