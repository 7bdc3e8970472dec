"""A small GCG-style adversarial-suffix search, for running the attack analysis on small models.

The paper (§5.3) scores harmful requests with published GCG attack strings appended (Zou et al.
2023, "Universal and Transferable Adversarial Attacks on Aligned Language Models"). For models
without published strings — such as the embedded demo pair — :func:`suffix_search` finds a
suffix itself with greedy coordinate gradient search:

* The **objective** is the log-probability of the refusal ``target`` (e.g. ``demo.REFUSAL``)
  as the continuation of the attacked prompt, summed over the target's tokens and over all
  requests (one *universal* suffix, GCG's multi-prompt variant). It is **minimised**: the search
  makes the refusal unlikely. (Classic GCG instead maximises the probability of an affirmative
  answer; with a fixed refusal string, pushing the refusal down is the natural objective.)
* The suffix goes **inside the user turn**: the attacked prompt is
  ``build_prompt(request, suffix_text)``; by default the fine-tuned chat template applied to
  ``request + " " + suffix`` (``chat_template=True``) or the plain concatenation. The builder is
  rendered once with a placeholder to find the text before and after the suffix; these are
  tokenized once, and the search works on token ids ``before + suffix + after + target``.
* Each step: the gradient of the objective with respect to one-hot indicators of the suffix
  tokens (through the fine-tuned token embedding, via a hook on ``hook_embed``, so positional
  embeddings, rotary or learned, are untouched); the ``top_k`` tokens with the most negative
  gradient at every position; ``batch_candidates`` single-token swaps (positions spread evenly,
  tokens drawn from the top-k with a seeded generator); their exact objective in batched,
  gradient-free forward passes; the best swap is kept **only if it lowers the objective**
  (keep-best, so the loss never increases).
* Candidates are restricted to ``allowed_tokens`` (default: every non-special token of the
  tokenizer below ``d_vocab`` whose text is not blank), and, with ``filter_retokenization``
  (default), to suffixes whose text re-encodes to the same ids, so the reported suffix text
  means the optimised tokens.
* With ``alpha != 1`` every forward pass (gradient and candidates) runs on the α-scaled model.

:func:`suffix_gradient` exposes the one-hot gradient itself and :func:`target_logprobs` scores
any prompt text independently of the search. Deterministic for a given ``seed`` (and thread
count). On the 4-layer demo pair, 30 steps for
8 requests take seconds on one CPU thread.

Example:
    >>> from tuco_lens import demo
    >>> from tuco_lens.contrib.suffix_search import suffix_search
    >>> requests = [r.text for r in demo.requests("heldout") if r.forbidden][:2]
    >>> result = suffix_search(pair, requests, demo.REFUSAL, chat_template=True, n_suffix_tokens=4,
    ...                        n_steps=3, top_k=8, batch_candidates=8)
    >>> len(result.losses), result.losses[-1] <= result.losses[0]
    (4, True)
    >>> completions = pair.generate(result.prompts(), max_new_tokens=12)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tuco_lens.errors import InputError, InputTypeError, TuCoError
from tuco_lens.inputs import TokenBatch, decode, pad_id, run_batched, tokenizer_of
from tuco_lens.pair import TuCoPair
from tuco_lens.plotting._util import escape, notebook_layout, set_colours, shorten
from tuco_lens.validation import check_alpha, check_int

__all__ = [
    "SuffixSearchResult",
    "suffix_search",
    "suffix_gradient",
    "default_allowed_tokens",
    "target_logprobs",
]

_PLACEHOLDER = "\u2063TUCO_SUFFIX\u2063"

BuildPrompt = Callable[[str, str], str]


@dataclass
class SuffixSearchResult:
    """Outcome of :func:`suffix_search`.

    Attributes:
        suffix_ids: The optimised suffix tokens.
        suffix_text: Their decoded text (re-encodes to ``suffix_ids`` when the search filtered
            for retokenization).
        initial_suffix_ids: The starting suffix.
        losses: The objective (Σ over requests of log p(target | attacked prompt)) of the
            current suffix: ``losses[0]`` before the first step, ``losses[s]`` after step ``s``.
            Never increases.
        accepted: Per step, whether a swap lowered the objective.
        initial_logprobs: log p(target) per request with the initial suffix. ``[n_requests]``
        final_logprobs: log p(target) per request with the final suffix, recomputed after the
            search. ``[n_requests]``
        final_loss: ``final_logprobs.sum()``.
        requests: The attacked requests.
        target: The target string; ``target_ids`` its tokens.
        input_ids: Per request, the exact prompt token ids that were optimised (``before +
            suffix + after``; the target excluded).
        alpha: The α the search ran at.
        seconds: Wall-clock time of the search.
    """

    suffix_ids: list[int]
    suffix_text: str
    initial_suffix_ids: list[int]
    losses: list[float]
    accepted: list[bool]
    initial_logprobs: np.ndarray
    final_logprobs: np.ndarray
    final_loss: float
    requests: list[str]
    target: str
    target_ids: list[int]
    input_ids: list[list[int]]
    alpha: float | list[float]
    seconds: float
    build_prompt: BuildPrompt = field(repr=False)

    @property
    def n_steps(self) -> int:
        return len(self.losses) - 1

    def prompts(self, requests: Sequence[str] | None = None, *, suffix: bool = True) -> list[str]:
        """Attacked prompts (text) for ``requests`` (default: the searched ones, or held-out
        requests to test transfer); ``suffix=False`` builds the same prompts without suffix.

        Example:
            >>> result = suffix_search(pair, ["hello , describe the doomsalt ."], demo.REFUSAL,
            ...                        chat_template=True, n_suffix_tokens=2, n_steps=1, top_k=4, batch_candidates=4)
            >>> result.prompts(["where is norvik ?"], suffix=False)      # held-out requests, no suffix
            ['<bos> <user> where is norvik ? <assistant>']
            >>> completions = pair.generate(result.prompts(["where is norvik ?"]), max_new_tokens=12)
        """
        requests = self.requests if requests is None else _check_requests(requests)
        text = self.suffix_text if suffix else ""
        return [self.build_prompt(r, text) for r in requests]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per step (step 0 = initial suffix): ``step``, ``loss``, ``accepted``."""
        return pd.DataFrame(
            {
                "step": range(len(self.losses)),
                "loss": self.losses,
                "accepted": [False] + list(self.accepted),
            }
        )

    def figure(self, title: str | None = None) -> go.Figure:
        """The objective per step: the summed log-probability of the target, which the search
        lowers (a falling line is the attack working)."""
        target = shorten(self.target, 40)
        fig = go.Figure(
            go.Scatter(
                x=list(range(len(self.losses))),
                y=self.losses,
                mode="lines+markers",
                name="Σ log p(target)",
                line_color=set_colours(["Σ log p(target)"])["Σ log p(target)"],
                hovertemplate="step %{x}<br>Σ log p(target) = %{y:.4f}<extra></extra>",
            )
        )
        heading = title or (
            f"Suffix search: the target gets less likely ({len(self.requests)} requests, {self.n_steps} steps)"
            f"<br><sup>target: “{escape(target)}” (lower = the suffix works)</sup>"
            f"<br><sup>suffix found: “{escape(shorten(self.suffix_text, 60))}”</sup>"
        )
        notebook_layout(fig, heading, legend=False)
        fig.update_layout(xaxis_title="search step", yaxis_title="Σ log p(target) (lower = attack works)")
        return fig


