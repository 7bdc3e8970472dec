"""``TuCoPair``: a pre-trained model and its fine-tuned version, and the verbs on them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tuco_lens.backend import ActivationCache, backend_of, linear_layout, model_kind
from tuco_lens.compatibility import check_compatible
from tuco_lens.decomposition import Decomposition, DecompositionAccumulator, Norm, check_norm
from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.generation import generate_tokens, stop_tokens
from tuco_lens.hooks import (
    PairedBlocks,
    _spliced_resid_hooks,
    alpha_hooks,
    alpha_mixer,
    check_alpha,
    placed,
    supports_last_token_path,
)
from tuco_lens.inputs import Inputs, TokenBatch, length_sorted_batches, prepare_batch, to_left_padding
from tuco_lens.versions import check_versions

__all__ = ["TuCoPair"]

Model = Any  # a HookedTransformer or a TransformerBridge

_PER_POSITION = ("ptc_norm", "ftc_norm", "ptc_cum_norm", "ftc_cum_norm", "beta")


class TuCoPair:
    """A pre-trained model ``pt`` and its fine-tuned version ``ft``, ready for TuCo.

    Both are ordinary TransformerLens models (``pair.pt``, ``pair.ft``): two
    ``HookedTransformer`` objects or two ``TransformerBridge`` objects (transformer-lens 4.x);
    run them, hook them and cache them as usual. The pair checks at construction that they can
    be compared (same model class, architecture, vocabulary, weight processing, device and
    dtype).

    Args:
        pt: The pre-trained model.
        ft: The fine-tuned model (same architecture).
        offload_pt: Keep the pre-trained model where it is (e.g. on the CPU) and move each of
            its blocks to the fine-tuned twin's device only while it runs: a pair then needs
            about one model's accelerator memory plus one block, at the cost of a weight
            transfer per block and forward pass (see ``docs/performance.md``).

    Raises:
        IncompatiblePairError: naming every difference that prevents the comparison.
        UnsupportedVersionsError: the installed transformers / transformer-lens are known to
            give wrong results (:mod:`tuco_lens.versions`); versions outside the tested range
            give an ``UntestedVersionsWarning``.

    Example:
        >>> pair = TuCoPair(pt_model, ft_model)      # or tuco_lens.load_pair(...)
        >>> pair.tuco(["How do I bake bread?"], chat_template=True)
        tensor([0.2718])
    """

    def __init__(self, pt: Model, ft: Model, *, offload_pt: bool = False) -> None:
        for name, model in (("pt", pt), ("ft", ft)):
            if model_kind(model) is None:
                raise InputTypeError(
                    f"TuCoPair({name}=...) needs a HookedTransformer or TransformerBridge, got "
                    f"{type(model).__name__}. Use tuco_lens.load_pair(...) to load names, "
                    "directories, adapters or transformers models."
                )
        check_compatible(pt, ft, offload_pt=offload_pt)
        check_versions(model_kind(ft))
        self.pt = pt
        self.ft = ft
        self.offload_pt = offload_pt
        self.backend = backend_of(ft)

    def __repr__(self) -> str:
        return (
            f"TuCoPair(pt={self.pt.cfg.model_name!r}, ft={self.ft.cfg.model_name!r}, "
            f"n_layers={self.n_layers}, d_model={self.ft.cfg.d_model}, backend={self.backend.name!r})"
        )

    @property
    def n_layers(self) -> int:
        """Number of blocks (layers) of both models."""
        return self.ft.cfg.n_layers

    @property
    def tokenizer(self):
        """The fine-tuned model's tokenizer (used for all string inputs)."""
        return self.ft.tokenizer

    @property
    def resid_names(self) -> list[str]:
        """Hook names a fine-tuned ``ActivationCache`` needs for :meth:`decompose`.

        Example:
            >>> _, cache = pair.ft.run_with_cache(tokens, names_filter=pair.resid_names)
            >>> dec = pair.decompose(cache, tokens=tokens)
        """
        last = self.n_layers - 1
        return [f"blocks.{l}.hook_resid_pre" for l in range(self.n_layers)] + [
            f"blocks.{last}.hook_resid_post"
        ]

    # ------------------------------------------------------------------ inputs
    def tokenize(
        self,
        inputs: Inputs,
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        chat_template: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] = "left",
    ) -> TokenBatch:
        """Tokens and attention mask exactly as every other method of the pair sees them.

        Args:
            inputs: A prompt, a list of prompts, or token ids ``[batch, pos]``.
            attention_mask: Mask for padded token ids (1 = real token).
            chat_template: Wrap prompts in the fine-tuned tokenizer's chat template, with the
                generation prompt (the paper's setting for chat models).
            prepend_bos: For plain strings; ``None`` follows ``ft.cfg.default_prepend_bos`` (for
                models loaded by tuco_lens: a BOS exactly when the tokenizer adds one).
            padding_side: ``"left"`` (default; last real token at ``[:, -1]``) or ``"right"``.

        Example:
            >>> batch = pair.tokenize(["Hi", "The history of Rome"])
            >>> batch.tokens, batch.attention_mask, batch.last_index
        """
        return prepare_batch(
            self.ft,
            inputs,
            attention_mask=attention_mask,
            chat_template=chat_template,
            prepend_bos=prepend_bos,
            padding_side=padding_side,
        )

    # ------------------------------------------------------------------ measuring
    def decompose(
        self,
        inputs: Inputs | ActivationCache,
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        chat_template: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] = "left",
        batch_size: int | None = None,
        token_budget: int | None = None,
        show_progress: bool = False,
        norm: Norm = "l1",
        accumulate_dtype: torch.dtype = torch.float32,
    ) -> Decomposition:
        """Split every layer of the fine-tuned forward pass into PTC and FTC, per token.

        One fine-tuned forward pass runs; at each block the pre-trained block is applied to the
        fine-tuned residual stream, and the components are reduced to norms and running sums on
        the spot (no activation cache). Padded batches give the same numbers as prompts run one
        by one.

        Args:
            inputs: Prompts, token ids, or an ``ActivationCache`` of the fine-tuned model that
                holds :attr:`resid_names` (then pass ``tokens=`` too; the fine-tuned model is not
                run again).
            attention_mask: For padded token ids (or the cache's tokens): 1 = real token.
            tokens: With a cache: the tokens it was computed on.
            chat_template: Wrap prompts in the fine-tuned chat template with generation prompt.
            prepend_bos: For plain strings; ``None`` follows the model's default.
            padding_side: Padding used when tokenizing strings (results do not depend on it).
            batch_size: Rows per forward pass (prompts are sorted by length, results come back
                in input order). ``None``: one pass.
            token_budget: Alternative cap on ``rows × padded length`` per forward pass.
            show_progress: Show a progress bar over batches.
            norm: ``"l1"`` (the paper's) or ``"l2"``.
            accumulate_dtype: ``torch.float32`` (default) or ``torch.float64`` for the sums.

        Returns:
            A :class:`~tuco_lens.Decomposition` with TuCo, per-token TuCo, per-layer norms,
            cumulative ratios and the summed components at the last real token.

        Example:
            >>> dec = pair.decompose(["How do I bake bread?"], chat_template=True)
            >>> dec.tuco, dec.at_last_token(dec.beta)   # [batch], [batch, layer]
        """
        norm = check_norm(norm)
        _check_dtype(accumulate_dtype)
        if isinstance(inputs, ActivationCache):
            return self._decompose_cache(inputs, tokens, attention_mask, norm, accumulate_dtype)
        if tokens is not None:
            raise InputError("tokens= is only used with an ActivationCache; pass the tokens as inputs.")
        batch = self.tokenize(
            inputs,
            attention_mask=attention_mask,
            chat_template=chat_template,
            prepend_bos=prepend_bos,
            padding_side=padding_side,
        )
        b, p = batch.tokens.shape
        device = batch.tokens.device
        nan = float("nan")
        out = {
            "tuco": torch.empty(b, dtype=accumulate_dtype, device=device),
            "ptc_sum": torch.empty(b, self.ft.cfg.d_model, dtype=accumulate_dtype, device=device),
            "ftc_sum": torch.empty(b, self.ft.cfg.d_model, dtype=accumulate_dtype, device=device),
        }
        for name in _PER_POSITION:
            out[name] = torch.full((b, self.n_layers, p), nan, dtype=accumulate_dtype, device=device)
        for rows, cols, acc in self._accumulate(
            batch, "all", batch_size, token_budget, show_progress, norm, accumulate_dtype
        ):
            rows, cols = rows.to(device), cols.to(device)
            out["tuco"][rows] = acc.tuco()
            out["ptc_sum"][rows], out["ftc_sum"][rows] = acc.last_token_sums()
            layers = torch.arange(self.n_layers, device=device)
            index = (rows[:, None, None], layers[None, :, None], cols[None, None, :])
            for name, table in acc.per_position_tables().items():
                out[name].index_put_(index, table)
        return self._result(batch, out, norm)

    def tuco(
        self,
        inputs: Inputs,
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        chat_template: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] = "left",
        batch_size: int | None = None,
        token_budget: int | None = None,
        show_progress: bool = False,
        norm: Norm = "l1",
        accumulate_dtype: torch.dtype = torch.float32,
    ) -> Float[Tensor, "batch"]:
        """The paper's TuCo of each prompt (at its last real token), and nothing else.

        Cheaper than :meth:`decompose`: only the sums at the last token are accumulated, and for
        standard architectures the pre-trained blocks compute their query, output projection
        and MLP at the last token only (keys and values at every position), which equals the
        full computation (tested). Arguments as in :meth:`decompose`.

        Example:
            >>> pair.tuco(["How do I bake bread?", "The history of Rome"], chat_template=True)
            tensor([0.3120, 0.2871])
        """
        norm = check_norm(norm)
        _check_dtype(accumulate_dtype)
        batch = self.tokenize(
            inputs,
            attention_mask=attention_mask,
            chat_template=chat_template,
            prepend_bos=prepend_bos,
            padding_side=padding_side,
        )
        scores = torch.empty(len(batch), dtype=accumulate_dtype, device=batch.tokens.device)
        for rows, _, acc in self._accumulate(
            batch, "last", batch_size, token_budget, show_progress, norm, accumulate_dtype
        ):
            scores[rows.to(scores.device)] = acc.tuco()
        return scores

    def _accumulate(self, batch, positions, batch_size, token_budget, show_progress, norm, dtype):
        """Run the fine-tuned model on length-sorted sub-batches, decomposing each."""
        chunks = list(length_sorted_batches(batch, batch_size, token_budget))
        last_only = positions == "last" and supports_last_token_path(self.pt)
        for rows, cols, sub in tqdm(chunks, disable=not show_progress, desc="TuCo", unit="batch"):
            if positions == "last":
                sub = to_left_padding(sub)  # the scored token at -1 in every row
            acc = DecompositionAccumulator(self.n_layers, sub.attention_mask, norm, positions, dtype)
            paired = PairedBlocks(
                self.pt, self.ft, acc.add, writes=False, pt_last_only=last_only, offload_pt=self.offload_pt
            )
            with torch.no_grad(), paired:
                self.backend.forward(sub.tokens, sub.attention_mask, logits=False)
            yield rows, cols, acc

    @torch.no_grad()
    def _decompose_cache(self, cache, tokens, attention_mask, norm, dtype) -> Decomposition:
        if tokens is None:
            raise InputError(
                "decompose(cache) needs tokens=: the token ids the cache was computed on."
            )
        spliced = _spliced_resid_hooks(self.ft)
        if spliced:
            raise InputError(
                f"decompose(cache) cannot separate the edit of the SAE at {spliced[0]} from the "
                "blocks' components in a cache; pass the tokens instead: pair.decompose(tokens) "
                "(see docs/sae-lens.md)."
            )
        missing = [name for name in self.resid_names if name not in cache.cache_dict]
        if missing:
            raise InputError(
                f"The ActivationCache lacks {missing[:3]}{'...' if len(missing) > 3 else ''}. Run "
                "pair.ft.run_with_cache(tokens, names_filter=pair.resid_names) to cache them."
            )
        batch = self.tokenize(tokens, attention_mask=attention_mask)
        streams = [cache[name] for name in self.resid_names]
        streams = [s[None] if s.ndim == 2 else s for s in streams]
        if tuple(streams[0].shape[:2]) != tuple(batch.tokens.shape):
            raise InputError(
                f"The cache holds activations of shape {tuple(streams[0].shape[:2])} (batch, pos) "
                f"but tokens have shape {tuple(batch.tokens.shape)}; pass the cache's own tokens."
            )
        mask = batch.attention_mask
        acc = DecompositionAccumulator(self.n_layers, mask, norm, "all", dtype)
        pt_backend = backend_of(self.pt)
        calls = self.backend.block_calls(batch.tokens, mask)
        for layer in range(self.n_layers):
            x = streams[layer]
            call = calls[layer]
            with placed(pt_backend.blocks[layer], x.device, self.offload_pt) as (block, device):
                pt_post = self.backend.call_pt_block(block, layer, call, x.to(device), 0)
            acc.add(layer, x, pt_post, streams[layer + 1])
        out = {"tuco": acc.tuco()}
        out["ptc_sum"], out["ftc_sum"] = acc.last_token_sums()
        out.update(acc.per_position_tables())
        return self._result(batch, out, norm)

    def _result(self, batch: TokenBatch, out: dict[str, Tensor], norm: Norm) -> Decomposition:
        return Decomposition(
            tuco=out["tuco"],
            tuco_per_token=out["beta"][:, -1, :],
            ptc_norm=out["ptc_norm"],
            ftc_norm=out["ftc_norm"],
            ptc_cum_norm=out["ptc_cum_norm"],
            ftc_cum_norm=out["ftc_cum_norm"],
            beta=out["beta"],
            ptc_sum=out["ptc_sum"],
            ftc_sum=out["ftc_sum"],
            tokens=batch.tokens,
            attention_mask=batch.attention_mask,
            str_tokens=self._str_tokens(batch),
            prompts=batch.prompts,
            norm=norm,
        )

    def _str_tokens(self, batch: TokenBatch) -> list[list[str]]:
        flat = batch.tokens.reshape(-1, 1).tolist()
        if self.tokenizer is None:
            strings = [str(t[0]) for t in flat]
        else:
            strings = self.tokenizer.batch_decode(flat, clean_up_tokenization_spaces=False)
        width = batch.tokens.shape[1]
        real = batch.attention_mask.reshape(-1).tolist()
        strings = [s if r else "" for s, r in zip(strings, real)]
        return [strings[i : i + width] for i in range(0, len(strings), width)]

    # ------------------------------------------------------------------ steering
    def scaled(self, alpha: float | Sequence[float]) -> PairedBlocks:
        """Context manager: every forward / generate of ``pair.ft`` inside is α-scaled.

        At every block, ``x_{l+1} = x_l + PTC(x_l) + α·FTC(x_l)``, both components recomputed on
        the scaled stream (Definition 5.1). α = 1 is the fine-tuned model exactly; α = 0 runs the
        pre-trained blocks with the fine-tuned embedding and unembedding; negative α reverses
        the fine-tuning component. α may also be a list with one value per layer.

        Works with ``pair.ft(...)``, ``run_with_cache``, ``run_with_hooks`` and ``generate``
        (the pre-trained blocks keep their own KV cache). Hooks on ``hook_resid_post`` that you
        registered before entering are part of the fine-tuned block; hooks added inside (e.g.
        through ``run_with_hooks`` or ``run_with_cache``) see the scaled stream. Hooks are
        removed on exit, even after an error.

        Example:
            >>> with pair.scaled(0.5):
            ...     logits, cache = pair.ft.run_with_cache(tokens)
        """
        mixer = alpha_mixer(check_alpha(alpha, self.n_layers))
        return PairedBlocks(self.pt, self.ft, mixer, writes=True, offload_pt=self.offload_pt)

    def alpha_hooks(self, alpha: float | Sequence[float], attention_mask: Tensor | None = None):
        """α-scaling as TransformerLens ``(name, hook_fn)`` pairs for ``run_with_hooks``.

        Use :meth:`scaled` for generation with a KV cache; these hooks cannot see it. Pass the
        ``attention_mask`` of a padded batch.

        Example:
            >>> logits = pair.ft.run_with_hooks(tokens, fwd_hooks=pair.alpha_hooks(0.5))
        """
        return alpha_hooks(self.pt, self.ft, alpha, attention_mask, offload_pt=self.offload_pt)

    def run_with_alpha(
        self,
        inputs: Inputs,
        alpha: float | Sequence[float],
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        chat_template: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] = "left",
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of the α-scaled fine-tuned model.

        Strings are left-padded by default, so ``logits[:, -1]`` is every prompt's next-token
        prediction; logits at padding positions are meaningless (see :meth:`tokenize` for the
        mask).

        Example:
            >>> logits = pair.run_with_alpha("The capital of France is", alpha=1.25)
            >>> logits.shape      # [batch, pos, d_vocab]
        """
        batch = self.tokenize(
            inputs,
            attention_mask=attention_mask,
            chat_template=chat_template,
            prepend_bos=prepend_bos,
            padding_side=padding_side,
        )
        with self.scaled(alpha):
            return self.backend.forward(batch.tokens, batch.attention_mask)

    def generate(
        self,
        inputs: Inputs,
        *,
        alpha: float | Sequence[float] = 1.0,
        max_new_tokens: int = 20,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        chat_template: bool = False,
        prepend_bos: bool | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_at_eos: bool = True,
        eos_token_id: int | list[int] | None = None,
        use_past_kv_cache: bool = True,
        return_type: Literal["str", "tokens"] = "str",
        show_progress: bool = False,
    ) -> str | list[str] | Int[Tensor, "batch pos_plus_new"]:
        """Generate from the α-scaled fine-tuned model, exactly, with the KV cache.

        Greedy by default (``do_sample=False``); set ``do_sample=True`` with ``temperature``,
        ``top_k``, ``top_p`` to sample (seed with ``torch.manual_seed``). Batches are
        left-padded with an explicit mask.

        Returns:
            With ``return_type="str"``: the generated continuation (prompt excluded, stopped at
            end-of-sequence), one string per prompt, or a single string for a single-prompt
            input. With ``"tokens"``: prompt and new tokens, ``[batch, pos + new]``.

        Example:
            >>> pair.generate("Tell me a story", alpha=0.75, max_new_tokens=40)
        """
        if return_type not in ("str", "tokens"):
            raise InputError(f"return_type must be 'str' or 'tokens', got {return_type!r}.")
        batch = self.tokenize(
            inputs,
            attention_mask=attention_mask,
            chat_template=chat_template,
            prepend_bos=prepend_bos,
        )
        with self.scaled(alpha), linear_layout(self.pt, self.ft):  # no per-step weight copies
            out = generate_tokens(
                self.ft,
                batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                stop_at_eos=stop_at_eos,
                eos_token_id=eos_token_id,
                use_past_kv_cache=use_past_kv_cache,
                show_progress=show_progress,
            )
        if return_type == "tokens":
            return out
        texts = self._decode_new(out[:, batch.tokens.shape[1] :], stop_at_eos, eos_token_id)
        single = isinstance(inputs, str) or (isinstance(inputs, Tensor) and inputs.ndim == 1)
        return texts[0] if single else texts

    def _decode_new(self, new: Tensor, stop_at_eos: bool, eos_token_id) -> list[str]:
        if self.tokenizer is None:
            raise InputError("return_type='str' needs a tokenizer; use return_type='tokens'.")
        stops = set(stop_tokens(self.ft, stop_at_eos, eos_token_id))
        texts = []
        for row in new.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self.tokenizer.decode(row[:cut]))
        return texts


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"accumulate_dtype must be torch.float32 or torch.float64, got {dtype}.")

