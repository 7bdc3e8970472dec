"""``TuCoPair``: a pre-trained model and its fine-tuned version, and the verbs on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Unpack, overload

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tuco_lens.attribution import FrozenNorm, LogitAttribution, OutputComparison, kl_per_token
from tuco_lens.backends import ActivationCache, Model, backend_of, linear_layout, native_modules
from tuco_lens.compatibility import check_compatible
from tuco_lens.components import ComponentAccumulator, mixer_for
from tuco_lens.decomposition import COMPONENTS, Decomposition, DecompositionAccumulator, DecompositionTables, Norm
from tuco_lens.errors import InputError, TuCoError
from tuco_lens.generation import generate_tokens, seeded_rng, stop_tokens
from tuco_lens.hooks import (
    PairedBlocks,
    _spliced_resid_hooks,
    alpha_hooks,
    placed,
    supports_last_token_path,
)
from tuco_lens.inputs import (
    TOKENIZE_OPTIONS,
    Inputs,
    TokenBatch,
    TokenizeOptions,
    decode,
    length_sorted_batches,
    prepare_batch,
    run_batched,
    to_left_padding,
)
from tuco_lens.validation import check_accumulate_dtype, check_int, check_norm, check_options
from tuco_lens.versions import check_versions

__all__ = ["GenerationOptions", "TuCoPair"]

Alpha = float | Sequence[float] | Mapping[str, Any]
"""α: one number, one per layer, or per component ``{"attn": ..., "mlp": ..., "heads": ...}``."""



class GenerationOptions(TokenizeOptions, total=False):
    """The keyword options of :meth:`TuCoPair.generate` besides ``return_type`` (for its overloads):
    the tokenization options and these."""

    alpha: Alpha
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    stop_at_eos: bool
    eos_token_id: int | list[int] | None
    use_past_kv_cache: bool
    show_progress: bool


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
        >>> pair
        TuCoPair(pt='pt', ft='ft', n_layers=4, d_model=128, backend=...)
        >>> [round(t, 3) for t in pair.tuco(["hello , describe the doomsalt ."], chat_template=True).tolist()]
        [0.559]
    """

    def __init__(self, pt: Model, ft: Model, *, offload_pt: bool = False) -> None:
        for name, model in (("pt", pt), ("ft", ft)):
            backend_of(model, role=f"TuCoPair({name}=...)")
        check_compatible(pt, ft, offload_pt=offload_pt)
        check_versions(backend_of(ft).name)
        self.pt = pt
        self.ft = ft
        self.offload_pt = offload_pt
        self.backend = backend_of(ft)
        self._vocab: list[str] | None = None

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

        ``hook_embed`` (to check that ``tokens=`` are the cache's own), then the residual stream
        entering every block and leaving the last one.

        Example:
            >>> pair.resid_names[:2]
            ['hook_embed', 'blocks.0.hook_resid_pre']
            >>> _, cache = pair.ft.run_with_cache(tokens, names_filter=pair.resid_names)
            >>> dec = pair.decompose(cache, tokens=tokens)
            >>> torch.allclose(dec.tuco, pair.tuco(tokens), atol=1e-5)
            True
        """
        last = self.n_layers - 1
        return ["hook_embed"] + [f"blocks.{l}.hook_resid_pre" for l in range(self.n_layers)] + [
            f"blocks.{last}.hook_resid_post"
        ]

    # ------------------------------------------------------------------ inputs
    def tokenize(
        self,
        inputs: Inputs,
        **options: Unpack[TokenizeOptions],
    ) -> TokenBatch:
        """Tokens and attention mask exactly as every other method of the pair sees them.

        Args:
            inputs: A prompt, a list of prompts, or token ids ``[batch, pos]``.
            **options: The tokenization options every verb of the pair takes
                (:class:`~tuco_lens.inputs.TokenizeOptions`): ``attention_mask`` (for padded token
                ids, 1 = real token), ``chat_template`` (wrap prompts in the fine-tuned tokenizer's
                chat template with the generation prompt, the paper's setting for chat models),
                ``prepend_bos`` (for plain strings; ``None`` follows ``ft.cfg.default_prepend_bos``:
                for models loaded by tuco_lens, a BOS exactly when the tokenizer adds one) and
                ``padding_side`` (``"left"``, the default, puts the last real token at ``[:, -1]``).

        Example:
            >>> batch = pair.tokenize(["the fox", "the fox eats berries"])
            >>> tuple(batch.tokens.shape), batch.attention_mask.tolist(), batch.last_index.tolist()
            ((2, 5), [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], [4, 4])
        """
        return self._batch(inputs, "tokenize", options)

    def _batch(self, inputs: Inputs, verb: str, tokenize: Mapping[str, Any]) -> TokenBatch:
        """The :class:`TokenBatch` of a verb's ``inputs`` and tokenization options (checked by name)."""
        check_options(tokenize, TOKENIZE_OPTIONS, f"TuCoPair.{verb}", "tokenization option")
        return prepare_batch(self.ft, inputs, **tokenize)

    # ------------------------------------------------------------------ measuring
    def decompose(
        self,
        inputs: Inputs | ActivationCache,
        *,
        tokens: Int[Tensor, "batch pos"] | None = None,
        batch_size: int | None = None,
        token_budget: int | None = None,
        show_progress: bool = False,
        norm: Norm = "l1",
        accumulate_dtype: torch.dtype = torch.float32,
        components: bool = False,
        heads: bool = True,
        **tokenize: Unpack[TokenizeOptions],
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
            tokens: With a cache: the tokens it was computed on.
            batch_size: Rows per forward pass (prompts are sorted by length, results come back
                in input order). ``None``: one pass.
            token_budget: Alternative cap on ``rows × padded length`` per forward pass.
            show_progress: Show a progress bar over batches.
            norm: ``"l1"`` (the paper's) or ``"l2"``.
            accumulate_dtype: ``torch.float32`` (default) or ``torch.float64`` for the sums.
            components: Also split each FTC_l exactly into attention, MLP and the pre-trained
                MLP's answer to the changed attention (:mod:`tuco_lens.components`,
                ``docs/components.md``): one extra pre-trained MLP call per layer.
            heads: With ``components``, also split the attention term per head at the last real
                token (refused for blocks with a norm after the attention output; pass
                ``heads=False`` there).
            **tokenize: How ``inputs`` become tokens, as in :meth:`tokenize` (``attention_mask``
                also marks the real tokens of a cache's ``tokens``; the results do not depend on
                ``padding_side``).

        Returns:
            A :class:`~tuco_lens.Decomposition` with TuCo, per-token TuCo, per-layer norms,
            cumulative ratios and the summed components at the last real token (and, with
            ``components``, the ``ftc_attn_*``, ``ftc_mlp_*``, ``ftc_mlp_via_attn_*`` and
            ``ftc_head*`` fields).

        Example:
            >>> dec = pair.decompose(["hello , describe the doomsalt ."], chat_template=True)
            >>> [round(t, 3) for t in dec.tuco.tolist()]                   # [batch]
            [0.559]
            >>> tuple(dec.at_last_token(dec.beta).shape)                   # [batch, layer]
            (1, 4)
        """
        norm = check_norm(norm)
        check_accumulate_dtype(accumulate_dtype)
        if isinstance(inputs, ActivationCache):
            if components:
                raise InputError(
                    "decompose(cache, components=True) is not available: a residual-stream cache "
                    "lacks the sub-blocks' outputs. Pass the tokens: pair.decompose(tokens, components=True)."
                )
            check_options(tokenize, ("attention_mask",), "TuCoPair.decompose(cache)", "option with a cache")
            return self._decompose_cache(inputs, tokens, tokenize.get("attention_mask"), norm, accumulate_dtype)
        if tokens is not None:
            raise InputError("tokens= is only used with an ActivationCache; pass the tokens as inputs.")
        batch = self._batch(inputs, "decompose", tokenize)
        tables = DecompositionTables(
            len(batch), self.n_layers, batch.tokens.shape[1], self.ft.cfg.d_model, dtype=accumulate_dtype,
            device=batch.tokens.device, components=components,
        )
        parts = None if not components else "heads" if heads else "blocks"
        for rows, cols, acc in self._accumulate(
            batch, "all", batch_size, token_budget, show_progress, norm, accumulate_dtype, parts
        ):
            tables.fill(rows, cols, acc, acc.component_results() if isinstance(acc, ComponentAccumulator) else None)
        return self._result(batch, tables, norm)

    def tuco(
        self,
        inputs: Inputs,
        *,
        batch_size: int | None = None,
        token_budget: int | None = None,
        show_progress: bool = False,
        norm: Norm = "l1",
        accumulate_dtype: torch.dtype = torch.float32,
        **tokenize: Unpack[TokenizeOptions],
    ) -> Float[Tensor, " batch"]:
        """The paper's TuCo of each prompt (at its last real token), and nothing else.

        Cheaper than :meth:`decompose`: only the sums at the last token are accumulated, and for
        standard architectures the pre-trained blocks compute their query, output projection
        and MLP at the last token only (keys and values at every position), which equals the
        full computation (tested; both backends). On a TransformerBridge every verb also runs
        Hugging Face's own attention (SDPA) and norms unless a hook needs the attention pattern
        (:func:`tuco_lens.backends.native_modules`). Arguments as in :meth:`decompose`.

        Example:
            >>> scores = pair.tuco(["hello , describe the doomsalt .", "where is norvik ?"], chat_template=True)
            >>> [round(t, 3) for t in scores.tolist()]
            [0.559, 0.334]
        """
        norm = check_norm(norm)
        check_accumulate_dtype(accumulate_dtype)
        batch = self._batch(inputs, "tuco", tokenize)
        scores = torch.empty(len(batch), dtype=accumulate_dtype, device=batch.tokens.device)
        for rows, _, acc in self._accumulate(
            batch, "last", batch_size, token_budget, show_progress, norm, accumulate_dtype
        ):
            scores[rows.to(scores.device)] = acc.tuco()
        return scores

    def _accumulate(self, batch, positions, batch_size, token_budget, show_progress, norm, dtype, parts=None):
        """Run the fine-tuned model on length-sorted sub-batches, decomposing each."""
        chunks = list(length_sorted_batches(batch, batch_size, token_budget))
        last_only = positions == "last" and supports_last_token_path(self.pt)
        for rows, cols, sub in tqdm(chunks, disable=not show_progress, desc="TuCo", unit="batch"):
            if positions == "last":
                sub = to_left_padding(sub)  # the scored token at -1 in every row
            options: dict[str, Any] = dict(n_layers=self.n_layers, attention_mask=sub.attention_mask, norm=norm,
                                           positions=positions, dtype=dtype)
            if parts is None:
                acc = DecompositionAccumulator(**options)
            else:
                acc = ComponentAccumulator(backend_of(self.pt), self.backend, heads=parts == "heads", **options)
            paired = PairedBlocks(
                self.pt, self.ft, acc.add, writes=False, pt_last_only=last_only, offload_pt=self.offload_pt,
                parts=parts,
            )
            with torch.no_grad(), native_modules(self.pt, self.ft), paired:
                self.backend.forward(sub.tokens, sub.attention_mask, logits=False)
            yield rows, cols, acc

    # ------------------------------------------------------------------ output tokens
    @torch.no_grad()
    def logit_attribution(
        self,
        inputs: Inputs,
        *,
        components: bool = False,
        heads: bool = True,
        batch_size: int | None = None,
        token_budget: int | None = None,
        show_progress: bool = False,
        **tokenize: Unpack[TokenizeOptions],
    ) -> LogitAttribution:
        """Direct effects on the fine-tuned logits at the last real token (:mod:`tuco_lens.attribution`).

        The final stream ``x_L = x_0 + Σ PTC + Σ FTC`` is split into its parts; each goes through
        the fine-tuned final norm with its scale frozen at the value on ``x_L`` and through the
        unembedding. ``embedding + ptc + ftc + bias`` equals the fine-tuned logits (checked:
        a mismatch above 1e-4 of the logits' scale raises). With ``components`` the FTC part is
        split into attention, MLP and MLP←attention and, with ``heads``, attention into heads.
        Runs like :meth:`tuco` (pre-trained blocks at the last position where the backend can).

        Returns:
            A :class:`~tuco_lens.attribution.LogitAttribution`; ``.top_tokens(k)`` lists the
            tokens each part promotes and suppresses most.

        Example:
            >>> attr = pair.logit_attribution(["hello , describe the doomsalt ."], chat_template=True, components=True)
            >>> attr.top_tokens(2, parts=["ftc", "ftc_mlp"])[["part", "direction", "token", "logit_effect"]].round(1)
                  part   direction       token  logit_effect
            0      ftc    promoted           i          10.8
            1      ftc    promoted         you           6.2
            2      ftc  suppressed   toadstool          -6.3
            3      ftc  suppressed      hserfo          -5.7
            4  ftc_mlp    promoted           i           7.1
            5  ftc_mlp    promoted         you           5.7
            6  ftc_mlp  suppressed  swampslime          -4.0
            7  ftc_mlp  suppressed   toadstool          -4.0
        """
        batch = self._batch(inputs, "logit_attribution", tokenize)
        parts = None if not components else "heads" if heads else "blocks"
        vectors: dict[str, Tensor] = {}
        for rows, _, acc in self._accumulate(
            batch, "last", batch_size, token_budget, show_progress, "l1", torch.float32, parts
        ):
            found: dict[str, Tensor] = dict(zip(("embedding", "final"), acc.last_token_streams()))
            found["ptc"], found["ftc"] = acc.last_token_sums()
            if parts is not None:
                assert isinstance(acc, ComponentAccumulator)  # _accumulate builds one when parts are asked for
                found.update(acc.component_results())
            for name, value in found.items():
                if name not in vectors:
                    vectors[name] = value.new_empty((len(batch), *value.shape[1:]))
                vectors[name][rows.to(value.device)] = value
        return self._attribute(batch, vectors)

    def _attribute(self, batch: TokenBatch, vectors: dict[str, Tensor]) -> LogitAttribution:
        norm = FrozenNorm.of(self.backend.final_norm(), self.ft.cfg.d_model)
        w_u, b_u = self.backend.unembedding()
        final = vectors.pop("final")
        device = w_u.device
        scale = norm.scale(final).to(device)
        direct = {}
        names = ["embedding", "ptc", "ftc"] + [f"ftc_{c}_sum" for c in COMPONENTS if f"ftc_{c}_sum" in vectors]
        for name in names:
            direct[name.removesuffix("_sum")] = norm.apply(vectors[name].to(device), scale) @ w_u.float()
        bias = norm.bias.to(device) @ w_u.float() + (0.0 if b_u is None else b_u.float())
        direct["bias"] = bias.expand(len(batch), -1)
        module = self.backend.final_norm()
        logits = module(final.to(device, w_u.dtype)).float() @ w_u.float() + (0.0 if b_u is None else b_u.float())
        head_normed = None
        if "ftc_head" in vectors:
            head_normed = norm.apply(vectors["ftc_head"].to(device), scale)
            direct["ftc_head_bias"] = norm.apply(vectors["ftc_head_bias"].sum(1).to(device), scale) @ w_u.float()
        attribution = LogitAttribution(
            direct=direct, logits=logits, head_normed=head_normed, unembed=w_u,
            token_strings=self._vocab_strings(), prompts=batch.prompts,
        )
        error = float((attribution.total() - logits).abs().max())
        if error > 1e-4 * max(1.0, float(logits.abs().max())):
            raise TuCoError(
                f"The parts' direct effects miss the fine-tuned logits by {error:.2e}: the final norm "
                f"{type(module).__name__} is not a LayerNorm or RMSNorm that logit attribution can "
                "freeze (see tuco_lens.attribution)."
            )
        return attribution

    @torch.no_grad()
    def compare_outputs(
        self,
        inputs: Inputs,
        **tokenize: Unpack[TokenizeOptions],
    ) -> OutputComparison:
        """Per-token KL(FT ‖ PT) and KL(FT ‖ α=0), and the next tokens fine-tuning changed most.

        PT is the pre-trained model's own forward pass on the same tokens; α=0 is
        ``pair.run_with_alpha(inputs, 0.0)`` (the pre-trained blocks with the fine-tuned embedding
        and unembedding). These output-level views sit beside TuCo, which measures the residual
        stream. KL is NaN at padding.

        Example:
            >>> out = pair.compare_outputs(["hello , describe the doomsalt ."], chat_template=True)
            >>> out.top_tokens(3)[["direction", "token", "logprob_change"]].round(1)
              direction    token  logprob_change
            0    raised        i            15.2
            1    raised   gentle            11.7
            2    raised  castles             9.8
            3   lowered      the            -7.7
            4   lowered    emoho            -3.3
            5   lowered    htiwo            -3.1
        """
        batch = self._batch(inputs, "compare_outputs", tokenize)
        tokens, mask = batch.tokens, batch.attention_mask
        pt_backend = backend_of(self.pt)
        device = pt_backend.input_device()
        with native_modules(self.pt, self.ft):
            ft_logits = self.backend.forward(tokens, mask)
            pt_logits = pt_backend.forward(tokens.to(device), mask.to(device)).to(ft_logits.device)
            with self.scaled(0.0):
                alpha0 = self.backend.forward(tokens, mask)
        pad = ~mask.bool().to(ft_logits.device)
        kl_pt = kl_per_token(ft_logits, pt_logits).masked_fill(pad, float("nan"))
        kl_0 = kl_per_token(ft_logits, alpha0).masked_fill(pad, float("nan"))
        rows = torch.arange(len(batch), device=ft_logits.device)
        last = batch.last_index.to(ft_logits.device)
        change = torch.log_softmax(ft_logits[rows, last].float(), -1) - torch.log_softmax(pt_logits[rows, last].float(), -1)
        return OutputComparison(
            kl_ft_pt=kl_pt, kl_ft_alpha0=kl_0, logprob_change=change, tokens=tokens, attention_mask=mask,
            str_tokens=self._str_tokens(batch), token_strings=self._vocab_strings(), prompts=batch.prompts,
        )

    def _vocab_strings(self) -> list[str] | None:
        """Every token id as a string (cached on the pair), or None without a tokenizer."""
        if self.tokenizer is None:
            return None
        if self._vocab is None:
            n = self.ft.cfg.d_vocab_out if getattr(self.ft.cfg, "d_vocab_out", -1) > 0 else self.ft.cfg.d_vocab
            known = min(n, len(self.tokenizer))
            strings = self.tokenizer.batch_decode([[i] for i in range(known)], clean_up_tokenization_spaces=False)
            self._vocab = strings + [f"<{i}>" for i in range(known, n)]
        return self._vocab

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
        embedded, *streams = [cache[name] for name in self.resid_names]
        embedded, *streams = [s[None] if s.ndim == 2 else s for s in (embedded, *streams)]
        if tuple(streams[0].shape[:2]) != tuple(batch.tokens.shape):
            raise InputError(
                f"The cache holds activations of shape {tuple(streams[0].shape[:2])} (batch, pos) "
                f"but tokens have shape {tuple(batch.tokens.shape)}; pass the cache's own tokens."
            )
        self._check_cache_tokens(embedded, batch)
        mask = batch.attention_mask
        acc = DecompositionAccumulator(self.n_layers, mask, norm, "all", dtype)
        pt_backend = backend_of(self.pt)
        calls = self.backend.block_calls(batch.tokens, mask)
        with native_modules(self.pt):
            for layer in range(self.n_layers):
                x = streams[layer]
                call = calls[layer]
                with placed(pt_backend.blocks[layer], x.device, self.offload_pt) as (block, device):
                    pt_post = self.backend.call_pt_block(block, layer, call, x.to(device), 0)
                acc.add(layer, x, pt_post, streams[layer + 1])
        tables = DecompositionTables(
            len(batch), self.n_layers, batch.tokens.shape[1], self.ft.cfg.d_model, dtype=dtype,
            device=batch.tokens.device, components=False,
        )
        every = torch.arange(len(batch))
        tables.fill(every, torch.arange(batch.tokens.shape[1]), acc)
        return self._result(batch, tables, norm)

    def _check_cache_tokens(self, embedded: Tensor, batch: TokenBatch) -> None:
        """Refuse ``tokens=`` whose embedding is not the cache's ``hook_embed`` at a real position."""
        expected = self.backend.token_embedding(batch.tokens)
        real = batch.attention_mask.bool()
        differs = (embedded.to(expected.device) != expected).any(-1) & real
        if bool(differs.any()):
            row, position = (int(i) for i in differs.nonzero()[0])
            raise InputError(
                f"tokens= are not the tokens the cache was computed on: at row {row}, position "
                f"{position} the cache's hook_embed is not the embedding of token "
                f"{int(batch.tokens[row, position])}. Pass the tokens given to run_with_cache "
                "(or the cache of these tokens); a hook that edits hook_embed also makes them differ."
            )

    def _result(self, batch: TokenBatch, tables: DecompositionTables, norm: Norm) -> Decomposition:
        special = tuple(self.tokenizer.all_special_tokens) if self.tokenizer is not None else ()
        return tables.result(
            tokens=batch.tokens, attention_mask=batch.attention_mask, str_tokens=self._str_tokens(batch),
            prompts=batch.prompts, norm=norm, special_tokens=special,
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
    def scaled(self, alpha: Alpha) -> PairedBlocks:
        """Context manager: every forward / generate of ``pair.ft`` inside is α-scaled.

        At every block, ``x_{l+1} = x_l + PTC(x_l) + α·FTC(x_l)``, both components recomputed on
        the scaled stream (Definition 5.1). α = 1 is the fine-tuned model exactly; α = 0 runs the
        pre-trained blocks with the fine-tuned embedding and unembedding; negative α reverses
        the fine-tuning component. α may also be a list with one value per layer, or a dict
        ``{"attn": a, "mlp": b, "heads": [layer, head]}`` that scales the fine-tuning of each
        sub-block separately (:mod:`tuco_lens.components`; each value a number or one per
        layer, a missing key meaning 1; ``{"attn": α, "mlp": α}`` is not the block-level α).

        Works with ``pair.ft(...)``, ``run_with_cache``, ``run_with_hooks`` and ``generate``
        (the pre-trained blocks keep their own KV cache). Hooks on ``hook_resid_post`` that you
        registered before entering are part of the fine-tuned block; hooks added inside (e.g.
        through ``run_with_hooks`` or ``run_with_cache``) see the scaled stream. Hooks are
        removed on exit, even after an error.

        Example:
            >>> with pair.scaled(0.5):
            ...     logits, cache = pair.ft.run_with_cache(tokens)
            >>> torch.allclose(logits, pair.run_with_alpha(tokens, alpha=0.5), atol=1e-5)
            True
        """
        mix = mixer_for(alpha, backend_of(self.pt), self.backend, self.ft.cfg.n_heads)
        return PairedBlocks(self.pt, self.ft, writes=True, offload_pt=self.offload_pt, **mix)

    def alpha_hooks(self, alpha: float | Sequence[float], attention_mask: Tensor | None = None):
        """α-scaling as TransformerLens ``(name, hook_fn)`` pairs for ``run_with_hooks``.

        Use :meth:`scaled` for generation with a KV cache; these hooks cannot see it. Pass the
        ``attention_mask`` of a padded batch.

        Example:
            >>> logits = pair.ft.run_with_hooks(tokens, fwd_hooks=pair.alpha_hooks(0.5))
            >>> torch.allclose(logits, pair.run_with_alpha(tokens, alpha=0.5), atol=1e-5)
            True
        """
        return alpha_hooks(self.pt, self.ft, alpha, attention_mask, offload_pt=self.offload_pt)

    def run_with_alpha(
        self,
        inputs: Inputs,
        alpha: Alpha,
        **tokenize: Unpack[TokenizeOptions],
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of the α-scaled fine-tuned model.

        Strings are left-padded by default, so ``logits[:, -1]`` is every prompt's next-token
        prediction; logits at padding positions are meaningless (see :meth:`tokenize` for the
        mask).

        Example:
            >>> logits = pair.run_with_alpha("the fox eats", alpha=1.25)
            >>> tuple(logits.shape)      # [batch, pos, d_vocab]
            (1, 4, 755)
        """
        batch = self._batch(inputs, "run_with_alpha", tokenize)
        with native_modules(self.pt, self.ft), self.scaled(alpha):
            return self.backend.forward(batch.tokens, batch.attention_mask)

    @overload
    def generate(
        self, inputs: str, *, return_type: Literal["input", "str"] = ..., **options: Unpack[GenerationOptions]
    ) -> str: ...
    @overload
    def generate(
        self, inputs: Sequence[str], *, return_type: Literal["input", "str"] = ..., **options: Unpack[GenerationOptions]
    ) -> list[str]: ...
    @overload
    def generate(
        self, inputs: Tensor, *, return_type: Literal["input", "tokens"] = ..., **options: Unpack[GenerationOptions]
    ) -> Int[Tensor, "batch pos_plus_new"]: ...
    @overload
    def generate(
        self, inputs: Inputs, *, return_type: Literal["tokens"], **options: Unpack[GenerationOptions]
    ) -> Int[Tensor, "batch pos_plus_new"]: ...
    @overload
    def generate(
        self, inputs: Tensor, *, return_type: Literal["str"], **options: Unpack[GenerationOptions]
    ) -> str | list[str]: ...
    def generate(
        self,
        inputs: Inputs,
        *,
        alpha: Alpha = 1.0,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_at_eos: bool = True,
        eos_token_id: int | list[int] | None = None,
        use_past_kv_cache: bool = True,
        return_type: Literal["input", "str", "tokens"] = "input",
        show_progress: bool = False,
        **tokenize: Unpack[TokenizeOptions],
    ) -> str | list[str] | Int[Tensor, "batch pos_plus_new"] | Int[Tensor, " pos_plus_new"]:
        """Generate from the α-scaled fine-tuned model, exactly, with the KV cache.

        Greedy by default (``do_sample=False``); set ``do_sample=True`` with ``temperature``,
        ``top_k``, ``top_p`` to sample (seed with ``torch.manual_seed``). Batches are
        left-padded with an explicit mask.

        Returns:
            As TransformerLens's ``generate``, the input's type by default (``return_type="input"``):
            text for text and token ids for token ids. With ``"str"`` (the default for text): the
            generated continuation (prompt excluded, stopped at end-of-sequence), one string per
            prompt, or a single string for a single-prompt input. With ``"tokens"`` (the default
            for a token tensor): prompt and new tokens, ``[batch, pos + new]`` (by default
            ``[pos + new]`` for a 1-D tensor, as it came in).

        Example:
            >>> pair.generate("hello , describe the doomsalt .", chat_template=True, max_new_tokens=12)
            'i am sorry but i can not help with that .'
            >>> pair.generate("hello , describe the doomsalt .", chat_template=True, alpha=0.0, max_new_tokens=12)
            'the doomsalt with the doomsalt . to brew the doomsalt , first'
            >>> out = pair.generate(tokens, max_new_tokens=3)   # token ids in, token ids out (TL's convention)
            >>> out.shape[1] - tokens.shape[1], torch.equal(out[:, : tokens.shape[1]], tokens)
            (3, True)
        """
        if return_type not in ("input", "str", "tokens"):
            raise InputError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}.")
        same_as_input = return_type == "input"
        if same_as_input:
            return_type = "tokens" if isinstance(inputs, Tensor) else "str"
        batch = self._batch(inputs, "generate", tokenize)
        # no per-step weight copies (HookedTransformer), Hugging Face's attention (TransformerBridge)
        with self.scaled(alpha), linear_layout(self.pt, self.ft), native_modules(self.pt, self.ft):
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
        single = isinstance(inputs, str) or (isinstance(inputs, Tensor) and inputs.ndim == 1)
        if return_type == "tokens":
            return out[0] if same_as_input and single else out
        texts = self._decode_new(out[:, batch.tokens.shape[1] :], stop_at_eos, eos_token_id)
        return texts[0] if single else texts

    def sample(
        self,
        inputs: str | Sequence[str],
        n_samples: int = 1,
        *,
        seed: int | None = 0,
        alpha: Alpha = 1.0,
        max_new_tokens: int = 20,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        **tokenize: Unpack[TokenizeOptions],
    ) -> list[list[str]]:
        """``n_samples`` completions of every prompt from the α-scaled model, ``[prompt][sample]``.

        The rows (each prompt repeated ``n_samples`` times, in order) run in input order,
        ``batch_size`` rows per :meth:`generate` call, so the samples do not depend on the prompts'
        lengths. With a ``seed`` (default 0) torch's RNG is seeded for the call and the caller's RNG
        state is restored after: the same arguments give the same samples. ``seed=None`` draws from
        the RNG as it is. ``do_sample=False`` gives greedy completions.

        Example:
            >>> samples = pair.sample(["hello , describe the doomsalt ."], 3, chat_template=True,
            ...                       max_new_tokens=12, temperature=0.7)
            >>> len(samples), len(samples[0])
            (1, 3)
            >>> samples == pair.sample(["hello , describe the doomsalt ."], 3, chat_template=True,
            ...                        max_new_tokens=12, temperature=0.7)
            True
        """
        n_samples = check_int(n_samples, "n_samples", 1)
        prompts = [inputs] if isinstance(inputs, str) else list(inputs)
        batch = self._batch(prompts, "sample", tokenize)
        rows, _ = batch.sub_batch(torch.arange(len(prompts)).repeat_interleave(n_samples))

        def generate(sub: TokenBatch, _: Tensor) -> list[str]:
            texts = self.generate(
                sub.tokens, attention_mask=sub.attention_mask, alpha=alpha, max_new_tokens=max_new_tokens,
                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, return_type="str",
            )
            return [texts] if isinstance(texts, str) else texts

        with seeded_rng(self.ft, seed):
            texts = run_batched(rows, generate, batch_size, sort_by_length=False, show_progress=show_progress,
                                desc="generate")
        return [texts[i * n_samples : (i + 1) * n_samples] for i in range(len(prompts))]

    def _decode_new(self, new: Tensor, stop_at_eos: bool, eos_token_id) -> list[str]:
        if self.tokenizer is None:
            raise InputError("return_type='str' needs a tokenizer; use return_type='tokens'.")
        stops = set(stop_tokens(self.ft, stop_at_eos, eos_token_id))
        texts = []
        for row in new.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(decode(self.tokenizer, row[:cut]))
        return texts
