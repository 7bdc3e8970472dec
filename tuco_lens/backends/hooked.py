"""The ``HookedTransformer`` backend (transformer-lens 3.x): TransformerLens's own blocks and KV cache.

With transformer-lens 4.x installed, :data:`HookedTransformer` is ``None`` here and
:data:`HAS_HOOKED_TRANSFORMER` False: everything goes through :mod:`tuco_lens.backends.bridge`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tuco_lens.backends.base import (
    _POST_ATTENTION_NORM,
    Backend,
    BlockCall,
    LensModule,
    ObjectMap,
    _check_grown,
    paired_cache,
)
from tuco_lens.errors import TuCoError

if TYPE_CHECKING:  # the type checker runs with transformer-lens 3.x (the lint environment)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
    from transformer_lens.components.abstract_attention import AbstractAttention
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.components.unembed import Unembed
else:
    try:  # transformer-lens 3.x; removed in 4.0
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens import loading_from_pretrained as tl_loading
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
        from transformer_lens.components.abstract_attention import AbstractAttention
        from transformer_lens.components.mlps.gated_mlp import GatedMLP
        from transformer_lens.components.unembed import Unembed
    except ImportError:  # pragma: no cover - exercised by the transformer-lens 4.x CI job
        AbstractAttention = None
        GatedMLP = None
        Unembed = None
        HookedTransformer = None
        HookedTransformerConfig = None
        tl_loading = None
        TransformerLensKeyValueCache = None
        TransformerLensKeyValueCacheEntry = None

__all__ = [
    "HAS_HOOKED_TRANSFORMER",
    "HookedBackend",
    "HookedTransformer",
    "HookedTransformerConfig",
    "tl_loading",
]

#: True when the installed transformer-lens still has ``HookedTransformer`` (3.x).
HAS_HOOKED_TRANSFORMER = HookedTransformer is not None
# A mean over n entries of an uncentred matrix is ~std/sqrt(n); a centred one is ~0 up to
# rounding (< 1% of that even in bfloat16). Everything below this fraction counts as centred.
_CENTRED_FRACTION = 0.05


def _is_centred(matrix: torch.Tensor) -> bool | None:
    """Whether every row of ``matrix`` has mean ~0 (along the last dimension); None if unknown."""
    if matrix.is_meta:
        return None
    matrix = matrix.detach().float()
    row_means = matrix.mean(-1).abs()
    threshold = _CENTRED_FRACTION * matrix.std() / matrix.shape[-1] ** 0.5
    return bool((row_means <= threshold).all())


class HookedBackend(Backend):
    """TransformerLens's ``HookedTransformer`` (transformer-lens 3.x)."""

    name = "HookedTransformer"
    kind = "hooked"

    def processing(self) -> dict[str, bool | None]:
        """``fold_ln`` from ``cfg.normalization_type`` (``"LNPre"`` / ``"RMSPre"`` mean folded),
        centering from the weights themselves (rows of ``W_E`` / ``W_U`` with zero mean), and
        ``fold_value_biases`` ``None`` (unknown) unless the model has nonzero value biases. A flag
        that cannot change anything for this model (centering writes on an RMSNorm model, folding
        biases that are all zero) is ``False``."""
        cfg = self.model.cfg
        norm = cfg.normalization_type
        layer_norm = norm in ("LN", "LNPre") and not getattr(cfg, "final_rms", False)
        b_V, b_O = self.model.b_V, self.model.b_O
        fold_value_biases: bool | None
        if b_V.is_meta:  # weights not materialised: nothing to infer from
            fold_value_biases = None
        elif b_V.abs().max() > 0:
            fold_value_biases = False
        elif b_O.abs().max() > 0:
            fold_value_biases = None  # folded, or a model with output biases only
        else:
            fold_value_biases = False
        return {
            "fold_ln": norm in ("LNPre", "RMSPre"),
            "center_writing_weights": _is_centred(self.model.W_E) if layer_norm else False,
            "center_unembed": _is_centred(self.model.W_U),
            "fold_value_biases": fold_value_biases,
        }

    def resid_pre(self, block: LensModule) -> HookPoint:
        return block.hook_resid_pre

    def resid_post(self, block: LensModule) -> HookPoint:
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

        pt_entry = paired_cache(entry, key, make)
        if pt_entry.past_keys.shape[1] != n_ft:
            raise TuCoError(
                f"The pre-trained KV cache of block {layer} is out of step with the fine-tuned "
                f"one ({pt_entry.past_keys.shape[1]} vs {n_ft} positions)."
            )
        pt_entry.frozen = entry.frozen
        call.cache_lengths = [n_ft]

    def hook_function_refusal(self) -> str | None:
        if self.model.cfg.positional_embedding_type == "shortformer":
            return "hook functions cannot pass shortformer positional embeddings to the pre-trained blocks."
        return None

    def check_cache_advanced(self, layer: int, call: BlockCall, key: int) -> None:
        entry = call.kwargs.get("past_kv_cache_entry")
        if entry is None or entry.frozen or call.x is None:
            return
        pt_entry = paired_cache(entry, key)
        _check_grown(layer, call, [entry.past_keys.shape[1]], [pt_entry.past_keys.shape[1]])

    def call_pt_block(self, block: LensModule, layer: int, call: BlockCall, x: Tensor, key: int) -> Tensor:
        device = x.device
        entry = call.kwargs.get("past_kv_cache_entry")
        spe = call.kwargs.get("shortformer_pos_embed")
        mask = call.kwargs.get("attention_mask")
        return block(
            x,
            shortformer_pos_embed=None if spe is None else spe.to(device),
            past_kv_cache_entry=None if entry is None else paired_cache(entry, key),
            attention_mask=None if mask is None else mask.to(device),
        )

    def call_pt_block_at_last_token(self, block: LensModule, call: BlockCall, x: Tensor) -> Tensor:
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

    def is_parallel(self, block: LensModule) -> bool:
        return bool(self.model.cfg.parallel_attn_mlp)

    def _check_sublayers(self) -> None:
        cfg = self.model.cfg
        if cfg.attn_only or str(cfg.original_architecture or "").startswith("Olmo"):
            raise TuCoError(
                f"The component split needs blocks with one attention and one MLP sub-block in "
                f"pre-norm order; {cfg.original_architecture or cfg.model_name} has "
                f"{'no MLP' if cfg.attn_only else 'post-norm blocks'}."
            )

    def resid_mid(self, block: LensModule) -> HookPoint:
        self._check_sublayers()
        return block.hook_resid_mid

    def mid_edit_reaches_residual(self) -> bool:
        return True

    def attn_out(self, block: LensModule) -> HookPoint:
        self._check_sublayers()
        return block.hook_attn_out

    def hook_z(self, block: LensModule) -> HookPoint:
        return block.attn.hook_z

    def head_weights(self, block: LensModule) -> tuple[Tensor, Tensor | None]:
        if self.model.cfg.use_normalization_before_and_after:
            raise TuCoError(_POST_ATTENTION_NORM)
        return block.attn.W_O, block.attn.b_O

    def call_mlp(self, block: LensModule, y: Tensor) -> Tensor:
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


