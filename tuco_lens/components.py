"""Inside the block: the exact attention / MLP / head split of the fine-tuning component.

The paper treats block ``l`` as one function ``f(x) = A(x) + M(x + A(x))``. With ``x`` the
fine-tuned stream entering the block, ``A_FT, A_PT`` the attention sub-blocks (each with its own
input norm and any norm after the attention output) and ``M_FT, M_PT`` the MLP sub-blocks with
their norms, sequential blocks (GPT-2, Llama, Mistral, Qwen2, Gemma) have ``y = x + A_FT(x)``,
``y' = x + A_PT(x)`` and::

    FTC_attn,l     = A_FT(x) - A_PT(x)       fine-tuning of attention
    FTC_mlp,l      = M_FT(y) - M_PT(y)       fine-tuning of the MLP, on the fine-tuned MLP input
    FTC_mlp<-attn,l = M_PT(y) - M_PT(y')     how the pre-trained MLP answers the changed attention
    FTC_attn + FTC_mlp + FTC_mlp<-attn = FTC_l   exactly (PTC_l is unchanged)

Parallel blocks (GPT-NeoX) read ``x`` in both sub-blocks, so ``FTC_mlp<-attn = 0``. Where the
attention output is ``Σ_h z_h W_O[h] + b_O`` (grouped-query attention included),
``FTC_attn = Σ_h (o_h^FT - o_h^PT) + (b_O^FT - b_O^PT)`` with ``o_h = z_h W_O[h]``.

α per component (``alpha={"attn": a, "mlp": b, "heads": ...}``), on the scaled stream::

    y  = x + A_PT(x) + a_l (A_FT(x) - A_PT(x))            (with heads: Σ_h a_{l,h} (o_h^FT - o_h^PT) + a_l Δb_O)
    x' = y + M_PT(y) + b_l (M_FT(y) - M_PT(y))            (parallel blocks: both terms read x)

``a = b = 1`` is the fine-tuned block bit for bit and ``a = b = 0`` the pre-trained block bit for
bit; for other values ``a = b = α`` is *not* the paper's block-level α (which also scales the
pre-trained MLP's answer to the changed attention). See ``docs/components.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tuco_lens.backends import Backend
from tuco_lens.decomposition import DecompositionAccumulator, Norm, vector_norm
from tuco_lens.errors import AlphaError, TuCoError
from tuco_lens.hooks import BlockParts, alpha_mixer
from tuco_lens.validation import check_alpha

__all__ = [
    "ComponentAlpha",
    "ComponentAccumulator",
    "ComponentMixer",
    "check_component_alpha",
    "mixer_for",
    "norm_gradient",
    "parse_alpha",
]

_KEYS = ("attn", "mlp", "heads")


@dataclass(frozen=True)
class ComponentAlpha:
    """α per component: one value per layer for attention and for the MLP, optionally per head.

    Attributes:
        attn: ``a_l``, scaling ``A_FT - A_PT`` (and, with ``heads``, the output-bias difference).
        mlp: ``b_l``, scaling ``M_FT(y) - M_PT(y)``.
        heads: ``a_{l,h}`` ``[layer, head]``, scaling each head's ``o_h^FT - o_h^PT``, or None.
    """

    attn: list[float]
    mlp: list[float]
    heads: Float[Tensor, "layer head"] | None = None

    def is_corner(self, layer: int, value: float) -> bool:
        """Whether every α of ``layer`` equals ``value`` (then the block is copied bit for bit)."""
        heads_ok = self.heads is None or bool((self.heads[layer] == value).all())
        return self.attn[layer] == value and self.mlp[layer] == value and heads_ok


def check_component_alpha(alpha: Mapping[str, Any], n_layers: int, n_heads: int) -> ComponentAlpha:
    """Validate a per-component α ``{"attn": a, "mlp": b, "heads": [layer, head]}``.

    ``attn`` and ``mlp`` are each a number or one number per layer; a missing key means 1 (that
    component keeps its fine-tuning).

    Raises:
        AlphaError: unknown keys, values that are not finite numbers, or wrong lengths/shapes.

    Example:
        >>> check_component_alpha({"mlp": 0.0}, 2, 4).mlp
        [0.0, 0.0]
    """
    unknown = sorted(set(alpha) - set(_KEYS))
    if unknown:
        raise AlphaError(
            f"A per-component alpha takes the keys 'attn', 'mlp' and 'heads'; got {unknown}. "
            "Example: alpha={'attn': 1.0, 'mlp': 0.0}."
        )
    attn = check_alpha(alpha.get("attn", 1.0), n_layers)
    mlp = check_alpha(alpha.get("mlp", 1.0), n_layers)
    heads = alpha.get("heads")
    if heads is not None:
        try:
            heads = torch.as_tensor(heads, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise AlphaError(f"alpha['heads'] must be numbers [layer, head]: {error}") from None
        if tuple(heads.shape) != (n_layers, n_heads):
            raise AlphaError(
                f"alpha['heads'] needs one value per layer and head, shape ({n_layers}, {n_heads}); "
                f"got {tuple(heads.shape)}."
            )
        if not bool(torch.isfinite(heads).all()):
            raise AlphaError("alpha['heads'] must be finite.")
    return ComponentAlpha(attn, mlp, heads)


def parse_alpha(alpha: Any, n_layers: int, n_heads: int) -> list[float] | ComponentAlpha:
    """A block-level α (one number or one per layer) or a per-component dict, validated."""
    if isinstance(alpha, Mapping):
        return check_component_alpha(alpha, n_layers, n_heads)
    return check_alpha(alpha, n_layers)


def norm_gradient(total: Float[Tensor, "... d_model"], norm: Norm) -> Float[Tensor, "... d_model"]:
    """The gradient of ``||total||`` (``sign`` for L1, ``total / ||total||`` for L2; 0 at 0).

    ``||total|| = <total, g>``, so for ``total = Σ_c v_c`` the shares ``<v_c, g>`` add up to the
    norm exactly: the component shares of TuCo.
    """
    if norm == "l1":
        return total.sign()
    length = vector_norm(total, norm)[..., None]
    return torch.where(length > 0, total / length.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def _project_heads(z: Tensor, w_o: Tensor) -> Tensor:
    """``o_h = z_h W_O[h]`` for every head: ``[..., head, d_head] -> [..., head, d_model]``."""
    return torch.einsum("...hd,hdm->...hm", z, w_o)


class ComponentAccumulator(DecompositionAccumulator):
    """:class:`~tuco_lens.decomposition.DecompositionAccumulator` plus the component split.

    Receives each layer with its :class:`~tuco_lens.hooks.BlockParts` (``PairedBlocks(...,
    parts="blocks" | "heads")``). Keeps, besides what the base class keeps, the three component
    sums at the last real token, their per-position norms (``positions="all"``) and, with heads,
    each head's FTC at the last real token.

    Args:
        pt_backend: The pre-trained model's backend (for its heads' output projections).
        ft_backend: The fine-tuned model's backend.
        heads: Also split attention per head (at the last real token).
        **kwargs: As for :class:`~tuco_lens.decomposition.DecompositionAccumulator`.
    """

    COMPONENTS = ("attn", "mlp", "mlp_via_attn")

    def __init__(self, pt_backend: Backend, ft_backend: Backend, *, heads: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pt_backend, self.ft_backend, self.heads = pt_backend, ft_backend, heads
        self.sums: dict[str, Tensor] = {}
        self.head_terms: list[Tensor] = []
        self.head_bias: list[Tensor] = []
        if self.positions == "all":
            for name in self.COMPONENTS:
                self.tables[f"ftc_{name}_norm"] = torch.empty_like(self.tables["ftc_norm"])

    def _last(self, t: Tensor) -> Tensor:
        """The last real token of every row (works for one-position tensors of the last-token path)."""
        if t.shape[1] == 1:
            return t[:, 0].to(self.dtype)
        rows = torch.arange(t.shape[0], device=t.device)
        return t[rows, self.last_index.to(t.device)].to(self.dtype)

    def add(self, layer: int, resid_pre: Tensor, pt_resid_post: Tensor, ft_resid_post: Tensor,
            parts: BlockParts | None = None) -> None:
        """Add layer ``layer`` with its sub-block tensors (see the module docstring)."""
        if parts is None:
            raise TuCoError(
                "ComponentAccumulator needs each layer's sub-block tensors: run it as the on_layer "
                "of PairedBlocks(..., parts='blocks' or 'heads')."
            )
        super().add(layer, resid_pre, pt_resid_post, ft_resid_post)
        x, pt, ft = (self._select(t) for t in (resid_pre, pt_resid_post, ft_resid_post))
        if parts.parallel:
            a_ft, a_pt = self._select(parts.ft["attn"]), self._select(parts.pt["attn"])
            terms = {"attn": a_ft - a_pt, "mlp": (ft - x - a_ft) - (pt - x - a_pt)}
            terms["mlp_via_attn"] = torch.zeros_like(terms["attn"])
        else:
            y, y_pt = parts.ft["mid"], parts.pt["mid"]
            if self.positions == "last":
                y = y[:, -1:]
            assert parts.pt_mlp is not None  # PairedBlocks sets it on every block's parts
            m_pt_y = self._select(parts.pt_mlp(y))
            y, y_pt = self._select(y), self._select(y_pt)
            terms = {"attn": y - y_pt, "mlp": (ft - y) - m_pt_y, "mlp_via_attn": m_pt_y - (pt - y_pt)}
        device = self.mask.device
        for name, term in terms.items():
            term = term.to(device)
            self.sums[name] = self._at_last(term) + self.sums.get(name, 0.0)
            if self.positions == "all":
                self.tables[f"ftc_{name}_norm"][:, layer] = vector_norm(term, self.norm)
        if self.heads:
            self._add_heads(layer, parts)

    def _add_heads(self, layer: int, parts: BlockParts) -> None:
        w_ft, b_ft = self.ft_backend.head_weights(self.ft_backend.blocks[layer])
        w_pt, b_pt = self.pt_backend.head_weights(self.pt_backend.blocks[layer])
        z_ft = self._last(self.ft_backend.heads_of(parts.ft["z"]))
        z_pt = self._last(self.pt_backend.heads_of(parts.pt["z"]))
        device = self.mask.device
        o_ft = _project_heads(z_ft, w_ft.to(z_ft.device, self.dtype))
        o_pt = _project_heads(z_pt, w_pt.to(z_pt.device, self.dtype))
        self.head_terms.append((o_ft - o_pt.to(o_ft.device)).to(device))
        bias = torch.zeros(o_ft.shape[-1], dtype=self.dtype, device=device)
        for sign, b in ((1.0, b_ft), (-1.0, b_pt)):
            if b is not None:
                bias = bias + sign * b.to(device, self.dtype)
        self.head_bias.append(bias)

    def component_results(self) -> dict[str, Tensor]:
        """The component fields of a :class:`~tuco_lens.decomposition.Decomposition`."""
        self._check_complete()
        out = {f"ftc_{name}_sum": self.sums[name] for name in self.COMPONENTS}
        if self.heads:
            out["ftc_head"] = torch.stack(self.head_terms, dim=1)  # [batch, layer, head, d_model]
            out["ftc_head_norm"] = vector_norm(out["ftc_head"], self.norm)
            batch = out["ftc_head"].shape[0]
            out["ftc_head_bias"] = torch.stack(self.head_bias)[None].expand(batch, -1, -1)
        return out


class ComponentMixer:
    """α per component as ``PairedBlocks(..., parts=..., on_mid=mixer.on_mid)`` callbacks.

    ``on_mid`` builds the scaled MLP input ``y`` of a sequential block; ``__call__`` the block
    output ``x'`` (see the module docstring). Corners (every α of a layer 1, or every α 0) return
    the fine-tuned or the pre-trained block's own output, bit for bit.
    """

    def __init__(self, alpha: ComponentAlpha, pt_backend: Backend, ft_backend: Backend) -> None:
        self.alpha, self.pt_backend, self.ft_backend = alpha, pt_backend, ft_backend

    @property
    def parts(self) -> Literal["blocks", "heads"]:
        """What :class:`~tuco_lens.hooks.PairedBlocks` must record."""
        return "blocks" if self.alpha.heads is None else "heads"

    def _uniform(self, layer: int) -> bool:
        """No per-head α in this layer beyond ``a_l`` itself."""
        heads = self.alpha.heads
        return heads is None or bool((heads[layer] == self.alpha.attn[layer]).all())

    def _head_delta(self, layer: int, parts: BlockParts, like: Tensor) -> Tensor:
        """``Σ_h a_{l,h} (o_h^FT - o_h^PT) + a_l (b_O^FT - b_O^PT)`` at every position."""
        a, heads = self.alpha.attn[layer], self.alpha.heads
        assert heads is not None  # only called where _uniform(layer) is False: per-head α
        per_head = heads[layer].to(like.device, like.dtype)
        delta = torch.zeros_like(like)
        for backend, sign, z in ((self.ft_backend, 1.0, parts.ft["z"]), (self.pt_backend, -1.0, parts.pt["z"])):
            w_o, b_o = backend.head_weights(backend.blocks[layer])
            z = backend.heads_of(z).to(like.device)
            delta = delta + sign * torch.einsum("bphd,h,hdm->bpm", z, per_head, w_o.to(like.device, like.dtype))
            if b_o is not None:
                delta = delta + sign * a * b_o.to(like.device, like.dtype)
        return delta

    def _attention(self, layer: int, a_pt: Tensor, a_ft: Tensor, parts: BlockParts) -> Tensor:
        """``A_PT + a_l (A_FT - A_PT)``, or with per-head α ``A_PT + Σ_h a_{l,h} Δo_h + a_l Δb_O``."""
        if self._uniform(layer):
            return torch.lerp(a_pt, a_ft, self.alpha.attn[layer])
        return a_pt + self._head_delta(layer, parts, a_ft)

    def on_mid(self, layer: int, x: Tensor, y_ft: Tensor, parts: BlockParts) -> Tensor | None:
        """The scaled MLP input ``y`` of a sequential block (None: keep the fine-tuned one)."""
        if self._uniform(layer) and self.alpha.attn[layer] == 1.0:
            return None
        y_pt = parts.pt["mid"].to(y_ft.device)
        if self._uniform(layer):
            return torch.lerp(y_pt, y_ft, self.alpha.attn[layer])
        return y_pt + self._head_delta(layer, parts, y_ft)

    def __call__(self, layer: int, x: Tensor, pt_post: Tensor, ft_post: Tensor, parts: BlockParts) -> Tensor:
        if self.alpha.is_corner(layer, 1.0):
            return ft_post
        pt_post = pt_post.to(ft_post.device)
        if self.alpha.is_corner(layer, 0.0):
            return pt_post
        b = self.alpha.mlp[layer]
        if parts.parallel:
            a_ft, a_pt = parts.ft["attn"], parts.pt["attn"].to(ft_post.device)
            m_ft, m_pt = ft_post - x - a_ft, pt_post - x - a_pt
            return x + self._attention(layer, a_pt, a_ft, parts) + torch.lerp(m_pt, m_ft, b)
        # Sequential block: PairedBlocks set mid_residual (at its middle) and pt_mlp.
        assert parts.mid_residual is not None and parts.pt_mlp is not None
        y, m_ft = parts.ft["mid"], ft_post - parts.mid_residual
        if b == 1.0:  # M_FT(y) alone: the fine-tuned block's output when its residual is y
            return ft_post if parts.mid_residual is y else y + m_ft
        return y + torch.lerp(parts.pt_mlp(y), m_ft, b)


def mixer_for(alpha: Any, pt_backend: Backend, ft_backend: Backend, n_heads: int) -> dict[str, Any]:
    """``PairedBlocks`` keyword arguments (``on_layer``, ``parts``, ``on_mid``) for any α.

    Example:
        >>> from tuco_lens.backends import backend_of
        >>> from tuco_lens.hooks import PairedBlocks
        >>> mixer = mixer_for({"mlp": 0.0}, backend_of(pt_model), backend_of(ft_model), ft_model.cfg.n_heads)
        >>> sorted(mixer)
        ['on_layer', 'on_mid', 'parts']
        >>> with PairedBlocks(pt_model, ft_model, writes=True, **mixer):
        ...     logits = ft_model(tokens)
        >>> torch.allclose(logits, pair.run_with_alpha(tokens, alpha={"mlp": 0.0}), atol=1e-5)
        True
    """
    n_layers = len(ft_backend.blocks)
    parsed = parse_alpha(alpha, n_layers, n_heads)
    if isinstance(parsed, list):
        return {"on_layer": alpha_mixer(parsed)}
    mixer = ComponentMixer(parsed, pt_backend, ft_backend)
    return {"on_layer": mixer, "parts": mixer.parts, "on_mid": mixer.on_mid}
