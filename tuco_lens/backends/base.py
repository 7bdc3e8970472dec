"""The interface every model class implements, and the state tuco_lens keeps about models.

:class:`Backend` declares every capability the rest of tuco_lens asks of a model class (hook
points, calling a pre-trained block the way its fine-tuned twin was called, paired KV caches,
sub-block calls, forward passes, weight processing); :mod:`tuco_lens.backends.hooked` and
:mod:`tuco_lens.backends.bridge` implement it. What tuco_lens remembers about other libraries'
objects (paired KV caches, processing flags, open contexts) lives in maps owned here, keyed by
those objects and dropped with them, never in attributes set on them.
"""

from __future__ import annotations

import abc
import contextlib
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tuco_lens.errors import TuCoError, UnsupportedVersionsError
from tuco_lens.versions import installed_versions, tested_versions

__all__ = [
    "Backend",
    "BlockCall",
    "LensModule",
    "Model",
    "ObjectMap",
    "PROCESSING_FLAGS",
    "add_permanent_hook",
    "paired_cache",
    "record_processing",
    "recorded_processing",
    "remove_permanent_hook",
]

if TYPE_CHECKING:  # the type checker runs with transformer-lens 3.x, which has both classes
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    Model: TypeAlias = HookedTransformer | TransformerBridge
else:
    Model = Any
"""A ``HookedTransformer`` (transformer-lens 3.x) or a ``TransformerBridge``: the model classes tuco_lens
works on (the one alias every module uses). Type checkers see the union (they run with
transformer-lens 3.x, which has both); at run time it is ``Any``, because ``HookedTransformer`` does
not exist on transformer-lens 4.x. :func:`~tuco_lens.backends.model_kind` tells which one an object is."""

_POST_ATTENTION_NORM = (
    "A norm follows the attention output in these blocks (e.g. Gemma 2's post-attention norm), so "
    "the attention output is not a sum of per-head terms: the per-head split is refused. The "
    "attention / MLP split works: pass heads=False (decompose, logit_attribution)."
)

LensModule: TypeAlias = Any
"""A TransformerLens module reached by attribute name: a block (``TransformerBlock`` or ``BlockBridge``), an
attention or norm bridge. ``Any`` to type checkers because ``nn.Module.__getattr__`` types every
sub-module and parameter as ``Tensor | Module``."""

#: The weight-processing flags of ``HookedTransformer.from_pretrained`` that tuco_lens tracks.
PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


class ObjectMap:
    """A map keyed by other libraries' objects, by identity, whose entries die with their keys.

    tuco_lens keeps what it knows about a model, a KV cache or a module here instead of in an
    attribute set on the object (a ``WeakKeyDictionary`` would need hashable keys, and
    TransformerLens's cache entries are unhashable dataclasses).

    Example:
        >>> notes = ObjectMap()
        >>> notes.setdefault(pair.ft, dict)["seen"] = True
        >>> notes.get(pair.ft), notes.get(pair.pt)
        ({'seen': True}, None)
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}
        self._lock = threading.Lock()

    def get(self, owner: object, default: Any = None) -> Any:
        """The value stored for ``owner`` (the very object), or ``default``."""
        entry = self._entries.get(id(owner))
        return entry[1] if entry is not None and entry[0]() is owner else default

    def setdefault(self, owner: object, make: Callable[[], Any]) -> Any:
        """The value stored for ``owner``; ``make()`` is stored first if there is none."""
        with self._lock:
            entry = self._entries.get(id(owner))
            if entry is None or entry[0]() is not owner:
                key = id(owner)
                entry = (weakref.ref(owner, lambda _, key=key: self._drop(key)), make())
                self._entries[key] = entry
            return entry[1]

    def set(self, owner: object, value: Any) -> None:
        """Store ``value`` for ``owner`` (replacing any)."""
        with self._lock:
            key = id(owner)
            self._entries[key] = (weakref.ref(owner, lambda _, key=key: self._drop(key)), value)

    def pop(self, owner: object, default: Any = None) -> Any:
        """Remove and return the value stored for ``owner``, or ``default``."""
        with self._lock:
            entry = self._entries.get(id(owner))
            if entry is None or entry[0]() is not owner:
                return default
            del self._entries[id(owner)]
            return entry[1]

    def _drop(self, key: int) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is None:
            del self._entries[key]


#: The pre-trained KV caches paired with each fine-tuned one: ``{context key: pre-trained cache}``.
_PAIRED_CACHES = ObjectMap()


#: The processing flags that took effect when tuco_lens loaded a model (``load_model``).
_PROCESSING = ObjectMap()


def record_processing(model: Any, flags: Mapping[str, bool | None]) -> None:
    """Remember how tuco_lens processed ``model``'s weights (read by :func:`recorded_processing`)."""
    _PROCESSING.set(model, dict(flags))


