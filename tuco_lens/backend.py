"""Every TransformerLens call of tuco_lens, for both of its model classes.

tuco_lens runs on two kinds of TransformerLens model:

* ``HookedTransformer`` (transformer-lens 3.x): TransformerLens's own re-implementation of the
  blocks, with its own KV cache (one ``TransformerLensKeyValueCacheEntry`` per block);
* ``TransformerBridge`` (transformer-lens 3.9 and the only model class of 4.x): the Hugging Face
  model itself, its decoder layers wrapped in ``BlockBridge`` modules with hook points, and the
  Hugging Face ``Cache`` object shared by all layers.

The rest of the package asks this module, through :func:`backend_of`, for the few things that
differ: where a block's ``hook_resid_pre``/``hook_resid_post`` live, how to call a pre-trained
block on the fine-tuned stream with the fine-tuned call's mask and positions, how to give the
pre-trained blocks a KV cache paired with the fine-tuned one, and how to run a forward pass.
With transformer-lens 4.x installed, ``HookedTransformer`` is ``None`` here and everything goes
through the bridge.

Example:
    >>> backend = backend_of(pair.ft)
    >>> backend.name in ("HookedTransformer", "TransformerBridge")
    True
    >>> backend.resid_pre(pair.ft.blocks[0]).name   # hook_resid_pre, or a bridge's hook_in
    'blocks.0.hook_...'
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
import transformers
from jaxtyping import Float
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components import AttentionBridge
from transformer_lens.utilities import get_device
from transformer_lens.utilities.logits_utils import sample_logits

from tuco_lens.errors import InputTypeError, TuCoError, UnsupportedVersionsError
from tuco_lens.versions import installed_versions, tested_versions

try:  # transformer-lens 3.x; removed in 4.0
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
    from transformer_lens.components import AbstractAttention, GatedMLP, Unembed
except ImportError:  # pragma: no cover - exercised by the transformer-lens 4.x CI job
    AbstractAttention = GatedMLP = Unembed = None  # type: ignore[assignment,misc]
    HookedTransformer = None  # type: ignore[assignment,misc]
    HookedTransformerConfig = None  # type: ignore[assignment,misc]
    tl_loading = None  # type: ignore[assignment]
    TransformerLensKeyValueCache = None  # type: ignore[assignment,misc]
    TransformerLensKeyValueCacheEntry = None  # type: ignore[assignment,misc]

Model: TypeAlias = Any
"""A ``HookedTransformer`` (transformer-lens 3.x) or a ``TransformerBridge``: the model classes tuco_lens
works on (the one alias every module uses). ``Any`` to type checkers because ``HookedTransformer``
does not exist on transformer-lens 4.x; :func:`model_kind` tells which one an object is."""

__all__ = [
    "Model",
    "add_permanent_hook",
    "remove_permanent_hook",
    "ActivationCache",
    "Backend",
    "BlockCall",
    "BridgeBackend",
    "HAS_HOOKED_TRANSFORMER",
    "HookPoint",
    "HookedBackend",
    "HookedTransformer",
    "HookedTransformerConfig",
    "TransformerBridge",
    "backend_of",
    "bridge_from_hf",
    "native_modules",
    "linear_layout",
    "model_kind",
    "repair_cache_keyword",
    "repair_float64_attention",
    "sample_logits",
    "tl_loading",
]

#: True when the installed transformer-lens still has ``HookedTransformer`` (3.x).
HAS_HOOKED_TRANSFORMER = HookedTransformer is not None

_PT_CACHES = "_tuco_lens_pt_caches"
# TransformerBridge classes whose sub-modules the component split calls (standard blocks).
_SPLIT_MODULES = (
    "BlockBridge", "ParallelBlockBridge", "AttentionBridge", "PositionEmbeddingsAttentionBridge",
    "JointQKVAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge",
)
_POST_ATTENTION_NORM = (
    "A norm follows the attention output in these blocks (e.g. Gemma 2's post-attention norm), so "
    "the attention output is not a sum of per-head terms: the per-head split is refused. The "
    "attention / MLP split works: pass heads=False (decompose, logit_attribution)."
)


def model_kind(model: Any) -> str | None:
    """``"HookedTransformer"``, ``"TransformerBridge"`` or None for anything else.

    Example:
        >>> model_kind(pair.ft) in ("HookedTransformer", "TransformerBridge")
        True
    """
    if HAS_HOOKED_TRANSFORMER and isinstance(model, HookedTransformer):
        return "HookedTransformer"
    if isinstance(model, TransformerBridge):
        return "TransformerBridge"
    return None


@dataclass
class BlockCall:
    """How a fine-tuned block was called in the current forward pass (recorded by a pre-hook).

    ``args``/``kwargs`` are the block's own arguments; ``x`` (filled in by a reader on the
    block's ``hook_resid_pre``) is the residual stream the block really consumes, after any
    user hooks.
    """

    args: tuple
    kwargs: dict[str, Any]
    x: Tensor | None = None
    #: Positions held by each fine-tuned KV cache of the call before the block ran.
    cache_lengths: list[int] | None = None
    #: The pre-trained block's output, when it ran before the fine-tuned block finished.
    pt_post: Tensor | None = None
    #: The sub-block tensors of both blocks (a ``tuco_lens.hooks.BlockParts``), if recorded.
    parts: Any = None


class Backend:
    """What tuco_lens needs to know about one model class (see the module docstring)."""

    name = ""

    def __init__(self, model: Any):
        self.model = model

    # -- structure --------------------------------------------------------------
    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The model's blocks, in order."""
        return self.model.blocks

    @property
    def token_embedding(self) -> torch.nn.Module:
        """The module that turns token ids (its first argument) into ``hook_embed``'s input."""
        return self.model.embed

    def resid_pre(self, block: torch.nn.Module) -> HookPoint:
        """The hook point whose output is the stream the block consumes."""
        raise NotImplementedError

    def resid_post(self, block: torch.nn.Module) -> HookPoint:
        """The hook point whose output is the block's output stream."""
        raise NotImplementedError

    def block_output(self, output: Any) -> Tensor:
        """The residual stream in what a block's ``forward`` returned."""
        return output[0] if isinstance(output, tuple) else output

    def input_device(self) -> torch.device:
        """Where token ids must live for a forward pass (the embedding's device)."""
        raise NotImplementedError

    def supports_last_token_path(self) -> bool:
        """Whether the pre-trained blocks can run at the last position only (exactly)."""
        return False

    def device_map(self) -> dict[str, Any] | None:
        """The accelerate ``device_map`` the model was loaded with (``hf_device_map``), if any."""
        return None

    def placement(self) -> dict[str, str] | None:
        """Where :meth:`device_map` puts each parameter (``name -> device``); ``None`` without a map.

        Two maps written differently but placing every parameter alike give the same placement.
        """
        mapping = self.device_map()
        if not mapping:
            return None
        placed = {}
        for name, _ in self._mapped_model().named_parameters():
            owners = [k for k in mapping if k == "" or name == k or name.startswith(k + ".")]
            placed[name] = str(mapping[max(owners, key=len)]) if owners else "?"
        return placed

    def _mapped_model(self) -> torch.nn.Module:
        return self.model

    # -- calling a pre-trained block on the fine-tuned stream --------------------
    def check_call(self, layer: int, call: BlockCall, key: int) -> None:
        """Validate a recorded call (e.g. that the paired pre-trained KV cache is in step)."""

    def call_pt_block(self, block: torch.nn.Module, layer: int, call: BlockCall, x: Tensor, key: int) -> Tensor:
        """Run pre-trained ``block`` on ``x`` the way the fine-tuned twin was called."""
        raise NotImplementedError

    def check_cache_advanced(self, layer: int, call: BlockCall, key: int) -> None:
        """After both blocks of ``layer`` ran: their KV caches grew by the call's positions.

        A cache that did not grow means the attention modules never saw it, so every later
        step would attend to itself alone: a silently wrong generation. Raises
        :class:`~tuco_lens.errors.UnsupportedVersionsError` instead.
        """

    def block_calls(self, tokens: Tensor, attention_mask: Tensor) -> list[BlockCall]:
        """How each block would be called on ``tokens`` (no KV cache), without running them.

        Used to run the pre-trained blocks on cached fine-tuned activations.
        """
        raise NotImplementedError

    # -- inside a block (the component split: docs/components.md) -----------------
    def is_parallel(self, block: torch.nn.Module) -> bool:
        """Whether attention and MLP both read the block input (GPT-NeoX parallel residual)."""
        raise NotImplementedError

    def resid_mid(self, block: torch.nn.Module) -> HookPoint:
        """Sequential blocks: the hook point whose output is ``y = x + A(x)``, the MLP's input."""
        raise NotImplementedError

    def mid_edit_reaches_residual(self) -> bool:
        """Whether a value returned by a :meth:`resid_mid` hook is also the block's residual.

        True for HookedTransformer (``resid_post = resid_mid + mlp_out`` reads the hook's output);
        False for a bridge, whose ``hook_resid_mid`` is the MLP norm's input while the Hugging Face
        layer keeps its own residual.
        """
        raise NotImplementedError

    def attn_out(self, block: torch.nn.Module) -> HookPoint:
        """The hook point whose output is ``A(x)``, what attention adds to the stream."""
        raise NotImplementedError

    def hook_z(self, block: torch.nn.Module) -> HookPoint:
        """The hook point whose output holds every head's ``z`` (the output projection's input)."""
        raise NotImplementedError

    def heads_of(self, z: Tensor) -> Float[Tensor, "batch pos head d_head"]:
        """``z`` as seen by a raw forward hook on :meth:`hook_z`, one slice per query head."""
        return z

    def head_weights(self, block: torch.nn.Module) -> tuple[Float[Tensor, "head d_head d_model"], Tensor | None]:
        """``(W_O per head, b_O or None)``: ``A(x) = Σ_h z_h W_O[h] + b_O``.

        Raises:
            TuCoError: a norm follows the attention output (Gemma 2), so ``A(x)`` is not a sum of
                per-head terms.
        """
        raise NotImplementedError

    def call_mlp(self, block: torch.nn.Module, y: Tensor) -> Tensor:
        """``M(y)``: the block's MLP sub-block, with its norms, on ``y`` (without the residual)."""
        raise NotImplementedError

    def final_norm(self) -> torch.nn.Module:
        """The final norm module (applied to the last residual stream before the unembedding)."""
        raise NotImplementedError

    def unembedding(self) -> tuple[Float[Tensor, "d_model d_vocab"], Tensor | None]:
        """``(W_U, b_U or None)``: ``logits = final_norm(x_L) @ W_U + b_U``."""
        raise NotImplementedError

    # -- forward passes -----------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor,
        *,
        logits: bool | Literal["last"] = True,
        cache: Any = None,
    ) -> Tensor | None:
        """One forward pass (``cache`` from :meth:`new_generation_cache` for generation).

        ``attention_mask`` covers every position so far (``[batch, cached + new]`` with a
        cache), ``tokens`` only the new ones. ``logits=True`` returns the logits of every new
        position; ``"last"`` those of the last position at least (``[batch, 1 or new, d_vocab]``:
        take ``[:, -1]``); ``False`` nothing, and may stop before the unembedding.
        """
        raise NotImplementedError

    def new_generation_cache(self, batch_size: int) -> Any:
        """An empty KV cache for :meth:`forward` during generation."""
        raise NotImplementedError

    def final_residual(self, tokens: Tensor, attention_mask: Tensor) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after the last block, before the final norm (``x_L``).

        One forward pass that stops at the last block's ``hook_resid_post`` (no final norm, no
        unembedding), on either model class.
        """
        return self._forward_until(self.resid_post(self.blocks[-1]), tokens, attention_mask, before=False)

    def _forward_until(self, module: torch.nn.Module, tokens: Tensor, attention_mask: Tensor, *, before: bool) -> Any:
        """Run a forward pass until ``module`` is reached and stop it there.

        Returns what ``module`` was called with, ``(args, kwargs)``, for ``before=True``, or what it
        returned for ``before=False``; nothing after it runs.
        """
        seen: list[Any] = []

        class _Reached(Exception):
            pass

        def stop_before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            seen.append((args, kwargs))
            raise _Reached

        def stop_after(module: torch.nn.Module, args: tuple, output: Any) -> None:
            seen.append(output)
            raise _Reached

        if before:
            handle = module.register_forward_pre_hook(stop_before, with_kwargs=True)
        else:
            handle = module.register_forward_hook(stop_after)
        try:
            self.forward(tokens, attention_mask, logits=False)
        except _Reached:
            pass
        finally:
            handle.remove()
        return seen[0]

    def linear_layout(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: weights stored in the layout the forward pass reads (see :func:`linear_layout`)."""
        return contextlib.nullcontext()

    def native_modules(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: Hugging Face's own attention and norms where no hook needs more (see :func:`native_modules`)."""
        return contextlib.nullcontext()


def _paired(owner: Any, key: int, make: Callable[[], Any]) -> tuple[Any, bool]:
    """The pre-trained cache attached to fine-tuned cache ``owner`` for the context ``key``."""
    store = owner.__dict__.setdefault(_PT_CACHES, {})
    created = key not in store
    if created:
        store[key] = make()
    return store[key], created


class HookedBackend(Backend):
    """TransformerLens's ``HookedTransformer`` (transformer-lens 3.x)."""

    name = "HookedTransformer"

    def resid_pre(self, block: torch.nn.Module) -> HookPoint:
        return block.hook_resid_pre

    def resid_post(self, block: torch.nn.Module) -> HookPoint:
        return block.hook_resid_post

    def input_device(self) -> torch.device:
        return self.model.embed.W_E.device

    def supports_last_token_path(self) -> bool:
        cfg = self.model.cfg
        return (
            cfg.positional_embedding_type in ("standard", "rotary")
            and not cfg.use_attn_in
            and not cfg.use_split_qkv_input
            and getattr(cfg, "clip_qkv", None) is None
            and not getattr(cfg, "load_in_4bit", False)
            and not getattr(cfg, "use_attention_sinks", False)
            and not getattr(cfg, "use_logn_attn", False)
            and not str(cfg.original_architecture or "").startswith("Olmo")
            and cfg.attention_dir == "causal"
        )

    def check_call(self, layer: int, call: BlockCall, key: int) -> None:
        entry = call.kwargs.get("past_kv_cache_entry")
        if entry is None:
            return
        n_ft = entry.past_keys.shape[1]

        def make() -> Any:
            if n_ft != 0:
                raise TuCoError(
                    f"The fine-tuned KV cache of block {layer} already holds {n_ft} positions "
                    "computed without tuco_lens, so the pre-trained blocks have no matching cache. "
                    "Start generation (or build the cache) inside the same pair.scaled() context."
                )
            return TransformerLensKeyValueCacheEntry.init_cache_entry(
                self.model.cfg, entry.past_keys.device, entry.past_keys.shape[0]
            )

        pt_entry, _ = _paired(entry, key, make)
        if pt_entry.past_keys.shape[1] != n_ft:
            raise TuCoError(
                f"The pre-trained KV cache of block {layer} is out of step with the fine-tuned "
                f"one ({pt_entry.past_keys.shape[1]} vs {n_ft} positions)."
            )
        pt_entry.frozen = entry.frozen
        call.cache_lengths = [n_ft]

    def check_cache_advanced(self, layer: int, call: BlockCall, key: int) -> None:
        entry = call.kwargs.get("past_kv_cache_entry")
        if entry is None or entry.frozen or call.x is None:
            return
        pt_entry = entry.__dict__[_PT_CACHES][key]
        _check_grown(layer, call, [entry.past_keys.shape[1]], [pt_entry.past_keys.shape[1]])

    def call_pt_block(self, block: torch.nn.Module, layer: int, call: BlockCall, x: Tensor, key: int) -> Tensor:
        device = x.device
        entry = call.kwargs.get("past_kv_cache_entry")
        spe = call.kwargs.get("shortformer_pos_embed")
        mask = call.kwargs.get("attention_mask")
        return block(
            x,
            shortformer_pos_embed=None if spe is None else spe.to(device),
            past_kv_cache_entry=None if entry is None else entry.__dict__[_PT_CACHES][key],
            attention_mask=None if mask is None else mask.to(device),
        )

    def call_pt_block_at_last_token(self, block: torch.nn.Module, call: BlockCall, x: Tensor) -> Tensor:
        """A block's output at the last position only, reading keys and values at every position.

        Attention at the last position needs keys and values of all positions, but its query,
        the output projection and the MLP only at the last one: most of a block's arithmetic is
        skipped. The prefix's keys and values go through TransformerLens's own KV-cache path
        (the cache holds pre-rotary keys), so masking and rotary positions are
        TransformerLens's. Rows must be left padded (the last position is every row's last real
        token). Returns ``[batch, 1, d_model]``.
        """
        if call.kwargs.get("past_kv_cache_entry") is not None:
            raise TuCoError("The last-token path cannot run with a KV cache.")
        mask = call.kwargs.get("attention_mask")
        mask = None if mask is None else mask.to(x.device)
        normed = block.ln1(x[:, :-1])
        _, keys, values = block.attn.calculate_qkv_matrices(normed[:, :0], normed, normed)
        entry = TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values, frozen=True)
        return block(x[:, -1:], past_kv_cache_entry=entry, attention_mask=mask)

    def is_parallel(self, block: torch.nn.Module) -> bool:
        return bool(self.model.cfg.parallel_attn_mlp)

    def _check_sublayers(self) -> None:
        cfg = self.model.cfg
        if cfg.attn_only or str(cfg.original_architecture or "").startswith("Olmo"):
            raise TuCoError(
                f"The component split needs blocks with one attention and one MLP sub-block in "
                f"pre-norm order; {cfg.original_architecture or cfg.model_name} has "
                f"{'no MLP' if cfg.attn_only else 'post-norm blocks'}."
            )

    def resid_mid(self, block: torch.nn.Module) -> HookPoint:
        self._check_sublayers()
        return block.hook_resid_mid

    def mid_edit_reaches_residual(self) -> bool:
        return True

    def attn_out(self, block: torch.nn.Module) -> HookPoint:
        self._check_sublayers()
        return block.hook_attn_out

    def hook_z(self, block: torch.nn.Module) -> HookPoint:
        return block.attn.hook_z

    def head_weights(self, block: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
        if self.model.cfg.use_normalization_before_and_after:
            raise TuCoError(_POST_ATTENTION_NORM)
        return block.attn.W_O, block.attn.b_O

    def call_mlp(self, block: torch.nn.Module, y: Tensor) -> Tensor:
        self._check_sublayers()
        mlp_in = block.hook_mlp_in(y.clone()) if self.model.cfg.use_hook_mlp_in else y
        return block.apply_mlp(block.ln2(mlp_in))

    def final_norm(self) -> torch.nn.Module:
        return self.model.ln_final

    def unembedding(self) -> tuple[Tensor, Tensor | None]:
        softcap = getattr(self.model.cfg, "output_logits_soft_cap", -1.0)
        if softcap and softcap > 0:
            raise TuCoError(
                f"The logits of {self.model.cfg.model_name} are soft-capped (output_logits_soft_cap="
                f"{softcap}), so they are not a sum of direct effects."
            )
        return self.model.unembed.W_U, self.model.unembed.b_U

    def block_calls(self, tokens: Tensor, attention_mask: Tensor) -> list[BlockCall]:
        spe = None
        if self.model.cfg.positional_embedding_type == "shortformer":
            spe = self.model.pos_embed(tokens, 0, attention_mask)
        kwargs = {"attention_mask": attention_mask, "shortformer_pos_embed": spe}
        return [BlockCall((), dict(kwargs)) for _ in self.blocks]

    def forward(self, tokens, attention_mask, *, logits=True, cache=None):
        if not logits:
            return self.model(
                tokens, attention_mask=attention_mask, stop_at_layer=self.model.cfg.n_layers
            )
        if cache is not None:  # TransformerLens keeps the mask of cached positions in its cache
            attention_mask = attention_mask[:, -tokens.shape[1] :]
        return self.model(tokens, attention_mask=attention_mask, past_kv_cache=cache, return_type="logits")

    def new_generation_cache(self, batch_size: int) -> Any:
        return TransformerLensKeyValueCache.init_cache(self.model.cfg, self.model.cfg.device, batch_size)

    def linear_layout(self) -> contextlib.AbstractContextManager[None]:
        return _hooked_linear_layout(self.model)


class BridgeBackend(Backend):
    """TransformerLens's ``TransformerBridge``: Hugging Face decoder layers with hook points.

    A pre-trained layer is called with the fine-tuned layer's own arguments (attention mask,
    rotary position embeddings, position ids, ...), with the stream replaced by ``x`` and any
    Hugging Face ``Cache`` replaced by a cache of the pre-trained layers, created empty alongside
    the fine-tuned one and updated by the same calls, so the two stay in step.
    """

    name = "TransformerBridge"

    def __init__(self, model: Any):
        super().__init__(model)
        repair_cache_keyword(model)
        repair_float64_attention(model)

    def resid_pre(self, block: torch.nn.Module) -> HookPoint:
        return block.hook_in

    def resid_post(self, block: torch.nn.Module) -> HookPoint:
        return block.hook_out

    def input_device(self) -> torch.device:
        return self.model.embed.original_component.weight.device

    def _hf_config(self) -> Any:
        return self.model.original_model.config

    def device_map(self) -> dict[str, Any] | None:
        return getattr(self.model.original_model, "hf_device_map", None)

    def _mapped_model(self) -> torch.nn.Module:
        return self.model.original_model

    def check_call(self, layer: int, call: BlockCall, key: int) -> None:
        for ft_cache in _caches_in(call):
            n_ft = ft_cache.get_seq_length(layer)

            def make(ft_cache: Any = ft_cache, n_ft: int = n_ft) -> Any:  # bound now: _paired calls it at once
                if ft_cache.get_seq_length(0) != 0 or n_ft != 0:
                    raise TuCoError(
                        f"The fine-tuned KV cache already holds {ft_cache.get_seq_length(0)} "
                        "positions computed without tuco_lens, so the pre-trained layers have no "
                        "matching cache. Start generation (or build the cache) inside the same "
                        "pair.scaled() context."
                    )
                if not isinstance(ft_cache, transformers.DynamicCache):
                    raise TuCoError(
                        f"tuco_lens pairs Hugging Face DynamicCache objects, got "
                        f"{type(ft_cache).__name__}; generate with pair.generate(...) or pass a "
                        "transformers.DynamicCache."
                    )
                return transformers.DynamicCache(config=self._hf_config())

            pt_cache, _ = _paired(ft_cache, key, make)
            if pt_cache.get_seq_length(layer) != n_ft:
                raise TuCoError(
                    f"The pre-trained KV cache of layer {layer} is out of step with the fine-tuned "
                    f"one ({pt_cache.get_seq_length(layer)} vs {n_ft} positions)."
                )
        call.cache_lengths = [c.get_seq_length(layer) for c in _caches_in(call)]

    def check_cache_advanced(self, layer: int, call: BlockCall, key: int) -> None:
        caches = _caches_in(call)
        if not caches or call.x is None:
            return
        ft_lengths = [c.get_seq_length(layer) for c in caches]
        pt_lengths = [c.__dict__[_PT_CACHES][key].get_seq_length(layer) for c in caches]
        _check_grown(layer, call, ft_lengths, pt_lengths)

    def call_pt_block(self, block: torch.nn.Module, layer: int, call: BlockCall, x: Tensor, key: int) -> Tensor:
        device = x.device

        def swap(value: Any) -> Any:
            if isinstance(value, transformers.Cache):
                return value.__dict__[_PT_CACHES][key]
            if isinstance(value, Tensor):
                return value.to(device)
            if isinstance(value, tuple):  # (cos, sin) rotary embeddings
                return tuple(swap(v) for v in value)
            return value

        if call.args:
            args = (x,) + tuple(swap(a) for a in call.args[1:])
            kwargs = {k: swap(v) for k, v in call.kwargs.items()}
        else:
            args = ()
            kwargs = {k: swap(v) for k, v in call.kwargs.items()}
            kwargs["hidden_states"] = x
        return self.block_output(block(*args, **kwargs))

    def supports_last_token_path(self) -> bool:
        # Standard blocks around an attention module whose keys and values reach a cache's
        # ``update`` (the call itself is checked at every call; anything unknown runs in full).
        return all(
            type(block).__name__ in ("BlockBridge", "ParallelBlockBridge")
            and type(getattr(block, "attn", None)).__name__ in _NATIVE_ATTENTION
            for block in self.blocks
        )

    def call_pt_block_at_last_token(self, block: torch.nn.Module, call: BlockCall, x: Tensor) -> Tensor:
        """A block's output at the last position only, reading keys and values at every position.

        As for a HookedTransformer (:meth:`HookedBackend.call_pt_block_at_last_token`): the
        Hugging Face layer first runs on the other positions until its attention hands its keys
        and values to the cache (a cache that records them and stops the layer there: no query
        attends, no MLP runs), then on the last position with a cache holding those keys and
        values, its mask row, rotary embedding and position id. Rows must be left padded.
        Returns ``[batch, 1, d_model]``, or the full ``[batch, pos, d_model]`` output (the
        ordinary call) for a layer argument the split does not know.
        """
        arguments = _layer_arguments(block, call)
        cache_name = None if arguments is None else next((k for k in _CACHE_KEYWORDS if k in arguments), None)
        if cache_name is None:
            return self.call_pt_block(block, 0, call, x, 0)
        if arguments[cache_name] is not None:
            raise TuCoError("The last-token path cannot run with a KV cache.")
        n = x.shape[1]
        if n > 1:
            prefix = _positions_of(arguments, slice(0, n - 1), slice(0, n - 1), n)
            recorder = _KeysValuesRecorder()
            if prefix is None:
                return self.call_pt_block(block, 0, call, x, 0)
            try:
                block(**{**prefix, "hidden_states": x[:, :-1], cache_name: recorder})
            except _KeysValuesRecorded:
                pass
            if recorder.recorded is None:  # the layer never handed keys to its cache
                return self.call_pt_block(block, 0, call, x, 0)
            cache = _PrefixCache(*recorder.recorded)
        else:
            cache = None
        last = _positions_of(arguments, slice(n - 1, n), slice(0, n), n)
        if last is None:
            return self.call_pt_block(block, 0, call, x, 0)
        return self.block_output(block(**{**last, "hidden_states": x[:, -1:], cache_name: cache}))

    def is_parallel(self, block: torch.nn.Module) -> bool:
        return "hook_resid_mid" not in block.hook_aliases

    def _sub(self, module: torch.nn.Module, name: str) -> torch.nn.Module:
        """A bridge sub-module (``ln2``, ``mlp``, ``attn``, ``o``) of a standard block."""
        found = getattr(module, name, None)
        if found is None or type(module).__name__ not in _SPLIT_MODULES:
            raise TuCoError(
                f"The component split needs blocks with one attention and one MLP sub-block; "
                f"{type(module).__name__} of {self._hf_config().model_type} has no {name!r} "
                "sub-module tuco_lens knows how to call."
            )
        return found

    def resid_mid(self, block: torch.nn.Module) -> HookPoint:
        return self._sub(block, "ln2").hook_in

    def mid_edit_reaches_residual(self) -> bool:
        return False

    def attn_out(self, block: torch.nn.Module) -> HookPoint:
        post = getattr(block, "ln1_post", None)
        return (post if post is not None else self._sub(block, "attn")).hook_out

    def hook_z(self, block: torch.nn.Module) -> HookPoint:
        return self._sub(self._sub(block, "attn"), "o").hook_in

    def heads_of(self, z: Tensor) -> Tensor:
        n_heads = self.model.cfg.n_heads
        return z.reshape(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)

    def head_weights(self, block: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
        if getattr(block, "ln1_post", None) is not None:
            raise TuCoError(_POST_ATTENTION_NORM)
        proj = self._sub(self._sub(block, "attn"), "o").original_component
        weight = proj.weight if isinstance(proj, transformers.Conv1D) else proj.weight.T  # [h*d_head, d_model]
        n_heads = self.model.cfg.n_heads
        return weight.reshape(n_heads, weight.shape[0] // n_heads, weight.shape[1]), proj.bias

    def call_mlp(self, block: torch.nn.Module, y: Tensor) -> Tensor:
        # the Hugging Face layer's second half: pre-MLP norm, MLP, any post-MLP norm
        out = self._sub(block, "mlp")(self._sub(block, "ln2")(y))
        post = getattr(block, "ln2_post", None)
        return out if post is None else post(out)

    def final_norm(self) -> torch.nn.Module:
        return self.model.ln_final.original_component

    def unembedding(self) -> tuple[Tensor, Tensor | None]:
        head = self.model.unembed.original_component
        softcap = getattr(self._hf_config(), "final_logit_softcapping", None)
        if softcap:
            raise TuCoError(
                f"The logits of {self._hf_config().model_type} are soft-capped "
                f"(final_logit_softcapping={softcap}), so they are not a sum of direct effects."
            )
        return head.weight.T, head.bias

    def block_calls(self, tokens: Tensor, attention_mask: Tensor) -> list[BlockCall]:
        layer_types = getattr(self._hf_config(), "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:
            raise TuCoError(
                f"decompose(cache) cannot rebuild the per-layer attention masks of this model "
                f"(layer types {sorted(set(layer_types))}); pass the tokens instead: "
                "pair.decompose(tokens)."
            )
        args, kwargs = self._forward_until(self.blocks[0], tokens, attention_mask, before=True)
        return [BlockCall(args, dict(kwargs)) for _ in self.blocks]

    def forward(self, tokens, attention_mask, *, logits=True, cache=None):
        # Logits at the last position only where no more are asked for (Hugging Face's
        # logits_to_keep, as its generate does): the unembedding of every position is a sizeable
        # part of a forward pass.
        keep = {} if logits is True or not self._keeps_logits() else {"logits_to_keep": 1}
        if cache is None:
            # No cache is built (an HF model would otherwise allocate one per forward pass).
            out = self.model(tokens, attention_mask=attention_mask, use_cache=False, return_type="logits", **keep)
            return out if logits else None
        return self.model(
            tokens, attention_mask=attention_mask, past_key_values=cache, use_cache=True, return_type="logits", **keep
        )

    def _keeps_logits(self) -> bool:
        return _takes_logits_to_keep(type(self.model.original_model).forward)

    def new_generation_cache(self, batch_size: int) -> Any:
        return transformers.DynamicCache(config=self._hf_config())

    def native_modules(self) -> contextlib.AbstractContextManager[None]:
        return _bridge_native_modules(self.model)


@functools.cache
def _takes_logits_to_keep(forward: Callable) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def _check_grown(layer: int, call: BlockCall, ft_lengths: list[int], pt_lengths: list[int]) -> None:
    """Raise if a KV cache did not grow by the positions of ``call`` (see ``check_cache_advanced``)."""
    n_new = call.x.shape[1]
    for before, ft_after, pt_after in zip(call.cache_lengths or [], ft_lengths, pt_lengths):
        if ft_after != before + n_new or pt_after != before + n_new:
            raise UnsupportedVersionsError(
                f"The KV cache of layer {layer} did not record this step (fine-tuned: {before} -> "
                f"{ft_after}, pre-trained: {pt_after} positions; expected {before + n_new}): the "
                "attention modules of these library versions ignore the cache, so cached "
                f"generation would be silently wrong. Installed: {installed_versions()}; tested: "
                f"{tested_versions()}. Install a tested set (README, 'Tested versions'), or pass "
                "use_past_kv_cache=False to generate (use_cache=False to a forward pass)."
            )


def _cache_as_past_key_values(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """Forward pre-hook: hand a ``cache=`` keyword to the attention bridge as ``past_key_values``."""
    if kwargs.get("cache") is None or kwargs.get("past_key_values") is not None:
        return None
    kwargs = dict(kwargs)
    kwargs["past_key_values"] = kwargs.pop("cache")
    return args, kwargs


_REPAIRED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def repair_cache_keyword(bridge: TransformerBridge) -> None:
    """Make a bridge's attention modules read the KV cache that transformers >= 5.24 passes them.

    transformers 5.24 renamed the keyword under which a decoder layer hands the KV cache to its
    attention module from ``past_key_values`` to ``cache``. TransformerLens's attention bridges
    (3.9 and 4.x up to at least 4.3) reimplement attention and read only ``past_key_values``
    (or ``layer_past``), so on 5.24 the cache stays empty and every cached decoding step
    attends to itself alone: ``TransformerBridge.generate`` itself is then wrong. This adds a
    forward pre-hook to each attention bridge that passes ``cache`` on as ``past_key_values``
    (a no-op on earlier transformers, which pass ``past_key_values``). Done once per model;
    the hooks stay (they repair the bridge's own ``generate`` too).

    Example:
        >>> repair_cache_keyword(pair.ft)   # done by tuco_lens for every bridge it touches
        >>> repair_cache_keyword(pair.ft)   # once per model: a no-op now
    """
    if bridge in _REPAIRED:
        return
    for module in bridge.modules():
        if isinstance(module, AttentionBridge):
            module.register_forward_pre_hook(_cache_as_past_key_values, with_kwargs=True)
    _REPAIRED.add(bridge)


def _caches_in(call: BlockCall) -> list[Any]:
    values = list(call.args) + list(call.kwargs.values())
    return [v for v in values if isinstance(v, transformers.Cache)]


# --- the last-token path on TransformerBridge --------------------------------------------------
class _KeysValuesRecorded(Exception):
    """Raised by :class:`_KeysValuesRecorder` once the layer's keys and values are known."""


class _KeysValuesRecorder(transformers.DynamicCache):
    """A cache that records the keys and values a layer's attention hands it, then stops the layer."""

    recorded: tuple[Tensor, Tensor] | None = None

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        self.recorded = (key_states, value_states)
        raise _KeysValuesRecorded


class _PrefixCache(transformers.DynamicCache):
    """A cache whose every layer holds the given keys and values; new ones are appended, not stored."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.prefix = (keys, values)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        keys, values = self.prefix
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


def _layer_arguments(block: torch.nn.Module, call: BlockCall) -> dict[str, Any] | None:
    """The recorded call of a bridge block as ``{parameter name: value}`` of its Hugging Face layer."""
    signature = inspect.signature(block.original_component.forward)
    try:
        bound = signature.bind(*call.args, **call.kwargs)
    except TypeError:
        return None
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        elif name != "hidden_states":
            arguments[name] = value
    return arguments


def _positions_of(arguments: dict[str, Any], rows: slice, keys: slice, n: int) -> dict[str, Any] | None:
    """The layer arguments for the query positions ``rows`` (keys at ``keys``) of an ``n``-position
    call, or None if an argument holds positions the split does not know how to cut."""
    out: dict[str, Any] = {}
    for name, value in arguments.items():
        if name in _CACHE_KEYWORDS or not isinstance(value, (Tensor, tuple, list, dict)):
            out[name] = value
        elif name == "attention_mask" and isinstance(value, Tensor) and value.ndim == 4 and value.shape[-2:] == (n, n):
            out[name] = value[..., rows, keys]
        elif name == "position_embeddings" and isinstance(value, tuple) and all(
            isinstance(t, Tensor) and t.ndim >= 2 and t.shape[-2] == n for t in value
        ):
            out[name] = tuple(t[..., rows, :] for t in value)
        elif name == "position_ids" and isinstance(value, Tensor) and value.shape[-1] == n:
            out[name] = value[..., rows]
        elif name == "cache_position" and isinstance(value, Tensor) and value.ndim == 1 and value.shape[0] == n:
            out[name] = value[rows]
        else:
            return None
    return out


# --- Hugging Face's own attention (SDPA) and norms on TransformerBridge ------------------------
# Bridge modules that recompute, besides or instead of the Hugging Face module they wrap, what
# their internal hook points need: the attention bridges recompute attention eagerly (scores and
# pattern materialised for hook_attn_scores / hook_pattern), the norm bridges the scale and the
# normalised stream (hook_scale / hook_normalized). Inside native_modules they run the wrapped
# module's own forward where no hook needs more.
_NATIVE_ATTENTION = (
    "PositionEmbeddingsAttentionBridge", "JointQKVAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge",
)
_NATIVE_NORMS = ("NormalizationBridge", "RMSNormalizationBridge")
_NATIVE_STATE = "_tuco_lens_native_modules"
_NATIVE_LOCK = threading.Lock()
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")
# Config flags under which the bridge's attention computes something the Hugging Face module does not.
_BRIDGE_ONLY_ATTENTION_FLAGS = ("use_split_qkv_input", "use_attn_in", "use_attn_result")


@dataclass
class _NativeState:
    """Per bridge, while a :func:`native_modules` context is open: the threads inside (with their
    nesting depth) and, per module run natively, the hook points only the bridge's path fires."""

    threads: dict[int, int]
    bridge_only_points: dict[torch.nn.Module, list[HookPoint]]


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _bridge_only_points(module: torch.nn.Module) -> list[HookPoint]:
    """Hook points of a bridge module that the wrapped Hugging Face module's forward does not fire.

    The Hugging Face module calls its own sub-modules (for Llama-style attention the bridge's
    ``q``/``k``/``v``/``o`` projections, hook points included) but none of the bridge's internal
    hook points (``hook_attn_scores``, ``hook_pattern``, ``hook_rot_q``, ``hook_scale``, ...);
    fused-QKV models (GPT-2) also skip the bridge's split ``q``/``k``/``v``/``o``.
    """
    reached = {id(m) for m in module.original_component.modules()}
    reached |= {id(module.hook_in), id(module.hook_out)}
    return [m for m in module.modules() if isinstance(m, HookPoint) and id(m) not in reached]


def _native_allowed(module: torch.nn.Module, state: _NativeState) -> bool:
    """This call may run the Hugging Face module: this thread is inside the context, no hook needs
    the bridge's path, and no option computes the module the bridge's own way."""
    cfg = module.config
    return (
        threading.get_ident() in state.threads
        and not module.training
        and not getattr(module, "compatibility_mode", False)
        and not any(getattr(cfg, flag, False) for flag in _BRIDGE_ONLY_ATTENTION_FLAGS)
        and not any(_has_hooks(point) for point in state.bridge_only_points[module])
    )


def _dispatching_forward(module: torch.nn.Module, state: _NativeState) -> Callable:
    """The module's ``forward`` inside the context: the Hugging Face module's, or the bridge's."""
    bridge = type(module).forward.__get__(module)
    wrapped = module.original_component
    if type(module).__name__ in _NATIVE_NORMS:

        def forward(hidden_states: Tensor, **kwargs: Any) -> Tensor:
            if not _native_allowed(module, state):
                return bridge(hidden_states, **kwargs)
            return module.hook_out(wrapped(module.hook_in(hidden_states), **kwargs))

        return forward
    cache_keyword = "cache" in inspect.signature(wrapped.forward).parameters

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not _native_allowed(module, state):
            return bridge(*args, **kwargs)
        if cache_keyword and "past_key_values" in kwargs and "cache" not in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")  # undo repair_cache_keyword for Hugging Face
        # TransformerLens's minimal wrapper: hook_in, the Hugging Face module, hook_out.
        return AttentionBridge.forward(module, *args, **kwargs)

    return forward


@contextlib.contextmanager
def _bridge_native_modules(model: Any) -> Iterator[None]:
    me = threading.get_ident()
    with _NATIVE_LOCK:
        state = model.__dict__.get(_NATIVE_STATE)
        if state is None:
            modules = [
                m for m in model.modules()
                if type(m).__name__ in _NATIVE_ATTENTION + _NATIVE_NORMS and "forward" not in m.__dict__
                and getattr(m, "original_component", None) is not None
            ]
            state = _NativeState({}, {m: _bridge_only_points(m) for m in modules})
            for module in modules:  # not setattr: a bridge passes that on to the wrapped module
                module.__dict__["forward"] = _dispatching_forward(module, state)
            model.__dict__[_NATIVE_STATE] = state
        state.threads[me] = state.threads.get(me, 0) + 1
    try:
        yield
    finally:
        with _NATIVE_LOCK:
            state.threads[me] -= 1
            if not state.threads[me]:
                del state.threads[me]
            if not state.threads:
                for module in state.bridge_only_points:
                    module.__dict__.pop("forward", None)
                del model.__dict__[_NATIVE_STATE]


@contextlib.contextmanager
def native_modules(*models: Any) -> Iterator[None]:
    """Run a bridge's attention and norms with Hugging Face's own code where nothing needs more.

    A ``TransformerBridge``'s attention modules recompute attention eagerly (the ``batch × heads
    × pos × pos`` scores and pattern in memory) so that ``hook_attn_scores`` and ``hook_pattern``
    can fire, and its norm modules recompute their scale for ``hook_scale`` /
    ``hook_normalized``. Inside this context, for forward passes of the entering thread, these
    modules instead run the Hugging Face module they wrap, as a plain ``transformers`` forward
    does: attention with the model's configured implementation (``config._attn_implementation``:
    SDPA for models loaded by tuco_lens), norms with their own forward. The hook points the
    Hugging Face module reaches still fire: the modules' ``hook_in`` / ``hook_out`` and, on
    Llama-style attention, the projections' ``hook_q``, ``hook_k``, ``hook_v``, ``hook_z``. A
    module falls back to the bridge's own computation, call by call, when any hook is on a hook
    point only that path fires (``hook_attn_scores``, ``hook_pattern``, ``hook_rot_q`` /
    ``hook_rot_k``, ``hook_scale``, ``hook_normalized``, the fused-QKV models' split ``hook_q`` /
    ``hook_k`` / ``hook_v`` / ``hook_z``: ``run_with_cache``, ``run_with_hooks`` or a permanent hook
    there), in training mode, in compatibility mode, with ``use_split_qkv_input``, ``use_attn_in``
    or ``use_attn_result``, and in float64 models' attention (whose pattern
    :func:`repair_float64_attention` recomputes). Equal to the bridge's own computation within
    float rounding (tested on every architecture). Re-entrant and thread-aware; a no-op for
    HookedTransformers. ``pair.tuco``, ``decompose``, ``run_with_alpha``, ``generate``,
    ``logit_attribution`` and ``compare_outputs`` use it.

    Example:
        >>> with native_modules(pair.pt, pair.ft):
        ...     logits = pair.ft(tokens)          # SDPA, unless a pattern hook asks for more
        >>> torch.allclose(logits, pair.ft(tokens), atol=1e-5)
        True
    """
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(backend_of(model).native_modules())
        yield


# --- float64 attention on TransformerBridge --------------------------------------------------
_FLOAT64_REPAIRED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_FLOAT64_HANDLES = "_tuco_lens_float64_handles"
#: How far the bridge's own (float32) softmax may be from the float64 one where it is finite.
_FLOAT32_SOFTMAX_TOLERANCE = 1e-4


def _float64_softmax(scores: Tensor) -> Tensor:
    """Softmax over keys in float64; a query with no visible key (all ``-inf``) gets zeros."""
    fully_masked = torch.isneginf(scores).all(dim=-1, keepdim=True)
    pattern = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=-1)
    return pattern.masked_fill(fully_masked, 0.0)


def _exact_pattern_hooks(attention: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of an attention bridge: for this call, recompute its pattern in float64."""
    parameter = next(attention.parameters(), None)
    if attention.training or parameter is None or parameter.dtype != torch.float64:
        return
    scores: list[Tensor] = []

    def keep_scores(module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
        scores.append(output)

    def exact_pattern(module: torch.nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if not scores:
            return None
        pattern = _float64_softmax(scores.pop())
        finite = ~torch.isnan(output)
        if pattern.shape != output.shape or bool(
            ((pattern - output).abs() > _FLOAT32_SOFTMAX_TOLERANCE)[finite].any()
        ):
            raise UnsupportedVersionsError(
                "The attention of this TransformerBridge computes its pattern differently from a "
                "softmax of hook_attn_scores, so tuco_lens cannot make its float64 attention exact. "
                f"Installed: {installed_versions()}. Load the pair in float32 "
                "(dtype='float32'), or use backend='hooked'."
            )
        return pattern

    # Appended: reads the scores after any hooks of yours. Prepended: your hooks see the result.
    handles = (
        attention.hook_attn_scores.register_forward_hook(keep_scores),
        attention.hook_pattern.register_forward_hook(exact_pattern, prepend=True),
    )
    attention.__dict__.setdefault(_FLOAT64_HANDLES, []).append(handles)


def _remove_pattern_hooks(attention: torch.nn.Module, args: tuple, output: Any) -> None:
    """Forward hook of an attention bridge (also after an error): drop this call's hooks."""
    stack = attention.__dict__.get(_FLOAT64_HANDLES)
    if stack:
        for handle in stack.pop():
            handle.remove()


def repair_float64_attention(bridge: TransformerBridge) -> None:
    """Make a float64 bridge's attention exact: softmax in float64, no NaN from padding.

    TransformerLens's attention bridges (3.9 and 4.3 checked) reimplement attention and compute
    the softmax in float32 whatever the model dtype. In a float64 model that costs precision
    (logits about 1e-5 from Hugging Face's) and, with padding, NaN: the mask value
    ``finfo(float64).min`` becomes ``-inf`` in float32, so a query with no visible key (the
    leading pads of a left-padded row) gets a NaN pattern, and the NaN reaches the real tokens
    at the next layer through ``0 * NaN`` in ``pattern @ value``. For float64 bridges this
    recomputes the pattern at ``hook_pattern`` as the float64 softmax of what reached
    ``hook_attn_scores`` (after any hooks of yours there; your ``hook_pattern`` hooks see the
    exact pattern). It refuses with :class:`~tuco_lens.errors.UnsupportedVersionsError` if the
    bridge's own pattern is not a softmax of those scores. No-op for other dtypes and in training
    mode. Done once per model; the hooks stay (they also repair ``pair.ft(...)`` called directly).

    Example:
        >>> repair_float64_attention(pair.ft)   # done by tuco_lens for every bridge it touches
        >>> repair_float64_attention(pair.ft)   # once per model: a no-op now
    """
    if bridge in _FLOAT64_REPAIRED:
        return
    for module in bridge.modules():
        if isinstance(module, AttentionBridge) and hasattr(module, "hook_attn_scores") and hasattr(module, "hook_pattern"):
            module.register_forward_pre_hook(_exact_pattern_hooks)
            module.register_forward_hook(_remove_pattern_hooks, always_call=True)
    _FLOAT64_REPAIRED.add(bridge)


# --- HookedTransformer weights in the layout its forward pass reads --------------------------
_LAYOUT_DEPTH = "_tuco_lens_linear_layout_depth"


def _layout_plan(model: Any) -> list[tuple[torch.nn.Parameter, tuple[int, ...]]]:
    """``(parameter, order)``: the weights TransformerLens copies into ``parameter.permute(order)``
    (made contiguous) on every call, and that order."""
    cfg = model.cfg
    plan: list[tuple[torch.nn.Parameter, tuple[int, ...]]] = []
    if getattr(cfg, "load_in_4bit", False):
        return plan
    plain_attention = not (cfg.use_split_qkv_input or cfg.use_attn_in or cfg.use_attn_result)
    for module in model.modules():
        if isinstance(module, GatedMLP):  # F.linear(x, W.T.contiguous()) for each of the three
            plan += [(module.W_gate, (1, 0)), (module.W_in, (1, 0)), (module.W_out, (1, 0))]
        elif isinstance(module, Unembed):  # F.linear(x, W_U.T.contiguous(), b_U)
            plan.append((module.W_U, (1, 0)))
        elif isinstance(module, AbstractAttention) and plain_attention:
            # Q/K/V: "head d_model d_head -> (head d_head) d_model"; O: "... -> d_model (head d_head)"
            for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
                weight = module._parameters.get(name)
                if weight is not None:
                    plan.append((weight, (0, 2, 1)))
            plan.append((module.W_O, (2, 0, 1)))
    return plan


def _stored_as(weight: Tensor, order: tuple[int, ...]) -> Tensor:
    """``weight``'s values, stored so that ``weight.permute(order)`` is contiguous."""
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    return weight.permute(order).contiguous().permute(inverse)


@contextlib.contextmanager
def _hooked_linear_layout(model: Any) -> Iterator[None]:
    if getattr(model, _LAYOUT_DEPTH, 0):  # already inside: nothing to do
        setattr(model, _LAYOUT_DEPTH, getattr(model, _LAYOUT_DEPTH) + 1)
        try:
            yield
        finally:
            setattr(model, _LAYOUT_DEPTH, getattr(model, _LAYOUT_DEPTH) - 1)
        return
    plan = _layout_plan(model)
    # Outside inference mode, so the weights stay ordinary tensors after the call.
    with torch.inference_mode(False), torch.no_grad():
        for weight, order in plan:
            weight.data = _stored_as(weight.data, order)
    setattr(model, _LAYOUT_DEPTH, 1)
    try:
        yield
    finally:
        setattr(model, _LAYOUT_DEPTH, 0)
        with torch.inference_mode(False), torch.no_grad():
            for weight, _ in plan:
                weight.data = weight.data.contiguous()


@contextlib.contextmanager
def linear_layout(*models: Any) -> Iterator[None]:
    """Store the models' weights, for the duration, in the layout their forward pass reads.

    TransformerLens 3.9's ``HookedTransformer`` copies weights into the ``[out, in]`` layout of
    ``F.linear`` on every call (``W.T.contiguous()`` for each gated-MLP weight and the
    unembedding, a rearrange of ``W_Q``/``W_K``/``W_V``/``W_O`` in attention). One decoding
    step computes one token per row, so these copies cost more than the arithmetic: generation
    ran an order of magnitude slower than the Hugging Face model. Inside this context the
    weights are stored in that layout (same values, same shapes; only the strides change), so
    each copy is a no-op and the numbers are bit for bit the same. On exit the weights are
    contiguous again. Costs one copy of the weights on entry and one on exit: worth it for many
    forward passes (generation), not for one. Re-entrant; a no-op for a ``TransformerBridge``
    (Hugging Face layers read their weights in place). ``pair.generate`` uses it.

    Example:
        >>> with linear_layout(pair.pt, pair.ft), pair.scaled(1.0):
        ...     out = pair.ft.generate(tokens, max_new_tokens=12, verbose=False)
        >>> pair.tokenizer.decode(out[0, tokens.shape[1]:], skip_special_tokens=True)
        'i am sorry but i can not help with that .'
    """
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(backend_of(model).linear_layout())
        yield


def bridge_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    name: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    n_ctx: int | None = None,
    default_prepend_bos: bool | None = None,
) -> TransformerBridge:
    """Wrap a loaded Hugging Face causal LM in a ``TransformerBridge`` (no weight processing).

    The bridge takes ``hf_model`` over (its layers are wrapped in place): pass a model nobody
    else uses. Nothing is downloaded: the config comes from ``hf_model``, the tokenizer is the
    one given.

    Example:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> d = demo.FT_DIR
        >>> bridge = bridge_from_hf(AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d),
        ...                         name=str(d), device="cpu", dtype=torch.float32)
        >>> type(bridge).__name__, bridge.cfg.n_layers
        ('TransformerBridge', 4)
    """
    if tokenizer is None:
        raise TuCoError(
            f"a TransformerBridge needs a tokenizer and none was found for {name!r}: pass "
            "tokenizer=... (a tokenizer or a path) to load_model / load_pair."
        )
    origin = str(getattr(hf_model, "name_or_path", "") or "") or name
    if getattr(hf_model, "hf_device_map", None) is None:
        # boot_transformers uses a given hf_model where it is and only records ``device`` (by
        # default TransformerLens's choice) in the config: move the weights there first, so
        # that cfg.device is where they are.
        device = device if device is not None else get_device()
        hf_model.to(device)
    bridge = TransformerBridge.boot_transformers(
        origin, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, n_ctx=n_ctx
    )
    if default_prepend_bos is not None:
        bridge.cfg.default_prepend_bos = default_prepend_bos
    bridge.cfg.model_name = name
    bridge.eval()
    return bridge


def add_permanent_hook(hook_point: HookPoint, hook: Callable) -> None:
    """Add ``hook`` to a TransformerLens hook point so that ``model.reset_hooks()`` (which users
    call between experiments) leaves it in place; :func:`remove_permanent_hook` takes it off."""
    hook_point.add_hook(hook, dir="fwd", is_permanent=True)


def remove_permanent_hook(hook_point: HookPoint, hook: Callable) -> None:
    """Remove exactly the hook :func:`add_permanent_hook` added (TransformerLens removes permanent
    hooks only all at once, with ``including_permanent=True``, which would take other people's)."""
    for handle in [h for h in hook_point.fwd_hooks if h.user_hook is hook]:
        handle.hook.remove()
    hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if h.user_hook is not hook]


def backend_of(model: Any) -> Backend:
    """The :class:`Backend` of a ``HookedTransformer`` or ``TransformerBridge``.

    Raises:
        InputTypeError: ``model`` is neither.

    Example:
        >>> backend_of(pair.ft).name in ("HookedTransformer", "TransformerBridge")
        True
    """
    kind = model_kind(model)
    if kind == "HookedTransformer":
        return HookedBackend(model)
    if kind == "TransformerBridge":
        return BridgeBackend(model)
    raise InputTypeError(
        f"tuco_lens needs a TransformerLens HookedTransformer or TransformerBridge, got "
        f"{type(model).__name__}. Use tuco_lens.load_pair(...) to load names, directories or "
        "transformers models."
    )