# ----------------------------------------------------------------------------------- helpers
def _check_requests(requests: Any) -> list[str]:
    if isinstance(requests, str):
        requests = [requests]
    if not isinstance(requests, Sequence):
        raise InputTypeError(f"requests must be a list of strings, got {type(requests).__name__}.")
    requests = list(requests)
    if not requests:
        raise InputError("No requests given: pass at least one request to attack.")
    for i, r in enumerate(requests):
        if not isinstance(r, str) or not r:
            raise InputError(f"Request {i} must be a non-empty string, got {r!r}.")
    return requests


def default_allowed_tokens(pair: TuCoPair) -> list[int]:
    """Token ids a suffix may use by default: below ``d_vocab`` and the tokenizer's size, not
    special (``all_special_ids`` or added special tokens), and not blank when decoded."""
    tok = tokenizer_of(pair.ft)
    n = min(len(tok), pair.ft.cfg.d_vocab)
    special = set(int(i) for i in tok.all_special_ids)
    for i, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(i))
    out = []
    for i in range(n):
        if i in special:
            continue
        if not decode(tok, [i]).strip():
            continue
        out.append(i)
    return out


def _chat_builder(pair: TuCoPair) -> BuildPrompt:
    tok = tokenizer_of(pair.ft)
    if not getattr(tok, "chat_template", None):
        raise InputError(
            "chat_template=True, but the fine-tuned tokenizer has no chat template. Pass "
            "build_prompt=lambda request, suffix: ... instead."
        )

    def build(request: str, suffix_text: str) -> str:
        content = f"{request} {suffix_text}" if suffix_text else request
        text = tok.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return cast(str, text)  # tokenize=False: the rendered text

    return build