def recorded_processing(model: Any) -> dict[str, bool | None] | None:
    """The processing flags recorded for ``model`` by :func:`record_processing`, or None.

    Example:
        >>> recorded_processing(pair.ft)["fold_ln"]   # tuco_lens loads models unprocessed
        False
    """
    flags = _PROCESSING.get(model)
    return None if flags is None else dict(flags)


def paired_cache(owner: Any, key: int, make: Callable[[], Any] | None = None) -> Any:
    """The pre-trained cache paired with fine-tuned cache ``owner`` in the context ``key``.

    With ``make``, one is created (``make()``) when there is none yet.
    """
    store = _PAIRED_CACHES.setdefault(owner, dict)
    if key not in store and make is not None:
        store[key] = make()
    return store[key]


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


class Backend(abc.ABC):
    """What tuco_lens needs to know about one model class (see the module docstring)."""

    #: The model class, as TransformerLens names it: ``"HookedTransformer"`` or ``"TransformerBridge"``.
    name = ""
    #: The ``backend=`` value of ``load_model`` / ``load_pair`` that builds this class: ``"hooked"`` or ``"bridge"``.
    kind = ""

    def __init__(self, model: Any):
        self.model = model

    # -- weights and configuration --------------------------------------------------
    @abc.abstractmethod
    def processing(self) -> dict[str, bool | None]:
        """How the weights were processed, inferred from the model (keys :data:`PROCESSING_FLAGS`).

        ``True``/``False`` where the model shows it, ``None`` where it cannot be known.
        """

    def config_differences(self, other: Backend) -> list[tuple[str, Any, Any]]:
        """``(setting, this model's value, other's value)`` for each setting beyond TransformerLens's
        config that changes what a block computes and differs between the two models."""
        return []

    # -- structure --------------------------------------------------------------
    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The model's blocks, in order."""
        return self.model.blocks

    @property
    def token_embedding(self) -> torch.nn.Module:
        """The module that turns token ids (its first argument) into ``hook_embed``'s input."""
        return self.model.embed

    @abc.abstractmethod
    def resid_pre(self, block: LensModule) -> HookPoint:
        """The hook point whose output is the stream the block consumes."""

    @abc.abstractmethod
    def resid_post(self, block: LensModule) -> HookPoint:
        """The hook point whose output is the block's output stream."""

    def block_output(self, output: Any) -> Tensor:
        """The residual stream in what a block's ``forward`` returned."""
        return output[0] if isinstance(output, tuple) else output

    @abc.abstractmethod
    def input_device(self) -> torch.device:
        """Where token ids must live for a forward pass (the embedding's device)."""

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
    @abc.abstractmethod
    def check_call(self, layer: int, call: BlockCall, key: int) -> None:
        """Validate a recorded call (e.g. that the paired pre-trained KV cache is in step)."""

    @abc.abstractmethod
    def call_pt_block(self, block: LensModule, layer: int, call: BlockCall, x: Tensor, key: int) -> Tensor:
        """Run pre-trained ``block`` on ``x`` the way the fine-tuned twin was called."""

    def call_pt_block_at_last_token(self, block: LensModule, call: BlockCall, x: Tensor) -> Tensor:
        """A block's output at the last position only (``[batch, 1, d_model]``), reading keys and
        values at every position; rows must be left padded. Only called where
        :meth:`supports_last_token_path` is True."""
        raise TuCoError(f"{self.name} models have no last-token path.")

    @abc.abstractmethod
    def hook_function_refusal(self) -> str | None:
        """Why plain hook functions ``fn(tensor, hook)`` cannot call the pre-trained blocks the way the
        fine-tuned ones were called (``tuco_lens.hooks.alpha_hooks``), or None if they can."""

    @abc.abstractmethod
    def check_cache_advanced(self, layer: int, call: BlockCall, key: int) -> None:
        """After both blocks of ``layer`` ran: their KV caches grew by the call's positions.

        A cache that did not grow means the attention modules never saw it, so every later
        step would attend to itself alone: a silently wrong generation. Raises
        :class:`~tuco_lens.errors.UnsupportedVersionsError` instead.
        """

    @abc.abstractmethod
    def block_calls(self, tokens: Tensor, attention_mask: Tensor) -> list[BlockCall]:
        """How each block would be called on ``tokens`` (no KV cache), without running them.

        Used to run the pre-trained blocks on cached fine-tuned activations.
        """

    # -- inside a block (the component split: docs/components.md) -----------------
    @abc.abstractmethod
    def is_parallel(self, block: LensModule) -> bool:
        """Whether attention and MLP both read the block input (GPT-NeoX parallel residual)."""

    @abc.abstractmethod
    def resid_mid(self, block: LensModule) -> HookPoint:
        """Sequential blocks: the hook point whose output is ``y = x + A(x)``, the MLP's input."""

    @abc.abstractmethod
    def mid_edit_reaches_residual(self) -> bool:
        """Whether a value returned by a :meth:`resid_mid` hook is also the block's residual.

        True for HookedTransformer (``resid_post = resid_mid + mlp_out`` reads the hook's output);
        False for a bridge, whose ``hook_resid_mid`` is the MLP norm's input while the Hugging Face
        layer keeps its own residual.
        """

    @abc.abstractmethod
    def attn_out(self, block: LensModule) -> HookPoint:
        """The hook point whose output is ``A(x)``, what attention adds to the stream."""

    @abc.abstractmethod
    def hook_z(self, block: LensModule) -> HookPoint:
        """The hook point whose output holds every head's ``z`` (the output projection's input)."""

    def heads_of(self, z: Tensor) -> Float[Tensor, "batch pos head d_head"]:
        """``z`` as seen by a raw forward hook on :meth:`hook_z`, one slice per query head."""
        return z

    @abc.abstractmethod
    def head_weights(self, block: LensModule) -> tuple[Float[Tensor, "head d_head d_model"], Tensor | None]:
        """``(W_O per head, b_O or None)``: ``A(x) = Σ_h z_h W_O[h] + b_O``.

        Raises:
            TuCoError: a norm follows the attention output (Gemma 2), so ``A(x)`` is not a sum of
                per-head terms.
        """

    @abc.abstractmethod
    def call_mlp(self, block: LensModule, y: Tensor) -> Tensor:
        """``M(y)``: the block's MLP sub-block, with its norms, on ``y`` (without the residual)."""

    @abc.abstractmethod
    def final_norm(self) -> torch.nn.Module:
        """The final norm module (applied to the last residual stream before the unembedding)."""

    @abc.abstractmethod
    def unembedding(self) -> tuple[Float[Tensor, "d_model d_vocab"], Tensor | None]:
        """``(W_U, b_U or None)``: ``logits = final_norm(x_L) @ W_U + b_U``."""

    # -- forward passes -----------------------------------------------------------
    @overload
    def forward(
        self, tokens: Tensor, attention_mask: Tensor, *, logits: Literal[False], cache: Any = None
    ) -> None: ...
    @overload
    def forward(
        self, tokens: Tensor, attention_mask: Tensor, *, logits: Literal[True, "last"] = True, cache: Any = None
    ) -> Tensor: ...
    @abc.abstractmethod
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

    @abc.abstractmethod
    def new_generation_cache(self, batch_size: int) -> Any:
        """An empty KV cache for :meth:`forward` during generation."""

    def final_residual(self, tokens: Tensor, attention_mask: Tensor) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after the last block, before the final norm (``x_L``).

        One forward pass that stops at the last block's ``hook_resid_post`` (no final norm, no
        unembedding), on either model class.
        """
        return self._forward_until(self.resid_post(self.blocks[-1]), tokens, attention_mask, before=False)

    def _forward_until(self, module: LensModule, tokens: Tensor, attention_mask: Tensor, *, before: bool) -> Any:
        """Run a forward pass until ``module`` is reached and stop it there.

        Returns what ``module`` was called with, ``(args, kwargs)``, for ``before=True``, or what it
        returned for ``before=False``; nothing after it runs.
        """
        seen: list[Any] = []

        class _Reached(Exception):
            pass

        def stop_before(module: LensModule, args: tuple, kwargs: dict) -> None:
            seen.append((args, kwargs))
            raise _Reached

        def stop_after(module: LensModule, args: tuple, output: Any) -> None:
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


def _check_grown(layer: int, call: BlockCall, ft_lengths: list[int], pt_lengths: list[int]) -> None:
    """Raise if a KV cache did not grow by the positions of ``call`` (see ``check_cache_advanced``)."""
    assert call.x is not None  # check_cache_advanced returns first for a call that never ran
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
