"""The paper's Table 1, first column: TuCo separates HH-RLHF chat prompts from OpenWebText (``tuco-lens reproduce owt-hh``).

The paper (§5.2) scores 97-token substrings of the first 1000 OpenWebText records ("web text")
and the first human turns of HH-RLHF conversations ("chat"), each wrapped in the fine-tuned
model's chat template, and reports the ROC AUC of TuCo with chat as the positive class. This
module builds those prompt sets (:func:`owt_hh_records`), knows the paper's values for its pairs
(:data:`PAPER_OWT_HH_AUC`, :func:`paper_auc`) and summarises a score table
(:func:`owt_hh_summary`). Scoring itself is :func:`tuco_lens.score_prompts`, data-parallel
like ``tuco-lens score``.

Our reading of the preprocessing, where the paper leaves a choice: the substring is the first
97 tokens of the record (tokenized by the fine-tuned tokenizer without special tokens, decoded
back to text; shorter records are kept whole); the human turn is the text between the first
``Human:`` and the next ``Assistant:`` of the ``chosen`` conversation; both datasets' ``train``
split.

Example:
    >>> owt_texts = ["the fox eats berries . the cat sleeps .", "my old violin is made of oak ."]
    >>> hh_conversations = ["\\n\\nHuman: where is norvik ?\\n\\nAssistant: in the north .",
    ...                     "\\n\\nHuman: what is a cat ?\\n\\nAssistant: an animal ."]
    >>> records = owt_hh_records(tokenizer, owt_texts, hh_conversations, n=2)
    >>> sorted({r["set"] for r in records}), len(records)
    (['chat', 'web'], 4)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from tuco_lens.errors import InputError

__all__ = [
    "PAPER_OWT_HH_AUC",
    "OWT_DATASET",
    "HH_DATASET",
    "SUBSTRING_TOKENS",
    "paper_auc",
    "first_human_turn",
    "web_substring",
    "owt_hh_records",
    "owt_hh_summary",
    "describe",
]

#: ROC AUC of TuCo, HH-RLHF (positive) vs OpenWebText, in the paper's Table 1 (fine-tuned model: value).
PAPER_OWT_HH_AUC: dict[str, float] = {
    "meta-llama/Llama-2-7b-chat-hf": 1.00,
    "google/gemma-7b-it": 0.93,
    "mistralai/Mistral-7B-Instruct-v0.1": 0.98,
    "lmsys/vicuna-7b-v1.5": 0.99,
    "HuggingFaceH4/zephyr-7b-gemma-v0.1": 0.63,
}
#: The hub datasets the command reads by default (id, split, text column).
OWT_DATASET = ("Skylion007/openwebtext", "train", "text")
HH_DATASET = ("Anthropic/hh-rlhf", "train", "chosen")
#: Length of the web-text substrings, in tokens.
SUBSTRING_TOKENS = 97

_HUMAN = re.compile(r"(?:^|\n)\s*Human:\s*(.*?)(?:\n\s*Assistant:|$)", re.S)


def paper_auc(ft: Any) -> tuple[str, float] | None:
    """The paper's AUC for a fine-tuned model named like one of its pairs: ``(name, value)`` or ``None``.

    The hub id matches, and so does a local directory named like the model (the last path
    component, case-insensitive: ``./Llama-2-7b-chat-hf``).

    Example:
        >>> paper_auc("/models/llama-2-7b-chat-hf")
        ('meta-llama/Llama-2-7b-chat-hf', 1.0)
    """
    text = str(ft).rstrip("/\\").lower()
    for name, value in PAPER_OWT_HH_AUC.items():
        if text == name.lower() or re.split(r"[/\\]", text)[-1] == name.split("/")[-1].lower():
            return name, value
    return None


def first_human_turn(conversation: str) -> str:
    """The first human turn of an HH-RLHF conversation (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``).

    Raises:
        InputError: no ``Human:`` turn.

    Example:
        >>> first_human_turn("\\n\\nHuman: How do I bake bread?\\n\\nAssistant: Mix flour...")
        'How do I bake bread?'
    """
    match = _HUMAN.search(conversation)
    if match is None or not match.group(1).strip():
        raise InputError(f"no 'Human:' turn in the HH-RLHF conversation {conversation[:80]!r}")
    return match.group(1).strip()


def web_substring(tokenizer: Any, text: str, length: int = SUBSTRING_TOKENS) -> str:
    """The first ``length`` tokens of ``text`` (no special tokens), decoded; the whole text if shorter.

    Example:
        >>> long_text = " ".join(demo.prompt_sets()["web"][:10])
        >>> len(tokenizer(web_substring(tokenizer, long_text), add_special_tokens=False)["input_ids"])
        97
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:length]).strip() if len(ids) > length else text.strip()


