"""Ray Data adapter (extra ``[ray]``): TuCo as a callable class for ``Dataset.map_batches``.

Ray Data runs the class once per worker (a pair loaded per worker, on the GPU Ray gives it) and
calls it on batches of rows; each batch comes back with ``tuco`` and ``n_tokens`` columns (and,
with ``per_token=True``, ``tokens`` and ``tuco_per_token``) next to the input columns:

    >>> import ray
    >>> ds = ray.data.from_items([{"prompt": p} for p in demo.prompt_sets()["harmful"][:4]])
    >>> scored = ds.map_batches(TuCoScorer, fn_constructor_kwargs={"pt": "meta-llama/Llama-2-7b-hf",
    ...     "ft": "meta-llama/Llama-2-7b-chat-hf", "dtype": "bfloat16", "chat_template": True},
    ...     batch_size=64, num_gpus=1, concurrency=8)  # doctest: +SKIP
    >>> scored = ds.map_batches(TuCoScorer, fn_constructor_kwargs={"demo": True}, batch_size=4, concurrency=1)
    >>> scored.write_parquet("scores/")

Ray itself is not imported here: ``pip install "tuco_lens[ray]"`` brings it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from tuco_lens.errors import InputError

__all__ = ["TuCoScorer"]


class TuCoScorer:
    """Score batches of a Ray dataset (``ds.map_batches(TuCoScorer, fn_constructor_kwargs=...)``).

    Args:
        pt: The pre-trained model (anything :func:`~tuco_lens.load_pair` takes).
        ft: The fine-tuned model.
        demo: Use the embedded demo pair instead of ``pt``/``ft``.
        field: The column holding the prompts.
        chat_template: Wrap prompts in the fine-tuned chat template.
        norm: ``"l1"`` (the paper's) or ``"l2"``.
        per_token: Also return ``tokens`` and ``tuco_per_token`` per row.
        batch_size: Prompts per forward pass inside one Ray batch.
        dtype: Dtype of both models.
        device: Device of both models (default: the loaders' choice, i.e. the GPU Ray assigned
            with ``num_gpus=1``, else the CPU).

    Example:
        >>> scorer = TuCoScorer(demo=True)
        >>> [round(v, 3) for v in scorer({"prompt": np.array(["<bos> <user> hello , describe the doomsalt . <assistant>"])})["tuco"].tolist()]
        [0.559]
    """

    def __init__(self, pt: Any = None, ft: Any = None, *, demo: bool = False, field: str = "prompt",
                 chat_template: bool = False, norm: str = "l1", per_token: bool = False, batch_size: int = 8,
                 dtype: Any = None, device: str | None = None) -> None:
        if demo == (pt is not None or ft is not None) or (not demo and (pt is None or ft is None)):
            raise InputError("TuCoScorer needs pt=... and ft=..., or demo=True")
        if demo:
            from tuco_lens import demo as demo_pair

            self.pair = demo_pair.load_pair(device=device, dtype=dtype)
        else:
            from tuco_lens import load_pair

            self.pair = load_pair(pt, ft, device=device, dtype=dtype)
        self.field, self.chat_template, self.norm = field, chat_template, norm
        self.per_token, self.batch_size = per_token, batch_size

    def __call__(self, batch: Mapping[str, np.ndarray] | pd.DataFrame) -> dict[str, np.ndarray] | pd.DataFrame:
        """The batch (``numpy`` dict or ``pandas`` format) with the result columns added, rows in order."""
        from tuco_lens.scoring import PER_TOKEN_COLUMNS, check_prompts, score_batches

        if self.field not in batch:
            raise InputError(f"the batch has no column {self.field!r}; its columns are {list(batch.keys())}")
        prompts = [str(p) for p in list(batch[self.field])]
        records = [{"prompt": p} for p in prompts]
        everything = list(range(len(records)))
        check_prompts(self.pair, records, everything, chat_template=self.chat_template)
        results: list[dict[str, Any] | None] = [None] * len(records)
        for rows in score_batches(self.pair, records, everything, chat_template=self.chat_template,
                                  batch_size=self.batch_size, norm=self.norm, per_token=self.per_token):
            for row in rows:
                results[row["index"]] = row
        scored = [row for row in results if row is not None]
        assert len(scored) == len(results)  # score_batches scores every index it is given
        columns = ["tuco", "n_tokens", *(PER_TOKEN_COLUMNS if self.per_token else ())]
        added = {}
        for name in columns:
            values = [row[name] for row in scored]
            if name in PER_TOKEN_COLUMNS:
                array = np.empty(len(values), dtype=object)
                array[:] = values
                added[name] = array
            else:
                added[name] = np.asarray(values, dtype=np.float64 if name == "tuco" else np.int64)
        if isinstance(batch, pd.DataFrame):
            return batch.assign(**added)
        return {**batch, **added}
