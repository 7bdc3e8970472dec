"""Turning prompts or token tensors into a validated, padded batch.

Every public entry point of tuco_lens (``decompose``, ``tuco``, ``run_with_alpha``,
``generate``) goes through :func:`prepare_batch`, so padding, attention masks and bad
input are handled in exactly one place:

* strings are tokenized one by one with the fine-tuned model's own ``to_tokens`` (so the
  tokens are what ``model.to_tokens(prompt)`` gives: a BOS when ``cfg.default_prepend_bos``,
  which :func:`tuco_lens.load_model` sets to whether the model's own tokenizer adds one), or wrapped in the fine-tuned tokenizer's chat template with the generation
  prompt, then padded (left by default) with an explicit attention mask;
* token tensors are checked (integer dtype, ids inside the vocabulary, mask shape and
  values, at least one real token per row); a tensor that looks padded but comes with no
  mask is refused instead of being scored silently wrong.

The scoring code never infers padding from pad-token ids: it always passes the mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, TypeVar, cast

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import BatchEncoding, PreTrainedTokenizerBase

from tuco_lens.backends import Model, backend_of
from tuco_lens.errors import ChatTemplateTwiceWarning, DoubledBOSWarning, InputError, InputTypeError
from tuco_lens.validation import check_size

__all__ = [
    "TOKENIZE_OPTIONS",
    "decode",
    "tokenizer_of",
    "TokenBatch",
    "TokenizeOptions",
    "prepare_batch",
    "last_real_index",
    "length_sorted_batches",
    "run_batched",
    "pad_id",
    "to_left_padding",
    "encode_prompt",
    "chat_template_frame",
    "doubled_bos_rows",
    "warn_if_doubled_bos",
]


Inputs = str | Sequence[str] | Tensor


class TokenizeOptions(TypedDict, total=False):
    """How a verb of :class:`~tuco_lens.pair.TuCoPair` turns its ``inputs`` into tokens: the keyword
    options every verb takes (``pair.tuco(prompts, chat_template=True)``) and hands to
    :func:`prepare_batch`, which documents them."""

    attention_mask: Int[Tensor, "batch pos"] | None
    chat_template: bool
    prepend_bos: bool | None
    padding_side: Literal["left", "right"]


#: The names of the :class:`TokenizeOptions`.
TOKENIZE_OPTIONS = tuple(TokenizeOptions.__annotations__)


@dataclass(frozen=True)
class TokenBatch:
    """Tokens, their attention mask and (when known) the prompts they came from.

    Attributes:
        tokens: Token ids, padded; ``Int[Tensor, "batch pos"]``.
        attention_mask: 1 at real tokens, 0 at padding; same shape as ``tokens``.
        prompts: The prompts as the user gave them (before any chat template), or ``None``
            when the batch was built from a tensor.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    prompts: list[str] | None = None

    def __post_init__(self) -> None:
        if self.tokens.shape != self.attention_mask.shape:
            raise InputError(
                f"attention_mask has shape {tuple(self.attention_mask.shape)} but tokens have "
                f"shape {tuple(self.tokens.shape)}; they must match."
            )

    @property
    def last_index(self) -> Int[Tensor, " batch"]:
        """Position of the last real (unpadded) token of every row."""
        return last_real_index(self.attention_mask)

    @property
    def n_tokens(self) -> Int[Tensor, " batch"]:
        """Number of real tokens in every row."""
        return self.attention_mask.sum(-1)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def sub_batch(self, rows: Int[Tensor, " rows"] | Sequence[int]) -> tuple[TokenBatch, Int[Tensor, " cols"]]:
        """Keep some rows and drop the columns that are padding in all of them.

        Dropping all-padding columns changes no number: attention never reads masked keys and
        positions are computed from the mask (TransformerLens uses ``cumsum(mask) - 1``).

        Returns:
            The smaller batch and the indices of the columns it kept.
        """
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.tokens.device)
        mask = self.attention_mask[rows]
        cols = mask.any(0).nonzero().flatten()
        prompts = None if self.prompts is None else [self.prompts[i] for i in rows.tolist()]
        return TokenBatch(self.tokens[rows][:, cols], mask[:, cols], prompts), cols


