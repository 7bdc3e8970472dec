"""Running each pre-trained block on the input of its fine-tuned twin, inside a forward pass.

:class:`PairedBlocks` is the one mechanism behind the decomposition and α-scaling. While it
is active, every forward pass of the fine-tuned model (``ft(...)``, ``run_with_cache``,
``run_with_hooks``, ``generate`` with or without the KV cache) does, at each block ``l``:

1. a torch forward pre-hook on ``ft.blocks[l]`` records the block's keyword arguments
   (``attention_mask``, ``shortformer_pos_embed``, ``past_kv_cache_entry``) and adds a
   one-shot reader as the **last** hook of ``blocks.{l}.hook_resid_pre``, so ``x_l`` is what
   the fine-tuned block really consumes, after any hooks of yours;
2. the pre-trained block ``pt.blocks[l]`` is called on ``x_l`` with the same mask and
   positional information; with a KV cache it gets its own cache entry, built on the same
   stream and kept in step with the fine-tuned entry (attached to it);
3. ``on_layer(l, x_l, pt_post, ft_post)`` receives both outputs. In read mode it observes
   the final block output; in write mode it runs as a TransformerLens hook on
   ``blocks.{l}.hook_resid_post`` and its return value replaces the stream.

Hook order in write mode (α-scaling): hooks on ``blocks.{l}.hook_resid_post`` registered
**before** entering see, and may edit, the fine-tuned block output (they count as part of
the fine-tuned block); hooks registered **inside** the context (``run_with_hooks``,
``run_with_cache``) run after the scaling and see the scaled stream. Hooks on
``hook_resid_pre`` always run before tuco_lens reads ``x_l``. Every hook tuco_lens adds is
removed on exit, even after an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.hook_points import HookPoint

from tuco_lens.errors import AlphaError, TuCoError

__all__ = [
    "PairedBlocks",
    "LayerFn",
    "check_alpha",
    "alpha_mixer",
    "alpha_hooks",
    "supports_last_token_path",
    "pt_block_at_last_token",
    "placed",
]

LayerFn = Callable[[int, Tensor, Tensor, Tensor], Tensor | None]
"""``on_layer(layer, resid_pre, pt_resid_post, ft_resid_post) -> new resid_post | None``."""

_ACTIVE = "_tuco_lens_paired_blocks"
_PT_ENTRIES = "_tuco_lens_pt_entries"


def check_alpha(alpha: float | Sequence[float] | Tensor, n_layers: int) -> list[float]:
    """Validate α (one number, or one per layer) and return one float per layer.

    Raises:
        AlphaError: α is not a finite real number, or a per-layer α has the wrong length.

    Example:
        >>> check_alpha(0.5, 3)
        [0.5, 0.5, 0.5]
    """
    if isinstance(alpha, Tensor):
        alpha = alpha.tolist()
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        values = [float(alpha)] * n_layers
    elif isinstance(alpha, Sequence) and not isinstance(alpha, (str, bytes)):
        values = list(alpha)
        if len(values) != n_layers:
            raise AlphaError(
                f"A per-layer alpha needs one value per layer: got {len(values)} values for "
                f"{n_layers} layers."
            )
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in values):
            raise AlphaError(f"alpha values must be real numbers, got {values!r}.")
        values = [float(a) for a in values]
    else:
        raise AlphaError(
            f"alpha must be a number or one number per layer, got {type(alpha).__name__}."
        )
    bad = [a for a in values if not torch.isfinite(torch.tensor(a))]
    if bad:
        raise AlphaError(
            f"alpha must be finite, got {bad[0]}. (Negative alpha is allowed: it reverses "
            "the fine-tuning component.)"
        )
    return values


def alpha_mixer(alphas: Sequence[float]) -> LayerFn:
    """The α-scaling rule as an ``on_layer`` function: ``x + PTC + α·FTC``.

    Computed as ``torch.lerp(pt_post, ft_post, α)``, which is ``pt_post + α (ft_post - pt_post)``
    and returns ``ft_post`` bit-exactly at α = 1 and ``pt_post`` at α = 0.
    """

    def mix(layer: int, resid_pre: Tensor, pt_post: Tensor, ft_post: Tensor) -> Tensor:
        return torch.lerp(pt_post, ft_post, alphas[layer])

    return mix


def supports_last_token_path(model: HookedTransformer) -> bool:
    """Whether :func:`pt_block_at_last_token` reproduces ``model``'s blocks exactly.

    True for standard attention blocks with learned absolute or rotary positions (GPT-2, Llama,
    Mistral, Qwen2, GPT-NeoX, Gemma, ...); False for variants whose attention inputs or keys are
    built differently (split QKV inputs, shortformer, ALiBi, clipped or 4-bit QKV, post-norm
    blocks), which then take the full path.
    """
    cfg = model.cfg
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


@contextmanager
def placed(block: torch.nn.Module, device: torch.device, move: bool) -> Iterator[tuple[torch.nn.Module, torch.device]]:
    """``(block, device to run it on)``: the block's own device, or ``device`` with ``move``.

    With ``move`` the block is moved to ``device`` for the duration and back afterwards (the
    offloading of ``TuCoPair(..., offload_pt=True)``).
    """
    home = next(block.parameters()).device
    if not move or home == device:
        yield block, home
        return
    block.to(device)
    try:
        yield block, device
    finally:
        block.to(home)


def pt_block_at_last_token(
    block: torch.nn.Module,
    resid_pre: Float[Tensor, "batch pos d_model"],
    attention_mask: Tensor | None,
) -> Float[Tensor, "batch 1 d_model"]:
    """A block's output at the last position only, reading keys and values at every position.

    Attention at the last position needs keys and values of all positions, but its query, the
    output projection and the MLP only at the last one: most of a block's arithmetic is skipped.
    The prefix's keys and values go through TransformerLens's own KV-cache path (the cache holds
    pre-rotary keys), so masking and rotary positions are TransformerLens's. Rows must be left
    padded (the last position is every row's last real token).
    """
    normed = block.ln1(resid_pre[:, :-1])
    _, keys, values = block.attn.calculate_qkv_matrices(normed[:, :0], normed, normed)
    entry = TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values, frozen=True)
    return block(resid_pre[:, -1:], past_kv_cache_entry=entry, attention_mask=attention_mask)


class PairedBlocks:
    """Context manager pairing ``ft.blocks[l]`` with ``pt.blocks[l]`` during ft's forwards.

    Args:
        pt: The pre-trained model.
        ft: The fine-tuned model whose forward passes are observed or modified.
        on_layer: Called once per block and forward pass, in block order.
        writes: If True, ``on_layer``'s return value replaces ``blocks.{l}.hook_resid_post``
            (α-scaling). If False, ``on_layer`` only observes (decomposition).
        pt_last_only: Run the pre-trained blocks at the last position only (read mode, left-padded
            batches, no KV cache); ``on_layer`` then receives ``pt_resid_post`` of shape
            ``[batch, 1, d_model]``. See :func:`pt_block_at_last_token`.
        offload_pt: Move each pre-trained block to the device of the stream for its call and back
            afterwards, so the pre-trained weights can live off the accelerator (one block at a
            time on it).

    Example:
        >>> with PairedBlocks(pair.pt, pair.ft, alpha_mixer([0.5] * n_layers), writes=True):
        ...     logits = pair.ft(tokens)
    """

    def __init__(
        self,
        pt: HookedTransformer,
        ft: HookedTransformer,
        on_layer: LayerFn,
        *,
        writes: bool,
        pt_last_only: bool = False,
        offload_pt: bool = False,
    ):
        if pt_last_only and (writes or not supports_last_token_path(pt)):
            raise TuCoError("pt_last_only needs read mode and a model supported by the last-token path.")
        self.pt, self.ft, self.on_layer, self.writes = pt, ft, on_layer, writes
        self.pt_last_only = pt_last_only
        self.offload_pt = offload_pt
        n = ft.cfg.n_layers
        self._kwargs: list[dict[str, Any]] = [{} for _ in range(n)]
        self._resid_pre: list[Tensor | None] = [None] * n
        self._readers: list[Any] = [None] * n
        self._handles: list[Any] = []
        self._lens_hooks: list[tuple[HookPoint, Callable]] = []
        # True while a pre-trained block runs, so that a pt that shares blocks with ft (or is
        # ft itself: identical models) does not re-enter these hooks.
        self._in_pt_block = False

    # ---------------------------------------------------------------- context protocol
    def __enter__(self) -> "PairedBlocks":
        active = getattr(self.ft, _ACTIVE, None)
        if active is not None:
            raise TuCoError(
                "tuco_lens is already scaling or decomposing this fine-tuned model (nested "
                "pair.scaled() / decompose inside pair.scaled()). Exit the outer context first."
            )
        setattr(self.ft, _ACTIVE, self)
        try:
            for layer, block in enumerate(self.ft.blocks):
                self._handles.append(
                    block.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True)
                )
                if self.writes:
                    hook = self._write_hook(layer)
                    block.hook_resid_post.add_hook(hook, dir="fwd", is_permanent=True)
                    self._lens_hooks.append((block.hook_resid_post, hook))
                else:
                    self._handles.append(block.register_forward_hook(self._read_hook(layer)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        for handle in self._readers:
            if handle is not None:
                handle.remove()
        for hook_point, hook in self._lens_hooks:
            mine = [h for h in hook_point.fwd_hooks if h.user_hook is hook]
            for h in mine:
                h.hook.remove()
            hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if h.user_hook is not hook]
        self._handles, self._lens_hooks = [], []
        self._readers = [None] * len(self._readers)
        self._resid_pre = [None] * len(self._resid_pre)
        self._kwargs = [{} for _ in self._kwargs]  # drop references to masks and KV caches
        if getattr(self.ft, _ACTIVE, None) is self:
            delattr(self.ft, _ACTIVE)

    def remove(self) -> None:
        """Remove every hook (same as leaving the context)."""
        self.__exit__(None, None, None)

    # ---------------------------------------------------------------- hooks
    def _pre_hook(self, layer: int) -> Callable:
        def pre_hook(block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self._in_pt_block:
                return
            self._kwargs[layer] = kwargs
            entry = kwargs.get("past_kv_cache_entry")
            if entry is not None:
                self._sync_pt_entry(layer, entry)
            if self._readers[layer] is not None:
                self._readers[layer].remove()

            def read_resid_pre(module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
                if not self._in_pt_block:
                    self._resid_pre[layer] = output

            self._readers[layer] = block.hook_resid_pre.register_forward_hook(read_resid_pre)

        return pre_hook

    def _consume(self, layer: int) -> Tensor:
        x = self._resid_pre[layer]
        if self._readers[layer] is not None:
            self._readers[layer].remove()
            self._readers[layer] = None
        self._resid_pre[layer] = None
        if x is None:
            raise TuCoError(
                f"tuco_lens did not see the input of fine-tuned block {layer}. Was the block "
                "called without going through its hook_resid_pre?"
            )
        return x

    def _run_pt_block(self, layer: int, x: Tensor) -> Tensor:
        kwargs = self._kwargs[layer]
        entry = kwargs.get("past_kv_cache_entry")
        pt_entry = None if entry is None else getattr(entry, _PT_ENTRIES)[id(self)]
        spe = kwargs.get("shortformer_pos_embed")
        mask = kwargs.get("attention_mask")
        self._in_pt_block = True
        try:
            with placed(self.pt.blocks[layer], x.device, self.offload_pt) as (block, device):
                mask = None if mask is None else mask.to(device)
                if self.pt_last_only:
                    if entry is not None:
                        raise TuCoError("The last-token path cannot run with a KV cache.")
                    return pt_block_at_last_token(block, x.to(device), mask)
                return block(
                    x.to(device),
                    shortformer_pos_embed=None if spe is None else spe.to(device),
                    past_kv_cache_entry=pt_entry,
                    attention_mask=mask,
                )
        finally:
            self._in_pt_block = False

    def _read_hook(self, layer: int) -> Callable:
        def read_hook(block: torch.nn.Module, args: tuple, output: Tensor) -> None:
            if self._in_pt_block:
                return
            x = self._consume(layer)
            self.on_layer(layer, x, self._run_pt_block(layer, x), output)

        return read_hook

    def _write_hook(self, layer: int) -> Callable:
        def write_hook(ft_post: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor | None:
            if self._in_pt_block:
                return None
            x = self._consume(layer)
            return self.on_layer(layer, x, self._run_pt_block(layer, x), ft_post)

        return write_hook

    # ---------------------------------------------------------------- KV cache
    def _sync_pt_entry(self, layer: int, entry: TransformerLensKeyValueCacheEntry) -> None:
        """Give the pre-trained block its own cache entry, paired with the fine-tuned one."""
        store = entry.__dict__.setdefault(_PT_ENTRIES, {})
        pt_entry = store.get(id(self))
        if pt_entry is None:
            if entry.past_keys.shape[1] != 0:
                raise TuCoError(
                    f"The fine-tuned KV cache of block {layer} already holds "
                    f"{entry.past_keys.shape[1]} positions computed without tuco_lens, so the "
                    "pre-trained blocks have no matching cache. Start generation (or build the "
                    "cache) inside the same pair.scaled() context."
                )
            pt_entry = TransformerLensKeyValueCacheEntry.init_cache_entry(
                self.pt.cfg, entry.past_keys.device, entry.past_keys.shape[0]
            )
            store[id(self)] = pt_entry
        elif pt_entry.past_keys.shape[1] != entry.past_keys.shape[1]:
            raise TuCoError(
                f"The pre-trained KV cache of block {layer} is out of step with the fine-tuned "
                f"one ({pt_entry.past_keys.shape[1]} vs {entry.past_keys.shape[1]} positions)."
            )
        pt_entry.frozen = entry.frozen


def alpha_hooks(
    pt: HookedTransformer,
    ft: HookedTransformer,
    alpha: float | Sequence[float],
    attention_mask: Tensor | None = None,
    offload_pt: bool = False,
) -> list[tuple[str, Callable]]:
    """α-scaling as plain TransformerLens hook functions, for ``run_with_hooks(fwd_hooks=...)``.

    Returns ``(name, fn)`` pairs for ``blocks.{l}.hook_resid_pre`` (reads ``x_l``) and
    ``blocks.{l}.hook_resid_post`` (writes ``x_l + PTC_l + α FTC_l``). The hooks cannot see the
    attention mask or a KV cache, so pass the ``attention_mask`` of padded batches here, and use
    :meth:`TuCoPair.scaled` for generation with the KV cache.

    Example:
        >>> hooks = alpha_hooks(pair.pt, pair.ft, 0.5) + [("blocks.0.hook_resid_post", my_hook)]
        >>> logits = pair.ft.run_with_hooks(tokens, fwd_hooks=hooks)
    """
    alphas = check_alpha(alpha, ft.cfg.n_layers)
    if ft.cfg.positional_embedding_type == "shortformer":
        raise TuCoError(
            "alpha_hooks cannot pass shortformer positional embeddings to the pre-trained "
            "blocks; use `with pair.scaled(alpha):` instead."
        )
    seen: dict[int, Tensor] = {}

    def reader(layer: int) -> Callable:
        def read(x: Tensor, hook: HookPoint) -> None:
            seen[layer] = x

        return read

    def writer(layer: int) -> Callable:
        def write(ft_post: Tensor, hook: HookPoint) -> Tensor:
            x = seen.pop(layer)
            with placed(pt.blocks[layer], x.device, offload_pt) as (block, device):
                mask = None if attention_mask is None else attention_mask.to(device)
                pt_post = block(x.to(device), attention_mask=mask).to(ft_post.device)
            return torch.lerp(pt_post, ft_post, alphas[layer])

        return write

    hooks: list[tuple[str, Callable]] = []
    for layer in range(ft.cfg.n_layers):
        hooks.append((f"blocks.{layer}.hook_resid_pre", reader(layer)))
        hooks.append((f"blocks.{layer}.hook_resid_post", writer(layer)))
    return hooks
