"""Token-by-token generation from a TransformerLens model with an explicit attention mask.

TransformerLens's own ``generate`` rebuilds the attention mask from pad-token ids, which is
ambiguous when the pad token is also BOS/EOS (GPT-2). This loop takes the mask tuco_lens built
while tokenizing, keeps it in the KV cache, and is what ``TuCoPair.generate`` runs inside
``pair.scaled(alpha)``; any forward hooks active on the model apply at every step. It runs with
the model's weights in the layout its forward pass reads (:func:`tuco_lens.backends.linear_layout`),
so a HookedTransformer does not copy every weight at every step, and a TransformerBridge with
Hugging Face's own attention and norms (:func:`tuco_lens.backends.native_modules`) unless a hook
needs the bridge's own computation (e.g. the attention pattern).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from tuco_lens.backends import Model, backend_of, linear_layout, native_modules, sample_logits
from tuco_lens.errors import InputError
from tuco_lens.inputs import TokenBatch, to_left_padding
from tuco_lens.validation import check_eos_token_id, check_sampling

__all__ = ["generate_tokens", "seeded_rng", "stop_tokens", "check_sampling", "check_eos_token_id"]


def _fast_forward_passes(generate: Callable) -> Callable:
    """Run ``generate(model, ...)`` with ``model``'s weights in the layout its forward pass reads,
    so no decoding step copies them (:func:`tuco_lens.backends.linear_layout`), and with Hugging
    Face's own attention and norms on a bridge (:func:`tuco_lens.backends.native_modules`)."""

    @functools.wraps(generate)
    def wrapped(model: Any, *args: Any, **kwargs: Any) -> Any:
        with linear_layout(model), native_modules(model):
            return generate(model, *args, **kwargs)

    return wrapped


@torch.no_grad()
@_fast_forward_passes
def generate_tokens(
    model: Model,
    batch: TokenBatch,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | list[int] | None = None,
    use_past_kv_cache: bool = True,
    show_progress: bool = False,
) -> Int[Tensor, "batch pos_plus_new"]:
    """Generate ``max_new_tokens`` tokens after each (left-padded) row of ``batch``.

    Rows that produced an end-of-sequence token keep receiving the pad token afterwards.
    Returns the prompt tokens followed by the new ones; ``[batch, pos + max_new_tokens]``
    (fewer new columns if every row stopped early).

    Example:
        >>> from tuco_lens.inputs import prepare_batch
        >>> out = generate_tokens(ft_model, prepare_batch(ft_model, ["the fox"]), max_new_tokens=5)
        >>> tuple(out.shape)
        (1, 8)
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}.")
    check_sampling(do_sample, temperature, top_k, top_p)
    check_eos_token_id(eos_token_id, model.cfg.d_vocab)
    if batch.attention_mask.shape[1] + max_new_tokens > model.cfg.n_ctx:
        raise InputError(
            f"Prompt length {batch.attention_mask.shape[1]} + max_new_tokens {max_new_tokens} "
            f"exceeds the model's context of {model.cfg.n_ctx}."
        )
    batch = to_left_padding(batch)
    tokens, mask = batch.tokens, batch.attention_mask
    n = tokens.shape[0]
    stop = stop_tokens(model, stop_at_eos, eos_token_id)
    pad = _fill_token(model, stop)
    backend = backend_of(model)
    cache = backend.new_generation_cache(n) if use_past_kv_cache else None
    finished = torch.zeros(n, dtype=torch.bool, device=tokens.device)
    new_tokens = tokens
    for _ in tqdm(range(max_new_tokens), disable=not show_progress, desc="generate"):
        if cache is None:
            logits = backend.forward(tokens, mask, logits="last")
        else:
            logits = backend.forward(new_tokens, mask, logits="last", cache=cache)
        assert logits is not None  # Backend.forward returns them with logits="last"
        final = logits[:, -1, :]
        if do_sample:
            next_token = sample_logits(final, top_k=top_k, top_p=top_p, temperature=temperature, tokens=tokens)
        else:
            next_token = final.argmax(-1)
        next_token = next_token.to(tokens.device)
        if stop:
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            finished |= torch.isin(next_token, torch.tensor(stop, device=tokens.device))
        new_tokens = next_token[:, None]
        tokens = torch.cat([tokens, new_tokens], dim=1)
        mask = torch.cat([mask, torch.ones_like(new_tokens)], dim=1)
        if stop and bool(finished.all()):
            break
    return tokens


def stop_tokens(model: Model, stop_at_eos: bool, eos_token_id: int | list[int] | None) -> list[int]:
    """Token ids that end a row: ``eos_token_id`` if given, else the tokenizer's EOS (none without ``stop_at_eos``)."""
    if not stop_at_eos:
        return []
    if eos_token_id is None:
        eos = getattr(model.tokenizer, "eos_token_id", None)
        return [] if eos is None else [int(eos)]
    return [int(i) for i in eos_token_id] if isinstance(eos_token_id, (list, tuple)) else [int(eos_token_id)]


def _fill_token(model: Model, stop: list[int]) -> int:
    pad = getattr(model.tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    return stop[0] if stop else 0


@contextlib.contextmanager
def seeded_rng(model: Model, seed: int | None) -> Iterator[None]:
    """Seed torch's RNG for the duration (CPU, and the model's CUDA device), then restore the caller's
    state; ``seed=None`` leaves the RNG as it is.

    Example:
        >>> with seeded_rng(pair.ft, 0):
        ...     a = torch.rand(2)
        >>> with seeded_rng(pair.ft, 0):
        ...     b = torch.rand(2)
        >>> torch.equal(a, b)
        True
    """
    if seed is None:
        yield
        return
    device = torch.device(model.cfg.device) if model.cfg.device is not None else torch.device("cpu")
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