def last_real_index(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Index of the last position whose mask is 1, for left, right or no padding.

    Example:
        >>> last_real_index(torch.tensor([[0, 1, 1], [1, 1, 0]])).tolist()
        [2, 1]
    """
    n_pos = attention_mask.shape[-1]
    return n_pos - 1 - attention_mask.flip(-1).to(torch.long).argmax(-1)


def to_left_padding(batch: TokenBatch) -> TokenBatch:
    """Move every row's padding to the left (generation appends at the right).

    Example:
        >>> to_left_padding(TokenBatch(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))).tokens
        tensor([[0, 5, 6]])
    """
    mask = batch.attention_mask
    # Stable sort puts padding (0) first and keeps the order of real tokens.
    order = torch.argsort(mask, dim=-1, stable=True)
    return TokenBatch(batch.tokens.gather(-1, order), mask.gather(-1, order), batch.prompts)


def prepare_batch(
    model: Model,
    inputs: Inputs,
    *,
    attention_mask: Tensor | None = None,
    chat_template: bool = False,
    prepend_bos: bool | None = None,
    padding_side: Literal["left", "right"] = "left",
) -> TokenBatch:
    """Validate and tokenize what a user passed into a :class:`TokenBatch`.

    Args:
        model: The fine-tuned model; its tokenizer, vocabulary size and context length are used.
        inputs: A prompt, a list of prompts, or an integer tensor ``[batch, pos]`` or ``[pos]``.
        attention_mask: Mask for a token tensor (1 = real token). Required when the tensor is
            padded. Not allowed with strings (tuco_lens builds the mask itself).
        chat_template: Wrap each prompt as a user turn in the tokenizer's chat template with
            the generation prompt (as the TuCo paper does). Strings only.
        prepend_bos: Whether to prepend BOS to plain strings; ``None`` follows the model's
            ``cfg.default_prepend_bos`` like ``model.to_tokens`` (for models loaded by
            tuco_lens: whether their own tokenizer adds a BOS), except that a prompt already
            starting with the BOS token's text (a prompt formatted by hand or by a chat
            template) gets no second BOS. Ignored with the chat template, whose text decides BOS.
        padding_side: Where padding goes when prompts have different lengths.

    Returns:
        The padded tokens and mask on the model's device, and the prompts as given.

    Raises:
        InputError: empty input, empty prompt, ids outside the vocabulary, a prompt longer than
            the context, a mask of the wrong shape or values, a row with no real token, or a
            tensor that looks padded and came without a mask.
        InputTypeError: anything that is not a string, a list of strings or an integer tensor.

    Example:
        >>> batch = prepare_batch(pair.ft, ["the fox", "the fox eats berries"])
        >>> batch.tokens.shape == batch.attention_mask.shape
        True
        >>> batch.attention_mask.tolist()       # left padding
        [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    """
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    if isinstance(inputs, Tensor):
        if chat_template:
            raise InputError(
                "chat_template=True needs prompts as strings; got a token tensor. Pass the "
                "prompts, or apply the template yourself before tokenizing."
            )
        batch = _batch_from_tensor(model, inputs, attention_mask)
    else:
        if attention_mask is not None:
            raise InputError(
                "attention_mask is only for token tensors: tuco_lens tokenizes strings and "
                "builds their mask itself. Drop attention_mask, or pass tokens."
            )
        prompts = _as_prompt_list(inputs)
        if chat_template:
            _warn_if_templated(model.tokenizer, prompts)
        ids = [_encode_checked(model, p, chat_template, prepend_bos) for p in prompts]
        batch = _pad(model, ids, padding_side, prompts)
    device = _input_device(model)
    return TokenBatch(batch.tokens.to(device), batch.attention_mask.to(device), batch.prompts)


def length_sorted_batches(
    batch: TokenBatch, batch_size: int | None = None, token_budget: int | None = None
) -> Iterator[tuple[Int[Tensor, " rows"], Int[Tensor, " cols"], TokenBatch]]:
    """Split a batch into sub-batches of similar length, trimming padding in each.

    Rows are sorted by their number of real tokens (longest first, so an out-of-memory error
    shows up on the first sub-batch), grouped by ``batch_size`` rows and/or so that
    ``rows × padded length`` stays within ``token_budget``. Yields ``(rows, cols, sub_batch)``:
    callers scatter results back to ``[rows][:, cols]`` to restore the input order and frame.

    Example:
        >>> batch = prepare_batch(pair.ft, ["the fox", "the fox eats berries", "the fox eats"])
        >>> for rows, cols, sub in length_sorted_batches(batch, batch_size=2):
        ...     print(rows.tolist(), cols.tolist(), tuple(sub.tokens.shape))
        [1, 2] [0, 1, 2, 3, 4] (2, 5)
        [0] [2, 3, 4] (1, 3)
    """
    batch_size, token_budget = check_size(batch_size, "batch_size"), check_size(token_budget, "token_budget")
    n = len(batch)
    lengths = batch.n_tokens.cpu()
    if batch_size is None and token_budget is None:
        order = torch.arange(n)  # one pass, input order
    else:
        order = torch.argsort(lengths, descending=True, stable=True)
    start = 0
    while start < n:
        longest = int(lengths[order[start]])
        size = n - start if batch_size is None else min(batch_size, n - start)
        if token_budget is not None:
            size = max(1, min(size, token_budget // max(longest, 1)))
        rows = order[start : start + size]
        sub, cols = batch.sub_batch(rows)
        yield rows, cols, sub
        start += size


R = TypeVar("R", bound="Tensor | list[Any]")

RowFn = Callable[[TokenBatch, Int[Tensor, " rows"]], R]
"""``fn(sub_batch, rows)`` as :func:`run_batched` calls it: ``rows`` are the input rows of ``sub_batch``."""


def run_batched(
    batch: TokenBatch,
    fn: RowFn[R],
    batch_size: int | None = None,
    token_budget: int | None = None,
    *,
    sort_by_length: bool = True,
    per_position: bool = False,
    fill: float = 0.0,
    show_progress: bool = False,
    desc: str = "batches",
) -> R:
    """Call ``fn`` on padding-trimmed sub-batches and put its results back in the input order.

    The sub-batches are those of :func:`length_sorted_batches` (sorted by length, ``batch_size``
    rows and/or ``rows × padded length <= token_budget`` each, all-padding columns dropped), or,
    with ``sort_by_length=False``, runs of ``batch_size`` consecutive rows (for computations whose
    result depends on which rows run together, such as sampling, which draws from the random
    number generator row by row). ``fn(sub, rows)`` gets a sub-batch and the input rows it holds,
    and returns one result per row: a tensor ``[rows, ...]`` or a list. With ``per_position`` the
    tensor is ``[rows, sub_pos, ...]``, in the sub-batch's columns, and comes back as
    ``[batch, pos, ...]`` with ``fill`` at the columns a sub-batch dropped.

    Args:
        batch: The rows to run.
        fn: ``fn(sub_batch, rows) -> Tensor | list``, one result per row of ``sub_batch``.
        batch_size: Rows per call (``None``: no limit).
        token_budget: Limit on ``rows × padded length`` per call (length-sorted only).
        sort_by_length: Group rows by length (longest first); ``False``: in input order.
        per_position: ``fn`` returns per-position tensors ``[rows, sub_pos, ...]``.
        fill: The value at dropped (all-padding) columns of per-position results.
        show_progress: A progress bar over the calls.
        desc: Its label.

    Returns:
        ``fn``'s results for every row of ``batch``, in its order: a tensor on the batch's device
        (``[batch, ...]``, or ``[batch, pos, ...]`` per position), or a list.

    Raises:
        InputError: an empty batch, ``batch_size`` or ``token_budget`` not a positive integer
            (or ``None``), a ``token_budget`` without length sorting, or ``fn`` results of the
            wrong size or kind.
        InputTypeError: ``fn`` returned something other than a tensor or a list.

    Example:
        >>> batch = prepare_batch(pair.ft, ["the fox", "the fox eats berries", "the fox eats"])
        >>> run_batched(batch, lambda sub, rows: sub.n_tokens, batch_size=2).tolist()
        [3, 5, 4]
        >>> run_batched(batch, lambda sub, rows: [f"row {r}" for r in rows.tolist()], batch_size=2)
        ['row 0', 'row 1', 'row 2']
        >>> mask = run_batched(batch, lambda sub, rows: sub.attention_mask, batch_size=2, per_position=True)
        >>> torch.equal(mask, batch.attention_mask)
        True
    """
    if len(batch) == 0:
        raise InputError("run_batched got a batch with no rows; pass at least one.")
    if sort_by_length:
        chunks = list(length_sorted_batches(batch, batch_size, token_budget))
    else:
        chunks = list(_consecutive_batches(batch, batch_size, token_budget))
    results = _Scattered(batch, per_position, fill)
    for rows, cols, sub in tqdm(chunks, disable=not show_progress, desc=desc, unit="batch"):
        results.add(rows, cols, fn(sub, rows))
    return cast(R, results.value())  # a tensor if fn returned tensors, else a list: R either way


def _consecutive_batches(
    batch: TokenBatch, batch_size: int | None, token_budget: int | None
) -> Iterator[tuple[Int[Tensor, " rows"], Int[Tensor, " cols"], TokenBatch]]:
    """:func:`length_sorted_batches` without the sorting: runs of ``batch_size`` rows in input order."""
    if token_budget is not None:
        raise InputError(
            "token_budget groups rows by length, so it needs sort_by_length=True; pass batch_size "
            "to run the rows in input order."
        )
    batch_size = check_size(batch_size, "batch_size")
    step = batch_size if batch_size is not None else max(len(batch), 1)
    for start in range(0, len(batch), step):
        rows = torch.arange(start, min(start + step, len(batch)))
        sub, cols = batch.sub_batch(rows)
        yield rows, cols, sub


class _Scattered:
    """The results of :func:`run_batched`'s calls, each put at its rows (and columns) of the batch."""

    def __init__(self, batch: TokenBatch, per_position: bool, fill: float) -> None:
        self.n_rows, self.n_pos = batch.tokens.shape
        self.device = batch.tokens.device
        self.per_position, self.fill = per_position, fill
        self.tensor: Tensor | None = None
        self.items: list[Any] | None = None

    def add(self, rows: Int[Tensor, " rows"], cols: Int[Tensor, " cols"], result: object) -> None:
        if isinstance(result, Tensor) and self.items is None:
            self._add_tensor(rows, cols, result)
        elif isinstance(result, list) and self.tensor is None:
            self._add_list(rows, result)
        elif isinstance(result, (Tensor, list)):
            raise InputError(
                "run_batched: fn returned a tensor for one sub-batch and a list for another; return "
                "the same kind every time."
            )
        else:
            raise InputTypeError(
                f"run_batched: fn must return a tensor [rows, ...] or a list (one result per row), "
                f"got {type(result).__name__}."
            )

    def _add_tensor(self, rows: Tensor, cols: Tensor, result: Tensor) -> None:
        lead = (len(rows), len(cols)) if self.per_position else (len(rows),)
        tail = tuple(result.shape[len(lead) :])
        if tuple(result.shape[: len(lead)]) != lead or (self.tensor is not None and self.tensor.shape[len(lead) :] != tail):
            what = "[rows, sub_pos, ...] with the same trailing shape every time" if self.per_position else (
                "[rows, ...] with the same trailing shape every time (per_position=True for [rows, pos, ...])"
            )
            raise InputError(
                f"run_batched: fn returned shape {tuple(result.shape)} for a sub-batch of shape "
                f"{(len(rows), len(cols))}; it must be {what}."
            )
        if self.tensor is None:
            shape = ((self.n_rows, self.n_pos) if self.per_position else (self.n_rows,)) + tail
            self.tensor = torch.full(shape, self.fill, dtype=result.dtype, device=self.device)
        index = rows.to(self.device)
        if self.per_position:
            self.tensor[index[:, None], cols.to(self.device)[None, :]] = result.to(self.device)
        else:
            self.tensor[index] = result.to(self.device)

    def _add_list(self, rows: Tensor, result: list[Any]) -> None:
        if self.per_position:
            raise InputError("run_batched: per_position=True needs fn to return a tensor [rows, sub_pos, ...], not a list.")
        if len(result) != len(rows):
            raise InputError(f"run_batched: fn returned {len(result)} results for a sub-batch of {len(rows)} rows.")
        if self.items is None:
            self.items = [None] * self.n_rows
        for row, item in zip(rows.tolist(), result):
            self.items[row] = item

    def value(self) -> Tensor | list[Any]:
        return self.tensor if self.tensor is not None else (self.items or [])


def _input_device(model: Model) -> torch.device:
    return backend_of(model).input_device()


def _as_prompt_list(inputs: object) -> list[str]:
    if isinstance(inputs, str):
        prompts = [inputs]
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (bytes, bytearray)):
        prompts = list(inputs)
    else:
        raise InputTypeError(
            f"Expected a prompt (str), a list of prompts, or an integer token tensor; got "
            f"{type(inputs).__name__}."
        )
    if not prompts:
        raise InputError("No prompts given: the input list is empty.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputTypeError(
                f"Prompt {i} is a {type(p).__name__}, not a str. Pass strings, or one integer "
                f"tensor of tokens with an attention_mask."
            )
        if not p:
            raise InputError(f"Prompt {i} is an empty string; TuCo needs at least one token.")
    return prompts