def owt_hh_records(tokenizer: Any, web_texts: Sequence[str], conversations: Sequence[str], *, n: int = 1000,
                   length: int = SUBSTRING_TOKENS) -> list[dict[str, Any]]:
    """The two prompt sets: ``n`` web-text substrings (``set="web"``), then ``n`` first human turns (``"chat"``).

    Each record keeps ``source_row``, its row in its dataset. Records whose text is empty after
    preprocessing are skipped (and the next record taken), so each set has ``n`` prompts when
    the datasets have enough rows.

    Raises:
        InputError: ``n`` is not positive, or a dataset has no usable row.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"--n must be a positive integer, got {n!r}")
    records: list[dict[str, Any]] = []
    for name, texts, prepare in (
        ("web", web_texts, lambda text: web_substring(tokenizer, text, length)),
        ("chat", conversations, first_human_turn),
    ):
        kept = 0
        for row, text in enumerate(texts):
            if kept == n:
                break
            try:
                prompt = prepare(text)
            except InputError:
                continue
            if prompt:
                records.append({"prompt": prompt, "set": name, "source_row": row})
                kept += 1
        if kept == 0:
            raise InputError(f"no usable {name} prompt in the {'OpenWebText' if name == 'web' else 'HH-RLHF'} input")
    return records


def owt_hh_summary(scores: pd.DataFrame, ft: Any) -> dict[str, Any]:
    """ROC AUC of TuCo (chat positive, web negative) beside the paper's value for this pair.

    Args:
        scores: A score table with ``set`` and ``tuco`` columns (``read_scores``).
        ft: The fine-tuned model's name, to look up :data:`PAPER_OWT_HH_AUC`.

    Example:
        >>> import pandas as pd
        >>> scores = pd.DataFrame({"set": ["chat", "chat", "web", "web"], "tuco": [0.5, 0.4, 0.2, 0.3]})
        >>> owt_hh_summary(scores, "meta-llama/Llama-2-7b-chat-hf")["paper_auc"]
        1.0
    """
    from tuco_lens.metrics import roc_auc

    chat = scores.loc[scores["set"] == "chat", "tuco"].to_numpy()
    web = scores.loc[scores["set"] == "web", "tuco"].to_numpy()
    known = paper_auc(ft)
    return {
        "auc": float(roc_auc(chat, web)),
        "n_chat": int(chat.size),
        "n_web": int(web.size),
        "mean_tuco": {"chat": float(chat.mean()), "web": float(web.mean())},
        "paper_pair": known[0] if known else None,
        "paper_auc": known[1] if known else None,
    }


def describe(summary: Mapping[str, Any]) -> str:
    """One line: the measured AUC and, for the paper's pairs, its value."""
    paper = (f"paper (Table 1, {summary['paper_pair']}): {summary['paper_auc']:.2f}" if summary["paper_pair"]
             else "paper: not one of the paper's pairs")
    return (f"ROC AUC of TuCo, HH-RLHF chat vs OpenWebText: {summary['auc']:.4f} "
            f"(n = {summary['n_chat']} / {summary['n_web']}); {paper}")
