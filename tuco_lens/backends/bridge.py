"""The ``TransformerBridge`` backend: Hugging Face decoder layers wrapped with hook points.

The only model class of transformer-lens 4.x (also in 3.9). Besides :class:`BridgeBackend`, the
repairs tuco_lens applies to every bridge it touches (:func:`repair_cache_keyword`,
:func:`repair_float64_attention`), Hugging Face's own attention and norms where no hook needs
more (:func:`native_modules`' bridge half), and :func:`bridge_from_hf`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components import AttentionBridge
from transformer_lens.utilities.devices import get_device

from tuco_lens.backends.base import (
    _POST_ATTENTION_NORM,
    PROCESSING_FLAGS,
    Backend,
    BlockCall,
    LensModule,
    ObjectMap,
    _check_grown,
    paired_cache,
)
from tuco_lens.errors import TuCoError, UnsupportedVersionsError
from tuco_lens.versions import installed_versions

__all__ = [
    "HF_COMPUTE_KEYS",
    "BridgeBackend",
    "TransformerBridge",
    "bridge_from_hf",
    "repair_cache_keyword",
    "repair_float64_attention",
]

# TransformerBridge classes whose sub-modules the component split calls (standard blocks).
_SPLIT_MODULES = (
    "BlockBridge", "ParallelBlockBridge", "AttentionBridge", "PositionEmbeddingsAttentionBridge",
    "JointQKVAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge",
)
# Hugging Face config entries that change what a TransformerBridge layer computes (positions,
# norms, activations, attention variants) beyond the TransformerLens config fields.
HF_COMPUTE_KEYS = (
    "model_type", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "rotary_pct", "rotary_emb_base", "sliding_window", "layer_types", "rms_norm_eps",
    "layer_norm_eps", "layer_norm_epsilon", "hidden_act", "activation_function",
    "attention_bias", "mlp_bias", "head_dim", "use_parallel_residual", "query_pre_attn_scalar",
    "attn_logit_softcapping", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
)


class BridgeBackend(Backend):
    """TransformerLens's ``TransformerBridge``: Hugging Face decoder layers with hook points.

    A pre-trained layer is called with the fine-tuned layer's own arguments (attention mask,
    rotary position embeddings, position ids, ...), with the stream replaced by ``x`` and any
    Hugging Face ``Cache`` replaced by a cache of the pre-trained layers, created empty alongside
    the fine-tuned one and updated by the same calls, so the two stay in step.
    """

    name = "TransformerBridge"
    kind = "bridge"

    def __init__(self, model: Any):
        super().__init__(model)
        repair_cache_keyword(model)
        repair_float64_attention(model)

    def resid_pre(self, block: LensModule) -> HookPoint:
        return block.hook_in

    def resid_post(self, block: LensModule) -> HookPoint:
        return block.hook_out

    def input_device(self) -> torch.device:
        return self.model.embed.original_component.weight.device

    def _hf_config(self) -> Any:
        return self.model.original_model.config

    def processing(self) -> dict[str, bool | None]:
        """A bridge runs the Hugging Face weights unprocessed unless ``enable_compatibility_mode``
        processed them (then which flags is unknown: ``None``)."""
        processed = bool(getattr(self.model, "compatibility_mode", False))
        return {flag: None if processed else False for flag in PROCESSING_FLAGS}

    def config_differences(self, other: Backend) -> list[tuple[str, Any, Any]]:
        """The Hugging Face config entries of :data:`HF_COMPUTE_KEYS`, and compatibility mode."""
        if not isinstance(other, BridgeBackend):
            return []
        mine, theirs = self._hf_config(), other._hf_config()
        found = [(key, getattr(mine, key, None), getattr(theirs, key, None)) for key in HF_COMPUTE_KEYS]
        modes = [bool(getattr(model, "compatibility_mode", False)) for model in (self.model, other.model)]
        found.append(("compatibility_mode", modes[0], modes[1]))
        return [(key, a, b) for key, a, b in found if a != b]

    def device_map(self) -> dict[str, Any] | None:
        return getattr(self.model.original_model, "hf_device_map", None)

    def _mapped_model(self) -> torch.nn.Module:
        return self.model.original_model

    def check_call(self, layer: int, call: BlockCall, key: int) -> None:
        for ft_cache in _caches_in(call):
            n_ft = ft_cache.get_seq_length(layer)

            def make(ft_cache: Any = ft_cache, n_ft: int = n_ft) -> Any:  # bound now: paired_cache calls it at once
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

            pt_cache = paired_cache(ft_cache, key, make)
            if pt_cache.get_seq_length(layer) != n_ft:
                raise TuCoError(
                    f"The pre-trained KV cache of layer {layer} is out of step with the fine-tuned "
                    f"one ({pt_cache.get_seq_length(layer)} vs {n_ft} positions)."
                )
        call.cache_lengths = [c.get_seq_length(layer) for c in _caches_in(call)]

    def hook_function_refusal(self) -> str | None:
        return (
            "it needs HookedTransformers: a TransformerBridge layer's mask and position embeddings "
            "are not visible to hook functions (`pair.scaled` composes with run_with_hooks and run_with_cache)."
        )

    def check_cache_advanced(self, layer: int, call: BlockCall, key: int) -> None:
        caches = _caches_in(call)
        if not caches or call.x is None:
            return
        ft_lengths = [c.get_seq_length(layer) for c in caches]
        pt_lengths = [paired_cache(c, key).get_seq_length(layer) for c in caches]
        _check_grown(layer, call, ft_lengths, pt_lengths)

    def call_pt_block(self, block: LensModule, layer: int, call: BlockCall, x: Tensor, key: int) -> Tensor:
        device = x.device

        def swap(value: Any) -> Any:
            if isinstance(value, transformers.Cache):
                return paired_cache(value, key)
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

    def call_pt_block_at_last_token(self, block: LensModule, call: BlockCall, x: Tensor) -> Tensor:
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
        if arguments is None or cache_name is None:
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

    def is_parallel(self, block: LensModule) -> bool:
        return "hook_resid_mid" not in block.hook_aliases

    def _sub(self, module: LensModule, name: str) -> LensModule:
        """A bridge sub-module (``ln2``, ``mlp``, ``attn``, ``o``) of a standard block."""
        found = getattr(module, name, None)
        if found is None or type(module).__name__ not in _SPLIT_MODULES:
            raise TuCoError(
                f"The component split needs blocks with one attention and one MLP sub-block; "
                f"{type(module).__name__} of {self._hf_config().model_type} has no {name!r} "
                "sub-module tuco_lens knows how to call."
            )
        return found

    def resid_mid(self, block: LensModule) -> HookPoint:
        return self._sub(block, "ln2").hook_in

    def mid_edit_reaches_residual(self) -> bool:
        return False

    def attn_out(self, block: LensModule) -> HookPoint:
        post = getattr(block, "ln1_post", None)
        return (post if post is not None else self._sub(block, "attn")).hook_out

    def hook_z(self, block: LensModule) -> HookPoint:
        return self._sub(self._sub(block, "attn"), "o").hook_in

    def heads_of(self, z: Tensor) -> Tensor:
        n_heads = self.model.cfg.n_heads
        return z.reshape(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)

    def head_weights(self, block: LensModule) -> tuple[Tensor, Tensor | None]:
        if getattr(block, "ln1_post", None) is not None:
            raise TuCoError(_POST_ATTENTION_NORM)
        proj = self._sub(self._sub(block, "attn"), "o").original_component
        weight = proj.weight if isinstance(proj, transformers.Conv1D) else proj.weight.T  # [h*d_head, d_model]
        n_heads = self.model.cfg.n_heads
        return weight.reshape(n_heads, weight.shape[0] // n_heads, weight.shape[1]), proj.bias

    def call_mlp(self, block: LensModule, y: Tensor) -> Tensor:
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


def _cache_as_past_key_values(module: LensModule, args: tuple, kwargs: dict) -> tuple | None:
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
    def install(attention: AttentionBridge) -> None:
        attention.register_forward_pre_hook(_cache_as_past_key_values, with_kwargs=True)

    _repair_once(bridge, _REPAIRED, install)


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


def _layer_arguments(block: LensModule, call: BlockCall) -> dict[str, Any] | None:
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
#: Per bridge inside a :func:`~tuco_lens.backends.native_modules` context: its :class:`_NativeState`.
_NATIVE_STATE = ObjectMap()
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


def _has_hooks(module: LensModule) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _bridge_only_points(module: LensModule) -> list[HookPoint]:
    """Hook points of a bridge module that the wrapped Hugging Face module's forward does not fire.

    The Hugging Face module calls its own sub-modules (for Llama-style attention the bridge's
    ``q``/``k``/``v``/``o`` projections, hook points included) but none of the bridge's internal
    hook points (``hook_attn_scores``, ``hook_pattern``, ``hook_rot_q``, ``hook_scale``, ...);
    fused-QKV models (GPT-2) also skip the bridge's split ``q``/``k``/``v``/``o``.
    """
    reached = {id(m) for m in module.original_component.modules()}
    reached |= {id(module.hook_in), id(module.hook_out)}
    return [m for m in module.modules() if isinstance(m, HookPoint) and id(m) not in reached]


def _native_allowed(module: LensModule, state: _NativeState) -> bool:
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


def _dispatching_forward(module: LensModule, state: _NativeState) -> Callable:
    """The module's ``forward`` inside the context: the Hugging Face module's, or the bridge's."""
    bridge = type(module).forward.__get__(module)
    wrapped = module.original_component
    if type(module).__name__ in _NATIVE_NORMS:

        def norm_forward(hidden_states: Tensor, **kwargs: Any) -> Tensor:
            if not _native_allowed(module, state):
                return bridge(hidden_states, **kwargs)
            return module.hook_out(wrapped(module.hook_in(hidden_states), **kwargs))

        return norm_forward
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
        state = _NATIVE_STATE.get(model)
        if state is None:
            modules = [
                m for m in model.modules()
                if type(m).__name__ in _NATIVE_ATTENTION + _NATIVE_NORMS and "forward" not in m.__dict__
                and getattr(m, "original_component", None) is not None
            ]
            state = _NativeState({}, {m: _bridge_only_points(m) for m in modules})
            for module in modules:  # not setattr: a bridge passes that on to the wrapped module
                module.__dict__["forward"] = _dispatching_forward(module, state)
            _NATIVE_STATE.set(model, state)
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
                _NATIVE_STATE.pop(model)