def tokenizer_of(model: Model) -> PreTrainedTokenizerBase:
    """The model's tokenizer; an :class:`~tuco_lens.errors.InputError` if it has none.

    Example:
        >>> tokenizer_of(pair.ft) is pair.tokenizer
        True
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise InputError(
            "The fine-tuned model has no tokenizer, so strings cannot be tokenized. Pass token "
            "ids, or load the model with its tokenizer (model.set_tokenizer(...))."
        )
    return tokenizer


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """The text of one sequence of token ids (``tokenizer.decode``, typed: one sequence gives one string).

    Example:
        >>> decode(pair.tokenizer, pair.tokenize("the fox", prepend_bos=False).tokens[0].tolist())
        'the fox'
    """
    return cast(str, tokenizer.decode(list(ids)))


def encode_prompt(
    model: Model, prompt: str, chat_template: bool = False, prepend_bos: bool | None = None
) -> list[int]:
    """Token ids of one prompt, with the rules of :func:`prepare_batch` (no length check).

    Example:
        >>> ids = encode_prompt(pair.ft, "the fox")      # [bos, the, fox] for a BOS-prepending model
        >>> pair.tokenizer.convert_ids_to_tokens(ids)
        ['<bos>', 'the', 'fox']
    """
    tokenizer = tokenizer_of(model)
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "chat_template=True, but the fine-tuned tokenizer has no chat template. Use "
                "chat_template=False, or set tokenizer.chat_template."
            )
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = cast(BatchEncoding, ids)["input_ids"]
        ids = [int(i) for i in cast(list, ids)]
        if not _own_tokens(tokenizer, prompt):
            _refuse_tokenless(prompt, "the chat template around an empty user turn")
    else:
        bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        bos_text = tokenizer.bos_token
        if prepend_bos is None and isinstance(bos_text, str) and bos_text and prompt.startswith(bos_text):
            bos = False  # an already formatted prompt ("<s>[INST] ..."): no second BOS
        ids = model.to_tokens(prompt, prepend_bos=bos, truncate=False, move_to_device=False)[0]
        ids = ids.tolist()
        if len(ids) == 1 and not _own_tokens(tokenizer, prompt):
            _refuse_tokenless(prompt, "the BOS token alone")
    if not ids:
        raise InputError(f"Prompt {prompt!r} tokenizes to no tokens.")
    return ids


def chat_template_frame(tokenizer: Any) -> tuple[str, str] | None:
    """The text the chat template puts before and after a user message (with the generation
    prompt), or ``None`` if it cannot be rendered.

    Example:
        >>> chat_template_frame(pair.tokenizer)
        ('<bos> <user> ', ' <assistant>')
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    sentinel = "TUCOLENSCONTENTSENTINEL"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sentinel}], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # a template that refuses this message: no frame to compare with
        return None
    if not isinstance(text, str) or text.count(sentinel) != 1:
        return None
    head, tail = text.split(sentinel)
    return head, tail