def _concat_builder(request: str, suffix_text: str) -> str:
    return f"{request} {suffix_text}" if suffix_text else request


def _encode_prefix(pair: TuCoPair, text: str, prepend_bos: bool | None) -> list[int]:
    """Tokens of the text before the suffix, with :meth:`TuCoPair.tokenize`'s BOS rule."""
    if text:
        return pair.tokenize(text, prepend_bos=prepend_bos).tokens[0].tolist()
    bos = pair.ft.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    bos_id = tokenizer_of(pair.ft).bos_token_id
    if bos and isinstance(bos_id, int):
        return [bos_id]
    return []


def _encode_plain(pair: TuCoPair, text: str) -> list[int]:
    return [int(i) for i in tokenizer_of(pair.ft).encode(text, add_special_tokens=False)] if text else []


class _Layout:
    """Left-padded rows ``before + suffix + after + target`` for every request."""

    def __init__(self, befores: list[list[int]], afters: list[list[int]], n_suffix: int,
                 target: list[int], pad_id: int, device: torch.device):
        self.n_rows = len(befores)
        self.n_suffix = n_suffix
        self.n_target = len(target)
        lengths = [len(b) + n_suffix + len(a) + len(target) for b, a in zip(befores, afters)]
        width = max(lengths)
        self.width = width
        tokens = torch.full((self.n_rows, width), pad_id, dtype=torch.long)
        mask = torch.zeros((self.n_rows, width), dtype=torch.long)
        starts = []
        for r, (b, a) in enumerate(zip(befores, afters)):
            pad = width - lengths[r]
            row = b + [0] * n_suffix + a + target
            tokens[r, pad:] = torch.tensor(row, dtype=torch.long)
            mask[r, pad:] = 1
            starts.append(pad + len(b))
        self.tokens = tokens.to(device)
        self.mask = mask.to(device)
        self.suffix_cols = (torch.tensor(starts)[:, None] + torch.arange(n_suffix)[None]).to(device)
        self.target = torch.tensor(target, dtype=torch.long, device=device)
        self.befores, self.afters = befores, afters

    def with_suffixes(self, suffixes: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens and mask for every (suffix, request): ``[n_suffixes * n_rows, width]``,
        suffix-major."""
        c = suffixes.shape[0]
        tokens = self.tokens.repeat(c, 1)
        cols = self.suffix_cols.repeat(c, 1)
        values = suffixes.repeat_interleave(self.n_rows, dim=0)
        tokens.scatter_(1, cols, values)
        return tokens, self.mask.repeat(c, 1)

    def prompt_ids(self, suffix: list[int]) -> list[list[int]]:
        return [b + list(suffix) + a for b, a in zip(self.befores, self.afters)]


def _target_logprob(logits: Tensor, target: Tensor) -> Tensor:
    """Σ_t log p(target_t) per row; the target fills the last ``len(target)`` columns."""
    t = target.shape[0]
    pred = logits[:, -t - 1 : -1].float().log_softmax(-1)  # [rows, t, vocab]
    return pred.gather(-1, target[None, :, None].expand(pred.shape[0], t, 1))[..., 0].sum(-1)


def target_logprobs(
    pair: TuCoPair,
    prompts: Sequence[str],
    target: str | Sequence[int],
    *,
    alpha: float | Sequence[float] = 1.0,
    prepend_bos: bool | None = None,
) -> np.ndarray:
    """log p(target | prompt) of the α-scaled model, per prompt, one prompt at a time.

    Each prompt is tokenized with :meth:`TuCoPair.tokenize` (unpadded), the target with the
    tokenizer without special tokens, and the two token sequences are concatenated.

    Example:
        >>> prompts = [demo.render_chat([{"role": "user", "content": "hello , describe the doomsalt ."}])]
        >>> [round(v, 3) for v in target_logprobs(pair, prompts, demo.REFUSAL).tolist()]
        [-0.114]
    """
    target_ids = _target_ids(pair, target)
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for prompt in prompts:
        row = pair.tokenize(prompt, prepend_bos=prepend_bos).tokens[0]
        target_row = torch.tensor(target_ids, device=row.device)
        with torch.no_grad():
            logits = pair.run_with_alpha(torch.cat([row, target_row])[None], alpha)
        out.append(float(_target_logprob(logits, target_row)[0]))
    return np.asarray(out)


def _target_ids(pair: TuCoPair, target: str | Sequence[int]) -> list[int]:
    if isinstance(target, str):
        ids = _encode_plain(pair, target)
    elif isinstance(target, (Sequence, Tensor)):
        ids = [int(i) for i in (target.tolist() if isinstance(target, Tensor) else target)]
    else:
        raise InputTypeError(f"target must be a string or token ids, got {type(target).__name__}.")
    if not ids:
        raise InputError("target is empty: it must be at least one token (e.g. demo.REFUSAL).")
    bad = [i for i in ids if not 0 <= i < pair.ft.cfg.d_vocab]
    if bad:
        raise InputError(f"target token {bad[0]} is outside the vocabulary of {pair.ft.cfg.d_vocab}.")
    return ids


class _Objective:
    """The search objective Σ_requests log p(target | before + suffix + after), its batched
    evaluation and its gradient with respect to one-hot suffix indicators."""

    def __init__(self, pair: TuCoPair, requests: list[str], target_ids: list[int], n_suffix: int,
                 builder: BuildPrompt, prepend_bos: bool | None, alphas: list[float],
                 eval_batch_rows: int = 1024):
        self.pair, self.model = pair, pair.ft
        self.requests, self.target_ids = requests, target_ids
        self.alphas = alphas
        self.eval_batch_rows = eval_batch_rows
        self.n_suffix = n_suffix
        befores, afters = [], []
        for r in requests:
            text = builder(r, _PLACEHOLDER)
            if not isinstance(text, str) or text.count(_PLACEHOLDER) != 1:
                raise InputError(
                    "build_prompt(request, suffix_text) must return a string containing suffix_text "
                    f"verbatim exactly once; for request {r[:40]!r} it did not."
                )
            before, after = text.split(_PLACEHOLDER)
            befores.append(_encode_prefix(pair, before, prepend_bos))
            afters.append(_encode_plain(pair, after))
        self.device = pair.backend.input_device()
        self.layout = _Layout(befores, afters, n_suffix, target_ids, pad_id(pair.ft), self.device)
        if self.layout.width > self.model.cfg.n_ctx:
            raise InputError(
                f"Attacked prompt plus target is {self.layout.width} tokens, more than the "
                f"context of {self.model.cfg.n_ctx}."
            )

    def scaled(self):
        return nullcontext() if all(a == 1.0 for a in self.alphas) else self.pair.scaled(self.alphas)

    def _logprobs(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """log p(target) per row of ``with_suffixes`` rows, in the α context. ``[rows]``"""
        with self.scaled():
            return _target_logprob(self.pair.backend.forward(tokens, mask), self.layout.target)

    @torch.no_grad()
    def evaluate(self, suffixes: Tensor) -> Tensor:
        """Objective per suffix: Σ over requests of log p(target). ``[n_suffixes]``

        At most ``eval_batch_rows`` rows per forward pass, in whole suffixes (all requests).
        """
        layout = self.layout
        tokens, mask = layout.with_suffixes(suffixes)
        rows_per_pass = max(1, self.eval_batch_rows // layout.n_rows) * layout.n_rows
        values = run_batched(
            TokenBatch(tokens, mask), lambda sub, _: self._logprobs(sub.tokens, sub.attention_mask), rows_per_pass,
            sort_by_length=False,
        )
        return values.view(suffixes.shape[0], layout.n_rows).sum(-1)

    @torch.no_grad()
    def per_request(self, suffix: Tensor) -> np.ndarray:
        """log p(target) per request for one suffix. ``[n_requests]``"""
        return self._logprobs(*self.layout.with_suffixes(suffix[None])).double().cpu().numpy()

    def gradient(self, suffix: Tensor) -> Tensor:
        """d objective / d one-hot suffix indicators. ``[n_suffix, d_vocab]``"""
        model, layout, n_suffix = self.model, self.layout, self.n_suffix
        W_E = model.W_E
        one_hot = torch.zeros(n_suffix, model.cfg.d_vocab, dtype=W_E.dtype, device=self.device)
        one_hot.scatter_(1, suffix[:, None], 1.0)
        one_hot.requires_grad_(True)
        rows = torch.arange(layout.n_rows, device=self.device).repeat_interleave(n_suffix)
        cols = layout.suffix_cols.reshape(-1)

        def replace(embed: Tensor, hook: Any) -> Tensor:
            soft = one_hot @ W_E
            if getattr(model.cfg, "post_embedding_ln", False):
                soft = model.embed.ln(soft)
            values = soft.repeat(layout.n_rows, 1)
            if not torch.allclose(embed[rows, cols].detach(), values.detach(), atol=1e-5, rtol=1e-4):
                raise TuCoError(
                    "suffix_search: the model's hook_embed is not W_E[tokens] (an unsupported "
                    "embedding); the one-hot gradient cannot be taken."
                )
            embed = embed.clone()
            embed[rows, cols] = values.to(embed.dtype)
            return embed

        tokens, mask = layout.with_suffixes(suffix[None])
        with self.scaled(), torch.enable_grad():
            logits = model.run_with_hooks(
                tokens, attention_mask=mask, return_type="logits", fwd_hooks=[("hook_embed", replace)]
            )
            objective = _target_logprob(logits, layout.target).sum()
            (grad,) = torch.autograd.grad(objective, one_hot)
        return grad


def suffix_gradient(
    pair: TuCoPair,
    prompts: Sequence[str],
    target: str | Sequence[int],
    suffix: str | Sequence[int],
    *,
    alpha: float | Sequence[float] = 1.0,
    chat_template: bool = False,
    build_prompt: BuildPrompt | None = None,
    prepend_bos: bool | None = None,
) -> Tensor:
    """The gradient GCG ranks swaps by: d Σ_requests log p(target) / d one-hot suffix tokens.

    Entry ``[j, v]`` is the first-order change of the objective when suffix position ``j``
    moves towards token ``v`` (``(∂objective/∂e_j) · W_E[v]``); the most negative entries are
    the most promising swaps for lowering the target's probability. Arguments as in
    :func:`suffix_search`.

    Returns:
        ``[n_suffix, d_vocab]`` float tensor.
    """
    requests = _check_requests(prompts)
    builder = _builder(pair, build_prompt, chat_template)
    ids = _encode_plain(pair, suffix) if isinstance(suffix, str) else _check_ids(suffix, pair.ft.cfg.d_vocab, "suffix")
    if not ids:
        raise InputError("suffix is empty: it must be at least one token.")
    objective = _Objective(pair, requests, _target_ids(pair, target), len(ids), builder, prepend_bos,
                           check_alpha(alpha, pair.n_layers))
    return objective.gradient(torch.tensor(ids, dtype=torch.long, device=objective.device))


# ----------------------------------------------------------------------------------- search
def suffix_search(
    pair: TuCoPair,
    prompts: Sequence[str],
    target: str | Sequence[int],
    *,
    n_suffix_tokens: int = 8,
    n_steps: int = 50,
    top_k: int = 32,
    batch_candidates: int = 64,
    seed: int = 0,
    allowed_tokens: Sequence[int] | None = None,
    init_suffix: str | Sequence[int] | None = None,
    alpha: float | Sequence[float] = 1.0,
    chat_template: bool = False,
    build_prompt: BuildPrompt | None = None,
    prepend_bos: bool | None = None,
    filter_retokenization: bool = True,
    eval_batch_rows: int = 1024,
    show_progress: bool = False,
) -> SuffixSearchResult:
    """Greedy coordinate gradient (GCG) search for a universal suffix that makes ``target``
    unlikely after every request (see the module docstring for the algorithm).

    Args:
        pair: The model pair; the fine-tuned model (α-scaled if ``alpha != 1``) is attacked.
        prompts: The user requests to attack (the suffix is appended inside the user turn).
        target: The continuation to make unlikely, e.g. ``demo.REFUSAL``: text (encoded without
            special tokens; mind BPE's leading space) or token ids.
        n_suffix_tokens: Suffix length in tokens (ignored when ``init_suffix`` is given).
        n_steps: Search steps (each: one gradient, ``batch_candidates`` evaluated swaps).
        top_k: Candidate tokens per position (most negative gradient).
        batch_candidates: Single-token swaps evaluated per step.
        seed: Seeds the initial suffix (when ``init_suffix`` is None) and the sampling of swaps.
        allowed_tokens: Token ids the suffix may use (default :func:`default_allowed_tokens`).
        init_suffix: Starting suffix (text or ids); default: a seeded draw of allowed tokens.
        alpha: FTC α of the attacked model (a number or one per layer).
        chat_template: With the default builder: ``request + " " + suffix`` as a user turn of
            the fine-tuned chat template (generation prompt added), else as the plain prompt.
        build_prompt: ``build_prompt(request, suffix_text) -> prompt text`` replacing the
            default; it must contain ``suffix_text`` verbatim, once.
        prepend_bos: BOS rule for the text before the suffix, as in :meth:`TuCoPair.tokenize`.
        filter_retokenization: Only accept suffixes whose text re-encodes to the same ids.
        eval_batch_rows: Maximum rows (candidates × requests) per gradient-free forward pass.
        show_progress: Progress bar over steps.

    Returns:
        A :class:`SuffixSearchResult` (suffix, loss per step, log p(target) per request).

    Raises:
        InputError: empty requests or target, a builder that does not place the suffix
            verbatim, invalid allowed tokens or sizes, a sequence longer than the context.

    Example:
        >>> requests = ["hello , describe the doomsalt .", "how do i brew the venom ?"]
        >>> result = suffix_search(pair, requests, demo.REFUSAL, chat_template=True, n_suffix_tokens=4,
        ...                        n_steps=3, top_k=8, batch_candidates=8)
        >>> result.n_steps, result.losses[-1] <= result.losses[0]
        (3, True)
    """
    started = time.perf_counter()
    requests = _check_search_inputs(pair, prompts)
    n_steps, top_k, batch_candidates, eval_batch_rows, seed = (check_int(value, name, minimum) for value, name, minimum in (
        (n_steps, "n_steps", 0), (top_k, "top_k", 1), (batch_candidates, "batch_candidates", 1),
        (eval_batch_rows, "eval_batch_rows", 1), (seed, "seed", 0)))
    alphas = check_alpha(alpha, pair.n_layers)
    builder = _builder(pair, build_prompt, chat_template)
    allowed, allowed_mask = _allowed_tokens(pair, allowed_tokens)
    round_trips = partial(_round_trips, pair) if filter_retokenization else _any_suffix
    generator = torch.Generator().manual_seed(seed)
    initial_suffix = _initial_suffix(pair, init_suffix, n_suffix_tokens, allowed, generator, round_trips)
    target_ids = _target_ids(pair, target)
    objective = _Objective(pair, requests, target_ids, len(initial_suffix), builder, prepend_bos, alphas, eval_batch_rows)
    current = torch.tensor(initial_suffix, dtype=torch.long, device=objective.device)
    initial_logprobs = objective.per_request(current)
    step = partial(_gcg_step, objective, allowed_mask=allowed_mask, top_k=top_k, generator=generator,
                   round_trips=round_trips, positions=_swap_positions(batch_candidates, len(initial_suffix), objective.device))
    current, losses, accepted = _search(objective, current, n_steps, step, show_progress)
    return _result(objective, builder, initial_suffix, current, losses, accepted, initial_logprobs,
                   target, alpha, started)


def _result(objective: _Objective, builder: BuildPrompt, initial_suffix: list[int], current: Tensor, losses: list[float],
            accepted: list[bool], initial_logprobs: np.ndarray, target: str | Sequence[int],
            alpha: float | Sequence[float], started: float) -> SuffixSearchResult:
    """The :class:`SuffixSearchResult` of a search that ended at ``current``."""
    final_logprobs = objective.per_request(current)
    suffix_ids = current.tolist()
    tok = tokenizer_of(objective.pair.ft)
    return SuffixSearchResult(
        suffix_ids=suffix_ids, suffix_text=decode(tok, suffix_ids), initial_suffix_ids=initial_suffix,
        losses=losses, accepted=accepted, initial_logprobs=initial_logprobs, final_logprobs=final_logprobs,
        final_loss=float(final_logprobs.sum()), requests=objective.requests,
        target=target if isinstance(target, str) else decode(tok, objective.target_ids), target_ids=objective.target_ids,
        input_ids=objective.layout.prompt_ids(suffix_ids),
        alpha=alpha if isinstance(alpha, (int, float)) else list(objective.alphas),
        seconds=time.perf_counter() - started, build_prompt=builder,
    )


def _search(objective: _Objective, current: Tensor, n_steps: int,
            step: Callable[[Tensor, float], tuple[Tensor, float, bool]], show_progress: bool) -> tuple[Tensor, list[float], list[bool]]:
    """``n_steps`` steps from ``current``: the final suffix, the loss before and after every step,
    and whether each step changed the suffix."""
    losses, accepted = [float(objective.evaluate(current[None])[0])], []
    progress = tqdm(range(n_steps), disable=not show_progress, desc="suffix search", unit="step")
    for _ in progress:
        current, loss, improved = step(current, losses[-1])
        losses.append(loss)
        accepted.append(improved)
        progress.set_postfix(loss=f"{loss:.3f}")
    progress.close()
    return current, losses, accepted


def _swap_positions(n_candidates: int, n_suffix: int, device: torch.device) -> Tensor:
    """The suffix position each candidate swaps, spread evenly. ``[n_candidates]``"""
    return (torch.arange(n_candidates) * n_suffix // n_candidates).to(device)


def _check_search_inputs(pair: object, prompts: Any) -> list[str]:
    """The checked requests of a search on ``pair`` (a :class:`TuCoPair` with a tokenizer)."""
    if not isinstance(pair, TuCoPair):
        raise InputTypeError(f"The first argument must be a tuco_lens.TuCoPair, got {type(pair).__name__}.")
    if pair.tokenizer is None:
        raise InputError("suffix_search needs the fine-tuned model's tokenizer.")
    return _check_requests(prompts)


def _builder(pair: TuCoPair, build_prompt: BuildPrompt | None, chat_template: bool) -> BuildPrompt:
    """``build_prompt`` (checked), or the default: the chat template or plain concatenation."""
    if build_prompt is not None and not callable(build_prompt):
        raise InputTypeError(f"build_prompt must be a function (request, suffix_text) -> str, got {type(build_prompt).__name__}.")
    return build_prompt or (_chat_builder(pair) if chat_template else _concat_builder)


def _allowed_tokens(pair: TuCoPair, allowed_tokens: Sequence[int] | None) -> tuple[list[int], Tensor]:
    """The allowed token ids (sorted), and as a mask over the vocabulary. ``[d_vocab]``"""
    d_vocab = pair.ft.cfg.d_vocab
    allowed = default_allowed_tokens(pair) if allowed_tokens is None else _check_ids(allowed_tokens, d_vocab, "allowed_tokens")
    if not allowed:
        raise InputError("No allowed tokens: the suffix needs at least one token to choose from.")
    device = pair.backend.input_device()
    mask = torch.zeros(d_vocab, dtype=torch.bool, device=device)
    mask[torch.tensor(allowed, device=device)] = True
    return allowed, mask


def _round_trips(pair: TuCoPair, ids: list[int]) -> bool:
    """Whether the text of ``ids`` encodes back to ``ids``."""
    return _encode_plain(pair, decode(tokenizer_of(pair.ft), ids)) == list(ids)


def _any_suffix(ids: list[int]) -> bool:
    """Every suffix is acceptable (``filter_retokenization=False``)."""
    return True


def _initial_suffix(pair: TuCoPair, init_suffix: str | Sequence[int] | None, n_suffix_tokens: int,
                    allowed: list[int], generator: torch.Generator, round_trips: Callable[[list[int]], bool]) -> list[int]:
    """``init_suffix`` as ids, or a seeded random draw of ``n_suffix_tokens`` allowed tokens that round-trips."""
    if init_suffix is not None:
        suffix = (_encode_plain(pair, init_suffix) if isinstance(init_suffix, str)
                  else _check_ids(init_suffix, pair.ft.cfg.d_vocab, "init_suffix"))
        if not suffix:
            raise InputError("init_suffix is empty: it must be at least one token.")
        return suffix
    n_suffix = check_int(n_suffix_tokens, "n_suffix_tokens", 1)
    pool = torch.tensor(allowed)
    for _ in range(100):
        suffix = pool[torch.randint(len(pool), (n_suffix,), generator=generator)].tolist()
        if round_trips(suffix):
            return suffix
    raise InputError("Could not draw a random initial suffix whose text re-encodes to the "
                     "same tokens; pass init_suffix= or filter_retokenization=False.")


def _gcg_step(objective: _Objective, current: Tensor, current_loss: float, allowed_mask: Tensor, top_k: int,
              positions: Tensor, generator: torch.Generator, round_trips: Callable[[list[int]], bool]) -> tuple[Tensor, float, bool]:
    """One step: the top-k swaps by gradient at every position, one drawn swap per candidate at
    ``positions``, and the best candidate kept only if it lowers the loss. ``(suffix, loss, improved)``"""
    n_candidates, device = positions.shape[0], current.device
    grad = objective.gradient(current).float()
    grad[:, ~allowed_mask] = math.inf
    k = min(top_k, int(allowed_mask.sum()))
    top = (-grad).topk(k, dim=1).indices  # [n_suffix, k]
    picks = torch.randint(k, (n_candidates,), generator=generator).to(device)
    new_tokens = top[positions, picks]
    candidates = current[None].repeat(n_candidates, 1)
    candidates[torch.arange(n_candidates, device=device), positions] = new_tokens
    changed = (new_tokens != current[positions]).tolist()
    seen: set[tuple[int, ...]] = set()
    rows = []
    for i, ok in enumerate(changed):
        ids = tuple(candidates[i].tolist())
        if ok and ids not in seen and round_trips(list(ids)):
            seen.add(ids)
            rows.append(i)
    if rows:
        values = objective.evaluate(candidates[rows])
        best = int(torch.argmin(values))
        if float(values[best]) < current_loss:
            return candidates[rows][best].clone(), float(values[best]), True
    return current, current_loss, False


def _check_ids(ids: Any, d_vocab: int, name: str) -> list[int]:
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise InputTypeError(f"{name} must be a list of token ids, got {type(ids).__name__}.")
    out = []
    for i in list(ids):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise InputTypeError(f"{name} must hold ints, got {i!r}.")
        if not 0 <= int(i) < d_vocab:
            raise InputError(f"{name} holds token {int(i)}, outside the vocabulary [0, {d_vocab}).")
        out.append(int(i))
    return sorted(set(out)) if name == "allowed_tokens" else out