# --- float64 attention on TransformerBridge --------------------------------------------------
_FLOAT64_REPAIRED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
#: Per attention bridge: a stack of the float64 pattern hooks of the calls under way.
_FLOAT64_HANDLES = ObjectMap()
#: How far the bridge's own (float32) softmax may be from the float64 one where it is finite.
_FLOAT32_SOFTMAX_TOLERANCE = 1e-4


def _float64_softmax(scores: Tensor) -> Tensor:
    """Softmax over keys in float64; a query with no visible key (all ``-inf``) gets zeros."""
    fully_masked = torch.isneginf(scores).all(dim=-1, keepdim=True)
    pattern = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=-1)
    return pattern.masked_fill(fully_masked, 0.0)


def _exact_pattern_hooks(attention: LensModule, args: tuple) -> None:
    """Forward pre-hook of an attention bridge: for this call, recompute its pattern in float64."""
    parameter = next(attention.parameters(), None)
    if attention.training or parameter is None or parameter.dtype != torch.float64:
        return
    scores: list[Tensor] = []

    def keep_scores(module: LensModule, inputs: tuple, output: Tensor) -> None:
        scores.append(output)

    def exact_pattern(module: LensModule, inputs: tuple, output: Tensor) -> Tensor | None:
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
    _FLOAT64_HANDLES.setdefault(attention, list).append(handles)


def _remove_pattern_hooks(attention: LensModule, args: tuple, output: Any) -> None:
    """Forward hook of an attention bridge (also after an error): drop this call's hooks."""
    stack = _FLOAT64_HANDLES.get(attention)
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
    def install(attention: AttentionBridge) -> None:
        if hasattr(attention, "hook_attn_scores") and hasattr(attention, "hook_pattern"):
            attention.register_forward_pre_hook(_exact_pattern_hooks)
            attention.register_forward_hook(_remove_pattern_hooks, always_call=True)

    _repair_once(bridge, _FLOAT64_REPAIRED, install)


def _repair_once(bridge: TransformerBridge, done: weakref.WeakSet, install: Callable[[AttentionBridge], None]) -> None:
    """Run ``install`` on every attention bridge of ``bridge``, once per model (``done`` remembers)."""
    if bridge in done:
        return
    for module in bridge.modules():
        if isinstance(module, AttentionBridge):
            install(module)
    done.add(bridge)


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