def _warn_if_templated(tokenizer: Any, prompts: list[str]) -> None:
    """Warn when chat_template=True would wrap prompts that already carry the template's markers."""
    frame = chat_template_frame(tokenizer)
    if frame is None:
        return
    head, tail = (part.strip() for part in frame)
    wrapped = [
        i for i, p in enumerate(prompts)
        if (head and p.strip().startswith(head)) or (tail and p.strip().endswith(tail))
    ]
    if wrapped:
        warnings.warn(
            f"{len(wrapped)} of {len(prompts)} prompts already look chat-formatted (prompt "
            f"{wrapped[0]} starts with {head!r} or ends with {tail!r}), and chat_template=True wraps "
            "them in the template again. Pass chat_template=False for pre-formatted prompts.",
            ChatTemplateTwiceWarning,
            stacklevel=4,
        )


def doubled_bos_rows(tokens: Tensor, tokenizer: Any) -> list[int]:
    """Rows whose first two tokens after any left padding are both BOS.

    Only where a doubled BOS can be told from padding: the tokenizer has a BOS token that is
    not its pad token. Returns ``[]`` otherwise.

    Example:
        >>> doubled_bos_rows(pair.ft.to_tokens("<bos> hello"), pair.tokenizer)   # to_tokens adds one
        [0]
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if bos is None or bos == pad or tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.dtype.is_floating_point:
        return []
    start = (tokens == pad).to(torch.long).cumprod(-1).sum(-1) if pad is not None else torch.zeros_like(tokens[:, 0])
    start = start.clamp(max=tokens.shape[1] - 2)[:, None]
    first_two = tokens.gather(-1, torch.cat([start, start + 1], dim=-1))
    return (first_two == bos).all(-1).nonzero().flatten().tolist()


def warn_if_doubled_bos(tokens: Tensor, tokenizer: Any) -> None:
    """Give a :class:`~tuco_lens.errors.DoubledBOSWarning` if :func:`doubled_bos_rows` finds any."""
    rows = doubled_bos_rows(tokens, tokenizer)
    if rows:
        warnings.warn(
            f"Row(s) {rows[:5]} start with two BOS tokens ({tokenizer.bos_token!r}): the text "
            "already began with BOS and another was prepended (e.g. model.to_tokens or "
            "run_with_cache on a chat-formatted string). Tokenize with pair.tokenize(text), which "
            "adds none to such text, or pass prepend_bos=False.",
            DoubledBOSWarning,
            stacklevel=2,
        )


def _own_tokens(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's tokens without any special token the tokenizer would add."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _refuse_tokenless(prompt: str, scored: str) -> None:
    raise InputError(
        f"Prompt {prompt!r} has no token of its own (the tokenizer turns it into nothing: "
        f"whitespace only?), so {scored} would be scored. Remove it, or give it text."
    )


def _encode_checked(
    model: Model, prompt: str, chat_template: bool, prepend_bos: bool | None
) -> list[int]:
    ids = encode_prompt(model, prompt, chat_template, prepend_bos)
    if len(ids) > model.cfg.n_ctx:
        raise InputError(
            f"A prompt has {len(ids)} tokens, more than the model's context of {model.cfg.n_ctx}:"
            f" {prompt[:60]!r}... Shorten it; tuco_lens does not truncate silently."
        )
    return ids


def pad_id(model: Model) -> int:
    """The token that fills padded positions: the tokenizer's pad token, else its EOS, else 0.

    Padded positions are masked, so the choice never changes a number; the one rule keeps token
    tensors comparable across tuco_lens's functions (generation fills finished rows with the stop
    token instead, see :mod:`tuco_lens.generation`).

    Example:
        >>> pad_id(pair.ft) == pair.tokenizer.pad_token_id
        True
    """
    tok = model.tokenizer
    for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def _pad(
    model: Model, ids: list[list[int]], side: str, prompts: list[str]
) -> TokenBatch:
    width = max(len(row) for row in ids)
    tokens = torch.full((len(ids), width), pad_id(model), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        tokens[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return TokenBatch(tokens, mask, prompts)


def _batch_from_tensor(
    model: Model, tokens: Tensor, attention_mask: Tensor | None
) -> TokenBatch:
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InputTypeError(
            f"Tokens must be an integer tensor, got dtype {tokens.dtype}. Convert with "
            f"tokens.long() if these really are token ids."
        )
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        try:
            attention_mask = torch.as_tensor(attention_mask)
        except (TypeError, ValueError, RuntimeError):
            raise InputTypeError(
                f"attention_mask must be a tensor (or a list / numpy array of 0 and 1), got "
                f"{type(attention_mask).__name__}."
            ) from None
    if tokens.ndim == 1:
        tokens = tokens[None]
        if attention_mask is not None and attention_mask.ndim == 1:
            attention_mask = attention_mask[None]
    if tokens.ndim != 2:
        raise InputError(f"Tokens must have shape [batch, pos] or [pos], got {tuple(tokens.shape)}.")
    if tokens.numel() == 0:
        raise InputError(f"Token tensor is empty (shape {tuple(tokens.shape)}).")
    tokens = tokens.to(torch.long)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= model.cfg.d_vocab:
        bad = low if low < 0 else high
        raise InputError(
            f"Token id {bad} is outside the vocabulary [0, {model.cfg.d_vocab}) of the "
            f"fine-tuned model. Were these tokens made with another tokenizer?"
        )
    if tokens.shape[1] > model.cfg.n_ctx:
        raise InputError(
            f"Tokens have {tokens.shape[1]} positions, more than the model's context of "
            f"{model.cfg.n_ctx}."
        )
    if attention_mask is None:
        _refuse_unmasked_padding(model, tokens)
        attention_mask = torch.ones_like(tokens)
    else:
        attention_mask = _check_mask(attention_mask, tokens)
    return TokenBatch(tokens, attention_mask.to(tokens.device), None)


def _check_mask(mask: Tensor, tokens: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise InputTypeError(f"attention_mask must be a tensor, got {type(mask).__name__}.")
    if mask.shape != tokens.shape:
        raise InputError(
            f"attention_mask has shape {tuple(mask.shape)} but tokens have shape "
            f"{tuple(tokens.shape)}; they must match."
        )
    if mask.dtype.is_floating_point and not torch.all((mask == 0) | (mask == 1)):
        raise InputError("attention_mask must contain only 0 and 1.")
    mask = mask.to(torch.long)
    if not torch.all((mask == 0) | (mask == 1)):
        raise InputError("attention_mask must contain only 0 and 1.")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(
            f"Row(s) {empty} of attention_mask have no real token (all zeros); remove them."
        )
    return mask


def _refuse_unmasked_padding(model: Model, tokens: Tensor) -> None:
    """Refuse tokens that look padded, with the pad or the EOS id, when no mask came with them.

    A row looks padded if it starts or ends with a run of pad (or EOS) tokens longer than
    text can: one BOS at the start when BOS is that token, one EOS at the end; or if the
    rows of a batch start or end with runs of different lengths.
    """
    tok = model.tokenizer
    if tok is None:
        return
    bos, eos, pad = (getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "pad"))
    for name, token in (("pad", pad), ("EOS", eos)):
        if token is None or (name == "EOS" and token == pad):
            continue
        is_token = (tokens == token).to(torch.long)
        leading = is_token.cumprod(-1).sum(-1)
        trailing = is_token.flip(-1).cumprod(-1).sum(-1)
        too_long = (leading > int(token == bos)) | (trailing > int(token == eos))
        uneven = (leading != leading[0]) | (trailing != trailing[0])
        rows = (too_long | uneven).nonzero().flatten().tolist()
        if rows:
            row = rows[0]
            raise InputError(
                f"These tokens look padded (row {row} starts with {int(leading[row])} and ends with "
                f"{int(trailing[row])} {name} tokens, id {token}) but no attention_mask was given, "
                "so padding would be scored as text. Pass attention_mask= (1 = real token), let "
                "tuco_lens tokenize the strings, or pass attention_mask=torch.ones_like(tokens) if "
                "every token is real."
            )