# --- HookedTransformer weights in the layout its forward pass reads --------------------------
#: Per model inside :func:`~tuco_lens.backends.linear_layout` contexts: ``(open contexts, layout plan)``.
_LAYOUT_DEPTH = ObjectMap()
_LAYOUT_LOCK = threading.Lock()


def _layout_plan(model: Any) -> list[tuple[Tensor, tuple[int, ...]]]:
    """``(parameter, order)``: the weights TransformerLens copies into ``parameter.permute(order)``
    (made contiguous) on every call, and that order."""
    cfg = model.cfg
    plan: list[tuple[Tensor, tuple[int, ...]]] = []
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
    """The weights in the forward pass's layout while any context (of any thread) is open on ``model``:
    the first to enter stores them so, the last to leave makes them contiguous again."""
    with _LAYOUT_LOCK:
        depth, plan = _LAYOUT_DEPTH.get(model, (0, None))
        if not depth:
            plan = _layout_plan(model)
            # Outside inference mode, so the weights stay ordinary tensors after the call.
            with torch.inference_mode(False), torch.no_grad():
                for weight, order in plan:
                    weight.data = _stored_as(weight.data, order)
        _LAYOUT_DEPTH.set(model, (depth + 1, plan))
    try:
        yield
    finally:
        with _LAYOUT_LOCK:
            depth, plan = _LAYOUT_DEPTH.get(model)
            if depth > 1:
                _LAYOUT_DEPTH.set(model, (depth - 1, plan))
            else:
                _LAYOUT_DEPTH.pop(model)
                with torch.inference_mode(False), torch.no_grad():
                    for weight, _ in plan:
                        weight.data = weight.data.contiguous()
