"""Every TransformerLens call of tuco_lens, for both of its model classes.

tuco_lens runs on two kinds of TransformerLens model:

* ``HookedTransformer`` (transformer-lens 3.x): TransformerLens's own re-implementation of the
  blocks, with its own KV cache (one ``TransformerLensKeyValueCacheEntry`` per block);
* ``TransformerBridge`` (transformer-lens 3.9 and the only model class of 4.x): the Hugging Face
  model itself, its decoder layers wrapped in ``BlockBridge`` modules with hook points, and the
  Hugging Face ``Cache`` object shared by all layers.

The rest of the package asks this package, through :func:`backend_of`, for the few things that
differ (the :class:`~tuco_lens.backends.base.Backend` interface declares them all): where a block's ``hook_resid_pre``/``hook_resid_post`` live, how to call a pre-trained
block on the fine-tuned stream with the fine-tuned call's mask and positions, how to give the
pre-trained blocks a KV cache paired with the fine-tuned one, and how to run a forward pass.
With transformer-lens 4.x installed, ``HookedTransformer`` is ``None`` here and everything goes
through the bridge. Only this package knows which model class it holds:

* :mod:`~tuco_lens.backends.base`: the :class:`Backend` interface, :class:`BlockCall`, the
  :data:`Model` alias, and the maps where tuco_lens keeps state about other libraries' objects;
* :mod:`~tuco_lens.backends.hooked`: :class:`HookedBackend`;
* :mod:`~tuco_lens.backends.bridge`: :class:`BridgeBackend` and the bridge repairs.

Example:
    >>> backend = backend_of(pair.ft)
    >>> backend.name in ("HookedTransformer", "TransformerBridge")
    True
    >>> backend.resid_pre(pair.ft.blocks[0]).name   # hook_resid_pre, or a bridge's hook_in
    'blocks.0.hook_...'
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.logits_utils import sample_logits

from tuco_lens.backends.base import (
    PROCESSING_FLAGS,
    Backend,
    BlockCall,
    Model,
    ObjectMap,
    add_permanent_hook,
    record_processing,
    recorded_processing,
    remove_permanent_hook,
)
from tuco_lens.backends.bridge import (
    BridgeBackend,
    TransformerBridge,
    bridge_from_hf,
    repair_cache_keyword,
    repair_float64_attention,
)
from tuco_lens.backends.hooked import (
    HAS_HOOKED_TRANSFORMER,
    HookedBackend,
    HookedTransformer,
    HookedTransformerConfig,
    tl_loading,
)
from tuco_lens.errors import InputTypeError

__all__ = [
    "HAS_HOOKED_TRANSFORMER",
    "PROCESSING_FLAGS",
    "ActivationCache",
    "Backend",
    "BlockCall",
    "BridgeBackend",
    "HookPoint",
    "HookedBackend",
    "HookedTransformer",
    "HookedTransformerConfig",
    "Model",
    "ObjectMap",
    "TransformerBridge",
    "add_permanent_hook",
    "backend_of",
    "bridge_from_hf",
    "is_model",
    "linear_layout",
    "model_kind",
    "native_modules",
    "record_processing",
    "recorded_processing",
    "remove_permanent_hook",
    "repair_cache_keyword",
    "repair_float64_attention",
    "sample_logits",
    "tl_loading",
]


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


def is_model(obj: Any) -> bool:
    """Whether ``obj`` is a model tuco_lens runs on (a ``HookedTransformer`` or ``TransformerBridge``).

    Example:
        >>> is_model(pair.ft), is_model("gpt2")
        (True, False)
    """
    return model_kind(obj) is not None


def backend_of(model: Any, *, role: str | None = None) -> Backend:
    """The :class:`Backend` of a ``HookedTransformer`` or ``TransformerBridge``.

    Args:
        model: The model.
        role: What the caller calls it (``"TuCoPair(pt=...)"``), for the error message.

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
        f"{role or 'tuco_lens'} needs a TransformerLens HookedTransformer or TransformerBridge, got "
        f"{type(model).__name__}. Use tuco_lens.load_pair(...) to load names, directories or "
        "transformers models."
    )


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
