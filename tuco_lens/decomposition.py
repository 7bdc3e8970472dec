"""The PTC/FTC decomposition of a fine-tuned forward pass and the TuCo statistics built on it.

For every layer ``l`` and the fine-tuned residual stream ``x_l`` (the input of fine-tuned
block ``l``)::

    PTC_l = f_PT(x_l, l) = pt.blocks[l](x_l) - x_l       # pre-training component
    FTC_l = f_FT(x_l, l) - f_PT(x_l, l) = ft.blocks[l](x_l) - pt.blocks[l](x_l)
    x_{l+1} = x_l + PTC_l + FTC_l                         # the fine-tuned trajectory, exactly

and TuCo (Definition 4.3 of the paper) is, at the last real token ``n``::

    TuCo = ||Σ_l FTC_l[n]|| / (||Σ_l PTC_l[n]|| + ||Σ_l FTC_l[n]||)      (L1 norm by default)

:class:`DecompositionAccumulator` reduces each layer's components as soon as they are
produced (so no per-layer activation is kept), and :class:`Decomposition` holds the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tuco_lens.errors import InputError, NonFiniteError, TuCoError
from tuco_lens.inputs import last_real_index
from tuco_lens.validation import check_norm

__all__ = ["COMPONENTS", "Decomposition", "DecompositionAccumulator", "DecompositionTables", "Norm", "vector_norm", "ratio"]

Norm = Literal["l1", "l2"]
_ORDERS = {"l1": 1, "l2": 2}
#: The components of the split inside a block (``tuco_lens.components``).
COMPONENTS = ("attn", "mlp", "mlp_via_attn")
_OPTIONAL = {f"ftc_{c}_{kind}" for c in COMPONENTS for kind in ("norm", "sum")} | {
    "ftc_head", "ftc_head_norm", "ftc_head_bias"
}


def vector_norm(x: Float[Tensor, "... d_model"], norm: Norm) -> Float[Tensor, " ..."]:
    """The L1 or L2 norm over the last (``d_model``) axis.

    L1 is ``x.abs().sum(-1)``: on CPU several times faster than ``torch.linalg.vector_norm(x, 1)``
    (same value up to summation order).
    """
    if norm == "l1":
        return x.abs().sum(-1)
    return torch.linalg.vector_norm(x, ord=_ORDERS[norm], dim=-1)


def ratio(ftc: Float[Tensor, " ..."], ptc: Float[Tensor, " ..."]) -> Float[Tensor, " ..."]:
    """``ftc / (ptc + ftc)``, defined as 0 where both norms are 0 (nothing was written)."""
    total = ptc + ftc
    return torch.where(total > 0, ftc / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


@dataclass(frozen=True)
class Decomposition:
    """TuCo and the per-layer, per-token PTC/FTC statistics of a batch of prompts.

    Layer ``l`` indexes fine-tuned block ``l`` (0-based). Cumulative quantities at layer ``l``
    include blocks ``0..l``, so ``beta[:, -1]`` is the per-token TuCo and the paper's
    ``β_{l+1}`` is ``beta[:, l]``. Padding positions hold ``NaN`` in every per-position tensor.

    Attributes:
        tuco: The paper's TuCo at the last real token of each prompt. ``[batch]``
        tuco_per_token: The same formula at every position. ``[batch, pos]``
        ptc_norm: ``||PTC_l||`` at every layer and position. ``[batch, layer, pos]``
        ftc_norm: ``||FTC_l||`` at every layer and position. ``[batch, layer, pos]``
        ptc_cum_norm: ``||Σ_{s≤l} PTC_s||``. ``[batch, layer, pos]``
        ftc_cum_norm: ``||Σ_{s≤l} FTC_s||``. ``[batch, layer, pos]``
        beta: Cumulative ratio ``ftc_cum_norm / (ptc_cum_norm + ftc_cum_norm)``.
            ``[batch, layer, pos]``
        ptc_sum: ``Σ_l PTC_l`` at the last real token, to project on your own directions.
            ``[batch, d_model]``
        ftc_sum: ``Σ_l FTC_l`` at the last real token. ``[batch, d_model]``
        tokens: The token ids that were scored. ``[batch, pos]``
        attention_mask: 1 at real tokens, 0 at padding. ``[batch, pos]``
        str_tokens: Token strings per prompt, padding included (as ``""``).
        prompts: The prompts as given (before any chat template), if known.
        norm: ``"l1"`` (the paper's) or ``"l2"``.
        ftc_attn_norm, ftc_mlp_norm, ftc_mlp_via_attn_norm: With ``components=True``: the norms
            of ``FTC_attn,l``, ``FTC_mlp,l`` and ``FTC_mlp←attn,l`` (``tuco_lens.components``) at
            every layer and position; None otherwise. ``[batch, layer, pos]``
        ftc_attn_sum, ftc_mlp_sum, ftc_mlp_via_attn_sum: The three components summed over
            layers at the last real token; they add up to ``ftc_sum``. ``[batch, d_model]``
        ftc_head: Each head's ``o_h^FT - o_h^PT`` at the last real token (``components=True``
            with heads). ``[batch, layer, head, d_model]``
        ftc_head_norm: ``||ftc_head||``. ``[batch, layer, head]``
        ftc_head_bias: ``b_O^FT - b_O^PT`` per layer: with the heads it adds up to
            ``FTC_attn,l``. ``[batch, layer, d_model]``
        special_tokens: The tokenizer's special-token strings (``<bos>``, ``<|im_start|>``...);
            figures leave them out of prompt labels.

    Example:
        >>> dec = pair.decompose(prompts, chat_template=True)
        >>> [round(t, 3) for t in dec.tuco.tolist()]
        [0.559, 0.409]
        >>> list(dec.to_dataframe().columns)[:6]
        ['prompt_index', 'prompt', 'layer', 'position', 'token', 'is_last']
        >>> dec
        Decomposition(2 prompts × 4 layers × 13 positions, norm='l1', tuco=[0.559, 0.409])
    """

    tuco: Float[Tensor, " batch"]
    tuco_per_token: Float[Tensor, "batch pos"]
    ptc_norm: Float[Tensor, "batch layer pos"]
    ftc_norm: Float[Tensor, "batch layer pos"]
    ptc_cum_norm: Float[Tensor, "batch layer pos"]
    ftc_cum_norm: Float[Tensor, "batch layer pos"]
    beta: Float[Tensor, "batch layer pos"]
    ptc_sum: Float[Tensor, "batch d_model"]
    ftc_sum: Float[Tensor, "batch d_model"]
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    str_tokens: list[list[str]]
    prompts: list[str] | None = None
    norm: Norm = "l1"
    ftc_attn_norm: Float[Tensor, "batch layer pos"] | None = None
    ftc_mlp_norm: Float[Tensor, "batch layer pos"] | None = None
    ftc_mlp_via_attn_norm: Float[Tensor, "batch layer pos"] | None = None
    ftc_attn_sum: Float[Tensor, "batch d_model"] | None = None
    ftc_mlp_sum: Float[Tensor, "batch d_model"] | None = None
    ftc_mlp_via_attn_sum: Float[Tensor, "batch d_model"] | None = None
    ftc_head: Float[Tensor, "batch layer head d_model"] | None = None
    ftc_head_norm: Float[Tensor, "batch layer head"] | None = None
    ftc_head_bias: Float[Tensor, "batch layer d_model"] | None = None
    special_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        b, p = self.tokens.shape
        n_layers = self.ptc_norm.shape[1]
        expected = {
            "tuco": (b,),
            "tuco_per_token": (b, p),
            "ptc_norm": (b, n_layers, p),
            "ftc_norm": (b, n_layers, p),
            "ptc_cum_norm": (b, n_layers, p),
            "ftc_cum_norm": (b, n_layers, p),
            "beta": (b, n_layers, p),
            "attention_mask": (b, p),
        }
        d_model = self.ptc_sum.shape[-1]
        for name in COMPONENTS:
            expected[f"ftc_{name}_norm"] = (b, n_layers, p)
            expected[f"ftc_{name}_sum"] = (b, d_model)
        if self.ftc_head is not None:
            n_heads = self.ftc_head.shape[2]
            expected.update(ftc_head=(b, n_layers, n_heads, d_model), ftc_head_norm=(b, n_layers, n_heads),
                            ftc_head_bias=(b, n_layers, d_model))
        for name, shape in expected.items():
            if getattr(self, name) is None and name in _OPTIONAL:
                continue
            if tuple(getattr(self, name).shape) != shape:
                raise TuCoError(
                    f"Decomposition.{name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected {shape}."
                )
        if self.ptc_sum.shape != self.ftc_sum.shape or self.ptc_sum.shape[0] != b:
            raise TuCoError("Decomposition.ptc_sum / ftc_sum must both be [batch, d_model].")
        if len(self.str_tokens) != b or (self.prompts is not None and len(self.prompts) != b):
            raise TuCoError("Decomposition.str_tokens / prompts must have one entry per prompt.")

    def __repr__(self) -> str:
        """One line: the sizes, the norm and TuCo per prompt (the first eight), no tensor dumps."""
        shown = ", ".join(f"{v:.3f}" for v in self.tuco[:8].detach().float().cpu().tolist())
        more = f", … ({self.n_prompts - 8} more)" if self.n_prompts > 8 else ""
        return (
            f"Decomposition({self.n_prompts} prompt{'s' * (self.n_prompts != 1)} × {self.n_layers} layers × "
            f"{self.tokens.shape[1]} positions, norm={self.norm!r}, tuco=[{shown}{more}])"
        )

    # ---------------------------------------------------------------- shapes and views
    @property
    def n_prompts(self) -> int:
        """Number of prompts (rows)."""
        return self.tokens.shape[0]

    @property
    def n_layers(self) -> int:
        """Number of layers (blocks) of the models."""
        return self.ptc_norm.shape[1]

    @property
    def has_components(self) -> bool:
        """Whether the attention / MLP split is here (``decompose(..., components=True)``)."""
        return self.ftc_attn_sum is not None

    def tuco_shares(self) -> dict[str, Float[Tensor, " batch"]]:
        """How much of TuCo each component carries: ``{"attn", "mlp", "mlp_via_attn"}``.

        With ``F = Σ_l FTC_l`` at the last real token, ``g`` the gradient of ``||F||`` (``sign(F)``
        for L1, ``F / ||F||₂`` for L2) and ``F_c`` the component sums, ``||F|| = Σ_c <F_c, g>``;
        the share of component ``c`` is ``<F_c, g> / (||Σ PTC|| + ||F||)``. The shares add up to
        TuCo exactly; a negative share means the component writes against the total.

        Example:
            >>> dec = pair.decompose(prompts, chat_template=True, components=True)
            >>> shares = dec.tuco_shares()
            >>> [round(v, 3) for v in shares["mlp"].tolist()]       # [batch]
            [0.296, 0.185]
            >>> torch.allclose(sum(shares.values()), dec.tuco, atol=1e-5)
            True
        """
        if not self.has_components:
            raise InputError("tuco_shares() needs pair.decompose(..., components=True).")
        return {c: self._share(getattr(self, f"ftc_{c}_sum")) for c in COMPONENTS}

    def _share(self, part: Float[Tensor, "batch ... d_model"]) -> Float[Tensor, "batch ..."]:
        """``<part, g> / (||Σ PTC|| + ||Σ FTC||)`` with ``g`` the gradient of ``||Σ FTC||``."""
        from tuco_lens.components import norm_gradient

        g = norm_gradient(self.ftc_sum, self.norm)
        denom = vector_norm(self.ptc_sum, self.norm) + vector_norm(self.ftc_sum, self.norm)
        denom = denom.clamp_min(torch.finfo(denom.dtype).tiny)
        extra = part.ndim - 2
        g, denom = g.reshape(g.shape[0], *[1] * extra, -1), denom.reshape(-1, *[1] * extra)
        return (part * g).sum(-1) / denom

    def head_shares(self) -> Float[Tensor, "batch layer head"]:
        """Each head's share of TuCo, as in :meth:`tuco_shares` (with the output biases' share,
        ``<Σ_l ftc_head_bias, g>``, they add up to the attention share).
        """
        if self.ftc_head is None:
            raise InputError("head_shares() needs pair.decompose(..., components=True) with heads.")
        return self._share(self.ftc_head)

    @property
    def preco(self) -> Float[Tensor, " batch"]:
        """PreCo = 1 - TuCo, the pre-training contribution."""
        return 1.0 - self.tuco

    @property
    def last_index(self) -> Int[Tensor, " batch"]:
        """Position of the last real token of each prompt (where TuCo is measured)."""
        return last_real_index(self.attention_mask)

    def at_last_token(self, per_position: Float[Tensor, "batch layer pos"]) -> Float[Tensor, "batch layer"]:
        """Select the last real token of each prompt from a ``[batch, layer, pos]`` tensor.

        Example:
            >>> dec = pair.decompose(prompts, chat_template=True)
            >>> tuple(dec.at_last_token(dec.ftc_norm).shape)   # ||FTC_l|| per layer at the scored token
            (2, 4)
        """
        index = self.last_index.to(per_position.device)[:, None, None]
        return per_position.gather(-1, index.expand(-1, per_position.shape[1], 1))[..., 0]

    def __len__(self) -> int:
        return self.n_prompts

    def __getitem__(self, rows: int | slice | list[int] | Tensor) -> Decomposition:
        """The decomposition of some prompts, e.g. ``dec[0]`` or ``dec[2:5]``."""
        index = torch.arange(self.n_prompts)[rows]
        index = index.reshape(-1)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                values[f.name] = value[index.to(value.device)]
            elif isinstance(value, list):
                values[f.name] = [value[i] for i in index.tolist()]
            else:
                values[f.name] = value
        return Decomposition(**values)

    # ---------------------------------------------------------------- conversions
    def to_dataframe(self) -> pd.DataFrame:
        """A tidy table: one row per prompt, layer and real (unpadded) position.

        Columns: ``prompt_index`` (row of the batch), ``prompt`` (its text, as in
        :meth:`summary`; ``None`` if unknown), ``layer``, ``position`` (0 = first real token),
        ``token``, ``is_last`` (the token TuCo is measured at), ``ptc_norm``, ``ftc_norm``,
        ``ptc_cum_norm``, ``ftc_cum_norm``, ``beta``, with ``components=True`` also
        ``ftc_attn_norm``, ``ftc_mlp_norm``, ``ftc_mlp_via_attn_norm``, and ``tuco`` (the
        prompt's TuCo).

        Example:
            >>> dec = pair.decompose(prompts, chat_template=True)
            >>> df = dec.to_dataframe()
            >>> df[df.is_last].pivot(index="layer", columns="prompt_index", values="beta").round(3)
            prompt_index      0      1
            layer
            0             0.487  0.557
            1             0.464  0.422
            2             0.508  0.416
            3             0.559  0.409
        """
        mask = self.attention_mask.bool().cpu()
        b_idx, p_idx = mask.nonzero(as_tuple=True)
        first = mask.to(torch.long).argmax(-1)
        last = self.last_index.cpu()
        n_real = len(b_idx)
        layers = torch.arange(self.n_layers)
        rows = b_idx.repeat_interleave(self.n_layers)
        prompts = self.prompts if self.prompts is not None else [None] * self.n_prompts
        table = {
            "prompt_index": rows.numpy(),
            "prompt": [prompts[b] for b in rows.tolist()],
            "layer": layers.repeat(n_real).numpy(),
            "position": (p_idx - first[b_idx]).repeat_interleave(self.n_layers).numpy(),
            "token": [self.str_tokens[b][p] for b, p in zip(b_idx.tolist(), p_idx.tolist()) for _ in layers],
            "is_last": (p_idx == last[b_idx]).repeat_interleave(self.n_layers).numpy(),
        }
        names = ["ptc_norm", "ftc_norm", "ptc_cum_norm", "ftc_cum_norm", "beta"]
        if self.has_components:
            names += [f"ftc_{c}_norm" for c in COMPONENTS]
        for name in names:
            values = getattr(self, name).detach().float().cpu()  # [batch, layer, pos]
            table[name] = values[b_idx, :, p_idx].reshape(-1).numpy()
        table["tuco"] = self.tuco.detach().float().cpu()[b_idx].repeat_interleave(self.n_layers).numpy()
        return pd.DataFrame(table)

    def summary(self) -> pd.DataFrame:
        """One row per prompt: ``prompt_index``, ``prompt`` text (if known), ``n_tokens``,
        ``last_token``, ``tuco``, ``preco``, the norms of the summed components at the last
        token and, with ``components=True``, ``tuco_share_attn/mlp/mlp_via_attn``
        (:meth:`tuco_shares`).

        Example:
            >>> dec = pair.decompose(prompts, chat_template=True)
            >>> list(dec.summary().columns)[:4]
            ['prompt_index', 'prompt', 'n_tokens', 'last_token']
            >>> dec.summary().sort_values("tuco")[["prompt_index", "n_tokens", "tuco"]].round(3)
               prompt_index  n_tokens   tuco
            1             1        13  0.409
            0             0         9  0.559
        """
        last = self.last_index.cpu().tolist()
        shares = {}
        if self.has_components:
            shares = {f"tuco_share_{c}": v.detach().float().cpu().numpy() for c, v in self.tuco_shares().items()}
        return pd.DataFrame(
            {
                "prompt_index": range(self.n_prompts),
                "prompt": self.prompts if self.prompts is not None else [None] * self.n_prompts,
                "n_tokens": self.attention_mask.sum(-1).cpu().numpy(),
                "last_token": [toks[i] for toks, i in zip(self.str_tokens, last)],
                "tuco": self.tuco.detach().float().cpu().numpy(),
                "preco": self.preco.detach().float().cpu().numpy(),
                "ptc_sum_norm": vector_norm(self.ptc_sum.float(), self.norm).cpu().numpy(),
                "ftc_sum_norm": vector_norm(self.ftc_sum.float(), self.norm).cpu().numpy(),
                **shares,
            }
        )


#: The per-position tables of every decomposition, ``[batch, layer, pos]``.
_PER_POSITION = ("ptc_norm", "ftc_norm", "ptc_cum_norm", "ftc_cum_norm", "beta")


class DecompositionTables:
    """The tables of a :class:`Decomposition` being built sub-batch by sub-batch.

    ``pair.decompose`` runs length-sorted, padding-trimmed sub-batches; :meth:`fill` puts each
    sub-batch's results back at its rows (and, per position, its columns), and :meth:`result`
    builds the :class:`Decomposition`. Positions no sub-batch filled (padding) stay NaN.

    Example:
        >>> tables = DecompositionTables(2, 4, 5, 128, dtype=torch.float32, device="cpu", components=False)
        >>> sorted(tables.tables)[:3], tuple(tables.tables["beta"].shape)
        (['beta', 'ftc_cum_norm', 'ftc_norm'], (2, 4, 5))
    """

    def __init__(
        self,
        n_rows: int,
        n_layers: int,
        n_positions: int,
        d_model: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        components: bool,
    ) -> None:
        self.n_rows, self.n_layers = n_rows, n_layers
        self.tables: dict[str, Tensor] = {
            "tuco": torch.empty(n_rows, dtype=dtype, device=device),
            "ptc_sum": torch.empty(n_rows, d_model, dtype=dtype, device=device),
            "ftc_sum": torch.empty(n_rows, d_model, dtype=dtype, device=device),
        }
        per_position = _PER_POSITION + (tuple(f"ftc_{c}_norm" for c in COMPONENTS) if components else ())
        for name in per_position:
            self.tables[name] = torch.full((n_rows, n_layers, n_positions), float("nan"), dtype=dtype, device=device)

    def fill(
        self,
        rows: Int[Tensor, " rows"],
        cols: Int[Tensor, " cols"],
        acc: DecompositionAccumulator,
        per_row: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Put a sub-batch's results at ``rows`` (its positions at ``cols``); ``per_row``: more
        per-row results (the component split's), allocated on first sight."""
        device = self.tables["tuco"].device
        rows, cols = rows.to(device), cols.to(device)
        self.tables["tuco"][rows] = acc.tuco()
        self.tables["ptc_sum"][rows], self.tables["ftc_sum"][rows] = acc.last_token_sums()
        layers = torch.arange(self.n_layers, device=device)
        index = (rows[:, None, None], layers[None, :, None], cols[None, None, :])
        for name, table in acc.per_position_tables().items():
            self.tables[name].index_put_(index, table)
        for name, value in (per_row or {}).items():
            if name not in self.tables:
                self.tables[name] = value.new_empty((self.n_rows, *value.shape[1:]))
            self.tables[name][rows] = value

    def result(
        self,
        *,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"],
        str_tokens: list[list[str]],
        prompts: list[str] | None,
        norm: Norm,
        special_tokens: tuple[str, ...] = (),
    ) -> Decomposition:
        """The :class:`Decomposition` of the filled tables."""
        out = self.tables
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
            tokens=tokens,
            attention_mask=attention_mask,
            str_tokens=str_tokens,
            prompts=prompts,
            norm=norm,
            **{name: out[name] for name in sorted(_OPTIONAL) if name in out},
            special_tokens=special_tokens,
        )


