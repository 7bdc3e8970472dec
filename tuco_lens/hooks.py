"""Running each pre-trained block on the input of its fine-tuned twin, inside a forward pass.

:class:`PairedBlocks` is the one mechanism behind the decomposition and α-scaling. While it
is active, every forward pass of the fine-tuned model (``ft(...)``, ``run_with_cache``,
``run_with_hooks``, ``generate`` with or without the KV cache) does, at each block ``l``:

1. a torch forward pre-hook on ``ft.blocks[l]`` records the block's arguments (a
   HookedTransformer's ``attention_mask``, ``shortformer_pos_embed``, ``past_kv_cache_entry``;
   a TransformerBridge layer's Hugging Face arguments: mask, rotary embeddings, position ids,
   ``Cache``) and adds a one-shot reader as the **last** hook of ``blocks.{l}.hook_resid_pre``,
   so ``x_l`` is what the fine-tuned block really consumes, after any hooks of yours;
2. the pre-trained block ``pt.blocks[l]`` is called on ``x_l`` with the same mask and
   positional information; with a KV cache it gets its own cache, built on the same stream
   and kept in step with the fine-tuned one (attached to it);
3. ``on_layer(l, x_l, pt_post, ft_post)`` receives both outputs. In read mode it observes
   the final block output; in write mode it runs as a TransformerLens hook on
   ``blocks.{l}.hook_resid_post`` and its return value replaces the stream.

Hook order in write mode (α-scaling): hooks on ``blocks.{l}.hook_resid_post`` registered
**before** entering see, and may edit, the fine-tuned block output (they count as part of
the fine-tuned block); hooks registered **inside** the context (``run_with_hooks``,
``run_with_cache``) run after the scaling and see the scaled stream. Hooks on
``hook_resid_pre`` always run before tuco_lens reads ``x_l``. Every hook tuco_lens adds is
removed on exit, even after an exception.

If ``blocks.{l}.hook_resid_post`` is not a plain ``HookPoint`` (SAE-Lens's ``add_sae`` puts
an SAE module there), tuco_lens works on that module's **input** instead, through a torch
forward pre-hook: ``ft_post`` is the block output before the SAE, and in write mode the SAE
encodes the α-scaled stream. Splicing or removing such a module while the context is active
raises :class:`TuCoError` (the layer would silently lose its hook). See ``docs/sae-lens.md``.

Threads: a context acts only on forward passes of the thread that entered it. Another thread's
forward of the same model runs the plain model, contexts of several threads coexist (each with
its own α), and nesting within one thread is refused. With ``offload_pt`` the pre-trained
blocks are moved and run one call at a time. See ``docs/guarantees.md``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from jaxtyping import Float
from torch import Tensor

from tuco_lens.backends import (
    BlockCall,
    HookPoint,
    Model,
    ObjectMap,
    add_permanent_hook,
    backend_of,
    remove_permanent_hook,
)
from tuco_lens.errors import TuCoError
from tuco_lens.inputs import warn_if_doubled_bos
from tuco_lens.validation import check_alpha

__all__ = [
    "PairedBlocks",
    "BlockParts",
    "LayerFn",
    "PartsFn",
    "MidFn",
    "check_alpha",
    "alpha_mixer",
    "alpha_hooks",
    "supports_last_token_path",
    "placed",
]

LayerFn = Callable[[int, Tensor, Tensor, Tensor], Tensor | None]
"""``on_layer(layer, resid_pre, pt_resid_post, ft_resid_post) -> new resid_post | None``."""

#: Per fine-tuned model: ``{thread id: the PairedBlocks context active in that thread}``.
_ACTIVE = ObjectMap()
#: Per pre-trained model with offloaded blocks: the lock one pre-trained block call holds.
_OFFLOAD_LOCK = ObjectMap()
# Held while hooks are added or removed: torch's and TransformerLens's hook lists are shared by
# every thread that runs the model.
_REGISTRATION = threading.Lock()


@contextmanager
def _offload_lock(pt: Model, offload: bool) -> Iterator[None]:
    """With offloading, one pre-trained block call at a time per model (blocks move devices)."""
    if not offload:
        yield
        return
    with _REGISTRATION:
        lock = _OFFLOAD_LOCK.setdefault(pt, threading.Lock)
    with lock:
        yield


def supports_last_token_path(model: Model) -> bool:
    """Whether the pre-trained blocks of ``model`` can run at the last position only, exactly.

    True for HookedTransformers with standard attention blocks and learned absolute or rotary
    positions (GPT-2, Llama, Mistral, Qwen2, GPT-NeoX, Gemma, ...), and for TransformerBridges
    whose blocks are standard decoder layers around those architectures' attention (a layer
    call with an argument the split does not know then runs in full); False for variants whose
    attention inputs or keys are built differently (split QKV inputs, shortformer, ALiBi,
    clipped or 4-bit QKV, post-norm blocks), which take the full path.

    Example:
        >>> supports_last_token_path(pair.pt)
        True
    """
    return backend_of(model).supports_last_token_path()


def alpha_mixer(alphas: Sequence[float]) -> LayerFn:
    """The α-scaling rule as an ``on_layer`` function: ``x + PTC + α·FTC``.

    Computed as ``torch.lerp(pt_post, ft_post, α)``, which is ``pt_post + α (ft_post - pt_post)``
    and returns ``ft_post`` bit-exactly at α = 1 and ``pt_post`` at α = 0.
    """

    def mix(layer: int, resid_pre: Tensor, pt_post: Tensor, ft_post: Tensor) -> Tensor:
        return torch.lerp(pt_post, ft_post, alphas[layer])

    return mix


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


@dataclass
class BlockParts:
    """What the sub-blocks of one layer produced in one forward pass (``PairedBlocks(parts=...)``).

    Attributes:
        parallel: Attention and MLP both read the block input (GPT-NeoX); else sequential.
        ft: The fine-tuned block's tensors: ``"mid"`` (sequential: ``y``, the MLP's input, after
            any α edit) or ``"attn"`` (parallel: ``A_FT(x)``), and ``"z"`` (``[batch, pos, head,
            d_head]``) when heads were asked for.
        pt: The pre-trained block's tensors on ``x``: ``"mid"`` (``y' = x + A_PT(x)``) or
            ``"attn"``, and ``"z"``.
        mid_residual: Sequential blocks: the tensor the fine-tuned block adds its MLP output to
            (``ft["mid"]``, or the unedited ``y`` on a bridge, see
            :meth:`~tuco_lens.backends.base.Backend.mid_edit_reaches_residual`).
        pt_mlp: ``M_PT(·)``: the pre-trained MLP sub-block of this layer, with its norms.
    """

    parallel: bool
    ft: dict[str, Tensor] = field(default_factory=dict)
    pt: dict[str, Tensor] = field(default_factory=dict)
    mid_residual: Tensor | None = None
    pt_mlp: Callable[[Tensor], Tensor] | None = None


PartsFn = Callable[[int, Tensor, Tensor, Tensor, BlockParts], Tensor | None]
"""``on_layer(layer, resid_pre, pt_resid_post, ft_resid_post, parts)`` with ``parts=...``."""
MidFn = Callable[[int, Tensor, Tensor, BlockParts], Tensor | None]
"""``on_mid(layer, resid_pre, ft_resid_mid, parts) -> new resid_mid | None`` (sequential blocks)."""


class PairedBlocks:
    """Context manager pairing ``ft.blocks[l]`` with ``pt.blocks[l]`` during ft's forwards.

    Works on ``HookedTransformer`` and ``TransformerBridge`` pairs alike (see
    :mod:`tuco_lens.backends` for what differs).

    Args:
        pt: The pre-trained model.
        ft: The fine-tuned model whose forward passes are observed or modified.
        on_layer: Called once per block and forward pass, in block order; with ``parts`` it
            also receives the layer's :class:`BlockParts`.
        writes: If True, ``on_layer``'s return value replaces ``blocks.{l}.hook_resid_post``
            (α-scaling). If False, ``on_layer`` only observes (decomposition).
        pt_last_only: Run the pre-trained blocks at the last position only (read mode, left-padded
            batches, no KV cache, a backend that supports it); ``on_layer`` then receives
            ``pt_resid_post`` (and pre-trained parts) of shape ``[batch, 1, ...]``.
        offload_pt: Move each pre-trained block to the device of the stream for its call and back
            afterwards, so the pre-trained weights can live off the accelerator (one block at a
            time on it).
        parts: Record the sub-blocks of both blocks (the component split, docs/components.md):
            ``"blocks"`` for attention and MLP, ``"heads"`` for per-head ``z`` too.
        on_mid: Write mode, sequential blocks: called at the fine-tuned ``hook_resid_mid`` after
            the pre-trained block ran on ``x``; its return value replaces the MLP's input
            (α per component).

    Example:
        >>> with PairedBlocks(pair.pt, pair.ft, alpha_mixer([0.5] * pair.n_layers), writes=True):
        ...     logits = pair.ft(tokens)
        >>> torch.allclose(logits, pair.run_with_alpha(tokens, alpha=0.5), atol=1e-5)
        True
    """

    def __init__(
        self,
        pt: Model,
        ft: Model,
        on_layer: LayerFn | PartsFn,
        *,
        writes: bool,
        pt_last_only: bool = False,
        offload_pt: bool = False,
        parts: Literal["blocks", "heads"] | None = None,
        on_mid: MidFn | None = None,
    ):
        self.backend, self.pt_backend = backend_of(ft), backend_of(pt)
        if pt_last_only and (writes or not self.pt_backend.supports_last_token_path()):
            raise TuCoError("pt_last_only needs read mode and a model supported by the last-token path.")
        if parts not in (None, "blocks", "heads") or (on_mid is not None and not (writes and parts)):
            raise TuCoError("parts must be None, 'blocks' or 'heads'; on_mid needs writes=True and parts.")
        self.pt, self.ft, self.on_layer, self.writes = pt, ft, on_layer, writes
        self.pt_last_only = pt_last_only
        self.offload_pt = offload_pt
        self.parts, self.on_mid = parts, on_mid
        n = len(self.backend.blocks)
        self._calls: list[BlockCall | None] = [None] * n
        self._readers: list[list[Any]] = [[] for _ in range(n)]
        self._handles: list[Any] = []
        self._lens_hooks: list[tuple[HookPoint, Callable]] = []
        self._post_modules: list[torch.nn.Module | None] = [None] * n
        # True while a pre-trained block runs, so that a pt that shares blocks with ft (or is
        # ft itself: identical models) does not re-enter these hooks.
        self._in_pt_block = False
        # The thread that entered: forward passes of other threads run the plain model.
        self._owner: int | None = None

    # ---------------------------------------------------------------- context protocol
    def __enter__(self) -> PairedBlocks:
        with _REGISTRATION:
            active = _ACTIVE.setdefault(self.ft, dict)
            if threading.get_ident() in active:
                raise TuCoError(
                    "tuco_lens is already scaling or decomposing this fine-tuned model in this "
                    "thread (nested pair.scaled() / decompose inside pair.scaled()). Exit the "
                    "outer context first."
                )
            self._owner = threading.get_ident()
            active[self._owner] = self
            try:
                self._install()
            except BaseException:
                self._uninstall()
                raise
        return self

    def _install(self) -> None:
        self._handles.append(self.backend.token_embedding.register_forward_pre_hook(self._embed_hook))
        for layer, block in enumerate(self.backend.blocks):
            self._handles.append(
                block.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True)
            )
            hook_point = self._post_modules[layer] = self.backend.resid_post(block)
            if not isinstance(hook_point, HookPoint):  # e.g. an SAE spliced in by SAE-Lens
                self._handles.append(hook_point.register_forward_pre_hook(self._post_input_hook(layer)))
            elif self.writes:
                hook = self._write_hook(layer)
                add_permanent_hook(hook_point, hook)
                self._lens_hooks.append((hook_point, hook))
            else:
                self._handles.append(block.register_forward_hook(self._read_hook(layer)))

    def __exit__(self, *exc_info: object) -> None:
        with _REGISTRATION:
            self._uninstall()

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in range(len(self._readers)):
            self._drop_readers(layer)
        for hook_point, hook in self._lens_hooks:
            remove_permanent_hook(hook_point, hook)
        self._handles, self._lens_hooks = [], []
        self._calls = [None] * len(self._calls)  # drop references to masks and KV caches
        active = _ACTIVE.get(self.ft, {})
        if active.get(self._owner) is self:
            del active[self._owner]

    def _foreign(self) -> bool:
        """True for calls this context must not touch: another thread's forward passes, or the
        pre-trained block that this context runs itself."""
        return self._in_pt_block or threading.get_ident() != self._owner

    def remove(self) -> None:
        """Remove every hook (same as leaving the context)."""
        self.__exit__(None, None, None)

    # ---------------------------------------------------------------- hooks
    def _embed_hook(self, module: torch.nn.Module, args: tuple) -> None:
        """Warn about rows that start with two BOS tokens (:class:`~tuco_lens.errors.DoubledBOSWarning`)."""
        if not self._foreign() and args and isinstance(args[0], Tensor):
            warn_if_doubled_bos(args[0], self.ft.tokenizer)

    def _drop_readers(self, layer: int) -> None:
        for handle in self._readers[layer]:
            handle.remove()
        self._readers[layer] = []

    def _read_into(self, layer: int, hook_point: torch.nn.Module, store: Callable[[Tensor], Tensor | None]) -> None:
        """Add ``store`` as the last raw forward hook of ``hook_point`` for this call of ``layer``."""

        def read(module: torch.nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            return None if self._foreign() else store(output)

        self._readers[layer].append(hook_point.register_forward_hook(read))

    def _pre_hook(self, layer: int) -> Callable:
        def pre_hook(block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self._foreign():
                return
            if self.backend.resid_post(block) is not self._post_modules[layer]:
                raise TuCoError(
                    f"blocks.{layer}.hook_resid_post was replaced (an SAE spliced in or removed, e.g. "
                    "by run_with_saes) while tuco_lens was active. Splice SAEs before entering "
                    "pair.scaled() (see docs/sae-lens.md)."
                )
            call = BlockCall(args, kwargs)
            self.backend.check_call(layer, call, id(self))
            self._calls[layer] = call
            self._drop_readers(layer)

            def read_resid_pre(x: Tensor) -> None:
                call.x = x

            self._read_into(layer, self.backend.resid_pre(block), read_resid_pre)
            if self.parts is not None:
                self._read_parts(layer, block, call)

        return pre_hook

    def _read_parts(self, layer: int, block: torch.nn.Module, call: BlockCall) -> None:
        """Readers of the fine-tuned block's sub-blocks for this call (``parts=...``)."""
        parts = call.parts = BlockParts(parallel=self.backend.is_parallel(block))
        parts.pt_mlp = lambda y: self._run_pt_mlp(layer, y)
        if self.parts == "heads":
            self._read_into(layer, self.backend.hook_z(block), lambda z: parts.ft.__setitem__("z", z))
        if parts.parallel:
            self._read_into(layer, self.backend.attn_out(block), lambda a: parts.ft.__setitem__("attn", a))
            return

        def read_mid(y: Tensor) -> Tensor | None:
            parts.ft["mid"] = parts.mid_residual = y
            if self.on_mid is None:
                return None
            x = call.x
            if x is None:
                raise TuCoError(
                    f"tuco_lens did not see the input of fine-tuned block {layer} before its middle. "
                    "Was the block called without going through its hook_resid_pre?"
                )
            call.pt_post = self._run_pt_block(layer, call, x)
            new = self.on_mid(layer, x, y, parts)
            if new is not None:
                parts.ft["mid"] = new
                if self.backend.mid_edit_reaches_residual():
                    parts.mid_residual = new
            return new

        self._read_into(layer, self.backend.resid_mid(block), read_mid)

    def _consume(self, layer: int) -> tuple[BlockCall, Tensor]:
        call = self._calls[layer]
        self._drop_readers(layer)
        self._calls[layer] = None
        if call is None or call.x is None:
            raise TuCoError(
                f"tuco_lens did not see the input of fine-tuned block {layer}. Was the block "
                "called without going through its hook_resid_pre?"
            )
        return call, call.x

    def _run_pt_block(self, layer: int, call: BlockCall, x: Tensor) -> Tensor:
        self._in_pt_block = True
        captured: list[Any] = []
        try:
            with _offload_lock(self.pt, self.offload_pt), placed(
                self.pt_backend.blocks[layer], x.device, self.offload_pt
            ) as (block, device):
                if call.parts is not None:
                    captured = self._capture_pt_parts(block, call.parts)
                x = x.to(device)
                if self.pt_last_only:
                    return self.backend.call_pt_block_at_last_token(block, call, x)
                return self.backend.call_pt_block(block, layer, call, x, id(self))
        finally:
            for handle in captured:
                handle.remove()
            self._in_pt_block = False

    def _capture_pt_parts(self, block: torch.nn.Module, parts: BlockParts) -> list[Any]:
        """Raw forward hooks that record the pre-trained block's sub-blocks into ``parts.pt``."""
        points = {"attn" if parts.parallel else "mid": (
            self.pt_backend.attn_out(block) if parts.parallel else self.pt_backend.resid_mid(block)
        )}
        if self.parts == "heads":
            points["z"] = self.pt_backend.hook_z(block)

        def recorder(name: str) -> Callable:
            def record(module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
                if threading.get_ident() == self._owner:  # not another thread's run of pt
                    parts.pt[name] = output

            return record

        return [point.register_forward_hook(recorder(name)) for name, point in points.items()]

    def _run_pt_mlp(self, layer: int, y: Tensor) -> Tensor:
        self._in_pt_block = True
        try:
            with _offload_lock(self.pt, self.offload_pt), placed(
                self.pt_backend.blocks[layer], y.device, self.offload_pt
            ) as (block, device):
                return self.pt_backend.call_mlp(block, y.to(device)).to(y.device)
        finally:
            self._in_pt_block = False

    def _finish(self, layer: int, ft_post: Tensor) -> Tensor | None:
        """Run the pre-trained block (unless ``on_mid`` did) and hand both outputs to ``on_layer``."""
        call, x = self._consume(layer)
        pt_post = call.pt_post if call.pt_post is not None else self._run_pt_block(layer, call, x)
        self.backend.check_cache_advanced(layer, call, id(self))
        # on_layer is a PartsFn exactly when parts are recorded (parts=...), else a LayerFn.
        if call.parts is None:
            return cast(LayerFn, self.on_layer)(layer, x, pt_post, ft_post)
        return cast(PartsFn, self.on_layer)(layer, x, pt_post, ft_post, call.parts)

    def _read_hook(self, layer: int) -> Callable:
        def read_hook(block: torch.nn.Module, args: tuple, output: Any) -> None:
            if not self._foreign():
                self._finish(layer, self.backend.block_output(output))

        return read_hook

    def _write_hook(self, layer: int) -> Callable:
        def write_hook(ft_post: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor | None:
            return None if self._foreign() else self._finish(layer, ft_post)

        return write_hook

    def _post_input_hook(self, layer: int) -> Callable:
        """Torch pre-hook on a non-HookPoint ``hook_resid_post`` (an SAE): acts on its input."""

        def post_input_hook(module: torch.nn.Module, args: tuple) -> tuple | None:
            if self._foreign():
                return None
            new = self._finish(layer, args[0])
            return None if not self.writes or new is None else (new, *args[1:])

        return post_input_hook


def _spliced_resid_hooks(model: Model) -> list[str]:
    """Names of ``blocks.{l}.hook_resid_pre/post`` that are not plain HookPoints (e.g. SAEs)."""
    backend = backend_of(model)
    names = []
    for layer, block in enumerate(backend.blocks):
        for kind, module in (("pre", backend.resid_pre(block)), ("post", backend.resid_post(block))):
            if not isinstance(module, HookPoint):
                names.append(f"blocks.{layer}.hook_resid_{kind}")
    return names


def alpha_hooks(
    pt: Model,
    ft: Model,
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
        >>> seen = []
        >>> def my_hook(resid, hook):
        ...     seen.append(tuple(resid.shape))
        >>> hooks = alpha_hooks(pair.pt, pair.ft, 0.5) + [("blocks.0.hook_resid_post", my_hook)]
        >>> logits = pair.ft.run_with_hooks(tokens, fwd_hooks=hooks)
        >>> seen, torch.allclose(logits, pair.run_with_alpha(tokens, alpha=0.5), atol=1e-5)
        ([(1, 9, 128)], True)
    """
    backend = backend_of(ft)
    refusal = backend.hook_function_refusal()
    if refusal:
        raise TuCoError(f"alpha_hooks cannot scale this model: {refusal} Use `with pair.scaled(alpha):` instead.")
    spliced = _spliced_resid_hooks(ft)
    if spliced:
        raise TuCoError(
            f"alpha_hooks cannot hook {spliced[0]}: it is not a HookPoint (an SAE spliced in by "
            "SAE-Lens?). Use `with pair.scaled(alpha):`, which handles spliced SAEs (see "
            "docs/sae-lens.md)."
        )
    alphas = check_alpha(alpha, ft.cfg.n_layers)
    seen: dict[int, Tensor] = {}

    def reader(layer: int) -> Callable:
        def read(x: Tensor, hook: HookPoint) -> None:
            seen[layer] = x

        return read

    def writer(layer: int) -> Callable:
        def write(ft_post: Tensor, hook: HookPoint) -> Tensor:
            x = seen.pop(layer)
            with placed(pt.blocks[layer], x.device, offload_pt) as (block, device):
                call = BlockCall((), {"attention_mask": attention_mask})
                pt_post = backend.call_pt_block(block, layer, call, x.to(device), 0).to(ft_post.device)
            return torch.lerp(pt_post, ft_post, alphas[layer])

        return write

    hooks: list[tuple[str, Callable]] = []
    for layer in range(ft.cfg.n_layers):
        hooks.append((f"blocks.{layer}.hook_resid_pre", reader(layer)))
        hooks.append((f"blocks.{layer}.hook_resid_post", writer(layer)))
    return hooks