class DecompositionAccumulator:
    """Reduces each layer's PTC/FTC as it is produced; keeps no per-layer activation.

    Feed layers in order with :meth:`add`; memory held is two ``[batch, pos, d_model]``
    running sums (``positions="all"``) or two ``[batch, d_model]`` (``positions="last"``), plus
    the small per-layer norm tables. Sums are kept in ``dtype`` (float32 by default) whatever
    the model dtype.

    Args:
        n_layers: Number of blocks.
        attention_mask: ``[batch, pos]`` mask of the batch being run.
        norm: ``"l1"`` or ``"l2"``.
        positions: ``"all"`` for every statistic at every position, ``"last"`` for the sums at
            the last real token only (all that TuCo needs; the batch must be left padded, and
            ``add`` may then receive tensors holding only the last position).
        dtype: Accumulation dtype (float32 or float64).
    """

    def __init__(
        self,
        n_layers: int,
        attention_mask: Int[Tensor, "batch pos"],
        norm: Norm = "l1",
        positions: Literal["all", "last"] = "all",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.n_layers = n_layers
        self.norm: Norm = check_norm(norm)
        self.positions = positions
        self.dtype = dtype
        self.mask = attention_mask
        n_pos = attention_mask.shape[-1]
        self.last_index = last_real_index(attention_mask)
        self.next_layer = 0
        self.ptc_total: Tensor | None = None
        self.ftc_total: Tensor | None = None
        self.first_stream: Tensor | None = None
        self.last_stream: Tensor | None = None
        # Per layer: whether a component is inf/NaN at a real token (checked once, at the end).
        self._non_finite: list[Tensor] = []
        self._model_dtype: torch.dtype | None = None
        b = attention_mask.shape[0]
        if positions == "all":
            shape = (b, n_layers, n_pos)
            device = attention_mask.device
            self.tables = {
                name: torch.empty(shape, dtype=dtype, device=device)
                for name in ("ptc_norm", "ftc_norm", "ptc_cum_norm", "ftc_cum_norm")
            }
        elif positions == "last":
            if bool((self.last_index != n_pos - 1).any()):
                raise TuCoError("positions='last' needs a left-padded batch (last real token at -1).")
            self.tables = {}
        else:
            raise InputError(f"positions must be 'all' or 'last', got {positions!r}.")

    def _select(self, t: Tensor) -> Tensor:
        if self.positions == "all":
            return t.to(self.dtype)
        return t[:, -1].to(self.dtype)

    def _at_last(self, t: Tensor) -> Tensor:
        """A selected ``[batch, (pos,) d]`` tensor at each row's last real token: ``[batch, d]``."""
        if self.positions == "last":
            return t
        rows = torch.arange(t.shape[0], device=t.device)
        return t[rows, self.last_index.to(t.device)]

    def last_token_streams(self) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, "batch d_model"]]:
        """``(x_0, x_L)`` at the last real token: the embedding and the final residual stream."""
        self._check_complete()
        # Complete: layer 0 set the first stream and layer n_layers - 1 the last.
        assert self.first_stream is not None and self.last_stream is not None
        return self.first_stream, self.last_stream

    def add(
        self,
        layer: int,
        resid_pre: Float[Tensor, "batch pos d_model"],
        pt_resid_post: Float[Tensor, "batch #pos d_model"],  # noqa: F821, UP037 - "#pos": pos or 1 (jaxtyping)
        ft_resid_post: Float[Tensor, "batch pos d_model"],
    ) -> None:
        """Add layer ``layer``: ``PTC = pt_resid_post - resid_pre``, ``FTC = ft - pt``.

        ``pt_resid_post`` holds the last position only (``[batch, 1, d_model]``) on the last-token
        path (``PairedBlocks(pt_last_only=True)``: ``pair.tuco``, ``pair.logit_attribution``)."""
        if layer != self.next_layer:
            raise TuCoError(
                f"Layer {layer} reached the decomposition out of order (expected layer "
                f"{self.next_layer}). Did a hook skip or re-run a block?"
            )
        x, pt, ft = (self._select(t) for t in (resid_pre, pt_resid_post, ft_resid_post))
        device = self.mask.device
        if layer == 0:
            self.first_stream = self._at_last(x).to(device)
        if layer == self.n_layers - 1:
            self.last_stream = self._at_last(ft).to(device)
        ptc = (pt - x).to(device)
        ftc = (ft - pt).to(device)
        self._record_non_finite(ptc, ftc, resid_pre.dtype)
        if self.ptc_total is None or self.ftc_total is None:  # layer 0: both are None
            self.ptc_total, self.ftc_total = ptc, ftc  # fresh tensors, made above
        else:
            self.ptc_total += ptc
            self.ftc_total += ftc
        if self.positions == "all":
            self.tables["ptc_norm"][:, layer] = vector_norm(ptc, self.norm)
            self.tables["ftc_norm"][:, layer] = vector_norm(ftc, self.norm)
            self.tables["ptc_cum_norm"][:, layer] = vector_norm(self.ptc_total, self.norm)
            self.tables["ftc_cum_norm"][:, layer] = vector_norm(self.ftc_total, self.norm)
        self.next_layer += 1

    def _record_non_finite(self, ptc: Tensor, ftc: Tensor, model_dtype: torch.dtype) -> None:
        bad = ~(torch.isfinite(ptc).all(-1) & torch.isfinite(ftc).all(-1))  # [batch, pos] or [batch]
        if self.positions == "all":
            bad &= self.mask.bool()
        self._non_finite.append(bad.any())
        self._model_dtype = model_dtype

    def _check_complete(self) -> None:
        if self.next_layer != self.n_layers:
            raise TuCoError(
                f"Only {self.next_layer} of {self.n_layers} layers were decomposed. Was the "
                "forward pass stopped early (stop_at_layer) or a block skipped?"
            )
        flags = torch.stack(self._non_finite)
        if bool(flags.any()):
            layer = int(flags.nonzero()[0, 0])
            raise NonFiniteError(
                f"PTC/FTC of layer {layer} are not finite (inf or NaN) at a real token, so no TuCo "
                f"can be computed; the {self._model_dtype} forward pass produced them. In float16 "
                "this is an overflow of a massive activation (|x| in the tens of thousands at the "
                "first token, normal in real models; float16's largest value is 65504): load the "
                "pair with dtype='bfloat16' or 'float32'."
            )

    def last_token_sums(self) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, "batch d_model"]]:
        """``(Σ_l PTC_l, Σ_l FTC_l)`` at the last real token."""
        self._check_complete()
        ptc_total, ftc_total = self.ptc_total, self.ftc_total
        assert ptc_total is not None and ftc_total is not None  # complete: layer 0 set them
        if self.positions == "last":
            return ptc_total, ftc_total
        rows = torch.arange(self.mask.shape[0], device=self.mask.device)
        return ptc_total[rows, self.last_index], ftc_total[rows, self.last_index]

    def tuco(self) -> Float[Tensor, " batch"]:
        """TuCo at the last real token (Definition 4.3)."""
        ptc, ftc = self.last_token_sums()
        return ratio(vector_norm(ftc, self.norm), vector_norm(ptc, self.norm))

    def per_position_tables(self) -> dict[str, Float[Tensor, "batch layer pos"]]:
        """Norm tables and ``beta`` with ``NaN`` at padding (``positions="all"`` only)."""
        self._check_complete()
        if self.positions != "all":
            raise TuCoError("Per-position tables need positions='all'.")
        pad = ~self.mask.bool()[:, None, :]
        tables = dict(self.tables)
        tables["beta"] = ratio(tables["ftc_cum_norm"], tables["ptc_cum_norm"])
        return {k: v.masked_fill(pad, float("nan")) for k, v in tables.items()}
