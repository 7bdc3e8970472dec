"""What fine-tuning does to the output tokens: direct logit attribution and output-level KL.

At the last real token the fine-tuned final stream is ``x_L = x_0 + Σ_l PTC_l + Σ_l FTC_l``.
Each part goes through the fine-tuned final norm **with its scale frozen** at the value on the
actual ``x_L`` (TransformerLens's ``apply_ln_to_stack`` convention: LayerNorm centres each part and
divides by ``σ(x_L)``; RMSNorm divides by ``rms(x_L)``; the norm's weight is applied, its bias is
a part of its own) and then through the unembedding. The direct effects of ``x_0``, ``Σ PTC`` and
``Σ FTC`` plus the ``bias`` part (norm bias and unembedding bias) add up to the fine-tuned logits.
With ``components=True`` the FTC part splits further into attention, MLP and MLP←attention, and
attention into heads plus the output-bias difference (:mod:`tuco_lens.components`).

:class:`OutputComparison` is the output-level view beside TuCo: per-token KL(FT ‖ PT) against
the pre-trained model's own forward pass and KL(FT ‖ α=0), with the tokens whose log-probability
fine-tuning changed most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tuco_lens.errors import InputError, TuCoError

__all__ = ["FrozenNorm", "LogitAttribution", "OutputComparison", "kl_per_token"]


@dataclass(frozen=True)
class FrozenNorm:
    """A final LayerNorm or RMSNorm as an affine map with its scale frozen.

    ``norm(x) = center(x) / s(x) ⊙ w + b`` with ``center`` the mean subtraction (LayerNorm) or the
    identity (RMSNorm) and ``s(x) = sqrt(mean(center(x)²) + eps)``. With ``s`` fixed at ``s(x_L)``
    the map is linear in its input, so parts of ``x_L`` get additive direct effects.
    """

    centers: bool
    weight: Tensor
    bias: Tensor
    eps: float

    @classmethod
    def of(cls, module: torch.nn.Module, d_model: int) -> FrozenNorm:
        """Read a LayerNorm / RMSNorm module (TransformerLens or Hugging Face), probing it.

        Raises:
            TuCoError: no epsilon attribute, or a norm of another kind.
        """
        eps = next((getattr(module, n) for n in ("eps", "variance_epsilon") if hasattr(module, n)), None)
        param = next(module.parameters(), None)
        if eps is None or param is None:
            raise TuCoError(
                f"Logit attribution needs a LayerNorm or RMSNorm as final norm; {type(module).__name__} "
                "has no epsilon or no weight."
            )
        ones = torch.ones(1, d_model, dtype=param.dtype, device=param.device)
        with torch.no_grad():
            zero_out = module(torch.zeros_like(ones)).float()[0]
            const_out = module(1000.0 * ones).float()[0]
            centers = bool(torch.allclose(const_out, zero_out, atol=1e-4))
            if centers:
                weight = next(getattr(module, n) for n in ("weight", "w") if hasattr(module, n)).float()
            else:  # RMSNorm: rms(1) = 1, so norm(1) = w / sqrt(1 + eps) for any weight parametrisation
                weight = module(ones).float()[0] * (1.0 + float(eps)) ** 0.5
        return cls(centers, weight, zero_out, float(eps))

    def _center(self, v: Tensor) -> Tensor:
        return v - v.mean(-1, keepdim=True) if self.centers else v

    def scale(self, x: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch 1"]:
        """``s(x)``: the norm's scale on the actual stream."""
        return (self._center(x).pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def apply(self, v: Float[Tensor, "batch ... d_model"], scale: Tensor) -> Tensor:
        """``center(v) / s ⊙ w`` (no bias); ``scale`` broadcasts over ``v``'s middle axes."""
        while scale.ndim < v.ndim:
            scale = scale[:, None]
        return self._center(v) / scale * self.weight.to(v.device)


@dataclass(frozen=True)
class LogitAttribution:
    """Direct effects on the fine-tuned logits at the last real token (``pair.logit_attribution``).

    Attributes:
        direct: ``part -> [batch, d_vocab]``: ``"embedding"`` (x_0), ``"ptc"``, ``"ftc"`` and
            ``"bias"`` add up to :attr:`logits`; with components also ``"ftc_attn"``,
            ``"ftc_mlp"``, ``"ftc_mlp_via_attn"`` (they add up to ``"ftc"``) and, with heads,
            ``"ftc_head_bias"`` (with the heads it adds up to ``"ftc_attn"``).
        logits: The fine-tuned logits at the last real token. ``[batch, d_vocab]``
        head_normed: Each head's FTC after the frozen final norm (``[batch, layer, head,
            d_model]``), or None; :meth:`head_direct` unembeds it.
        unembed: ``W_U`` ``[d_model, d_vocab]`` (the model's own tensor, not a copy).
        token_strings: The vocabulary as strings, for :meth:`top_tokens`.
        prompts: The prompts as given, if known.

    Example:
        >>> attr = pair.logit_attribution(prompts, chat_template=True, components=True)
        >>> sorted(attr.direct)
        ['bias', 'embedding', 'ftc', 'ftc_attn', 'ftc_head_bias', 'ftc_mlp', 'ftc_mlp_via_attn', 'ptc']
        >>> top = attr.top_tokens(2)            # promoted / suppressed tokens per part
        >>> top[(top.prompt == 0) & (top.part == "ftc")][["direction", "token", "logit_effect"]].round(1)
            direction      token  logit_effect
        0    promoted          i          10.8
        1    promoted        you           6.2
        4  suppressed  toadstool          -6.3
        5  suppressed     hserfo          -5.7
    """

    direct: dict[str, Float[Tensor, "batch d_vocab"]]
    logits: Float[Tensor, "batch d_vocab"]
    head_normed: Float[Tensor, "batch layer head d_model"] | None = None
    unembed: Float[Tensor, "d_model d_vocab"] | None = field(default=None, repr=False)
    token_strings: list[str] | None = field(default=None, repr=False)
    prompts: list[str] | None = None

    SUM_PARTS = ("embedding", "ptc", "ftc", "bias")

    def total(self) -> Float[Tensor, "batch d_vocab"]:
        """``embedding + ptc + ftc + bias``: equals :attr:`logits` (checked at construction)."""
        return cast(Tensor, sum(self.direct[p] for p in self.SUM_PARTS))  # not 0: SUM_PARTS is not empty

    def head_direct(self, layer: int, head: int) -> Float[Tensor, "batch d_vocab"]:
        """The direct effect of head ``(layer, head)``'s FTC on the logits."""
        if self.head_normed is None or self.unembed is None:  # both come with heads
            raise InputError("head_direct() needs pair.logit_attribution(..., components=True) with heads.")
        return self.head_normed[:, layer, head].to(self.unembed.device) @ self.unembed.float()

    def top_tokens(self, k: int = 10, parts: list[str] | None = None, heads: list[tuple[int, int]] | None = None) -> pd.DataFrame:
        """The ``k`` tokens each part promotes and suppresses most, as a tidy table.

        Args:
            k: Tokens per direction.
            parts: Parts of :attr:`direct` (default: ``"ftc"`` and the components if present).
            heads: ``(layer, head)`` pairs to add as parts ``"head L.H"``.

        Returns:
            Columns ``prompt``, ``part``, ``direction`` (``"promoted"`` / ``"suppressed"``),
            ``rank`` (1 = strongest), ``token_id``, ``token``, ``logit_effect``.
        """
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}.")
        if parts is None:
            parts = [p for p in ("ftc", "ftc_attn", "ftc_mlp", "ftc_mlp_via_attn") if p in self.direct]
        unknown = [p for p in parts if p not in self.direct]
        if unknown:
            raise InputError(f"Unknown parts {unknown}; available: {sorted(self.direct)}.")
        effects = {p: self.direct[p] for p in parts}
        for layer, head in heads or []:
            effects[f"head {layer}.{head}"] = self.head_direct(layer, head)
        rows = []
        for part, values in effects.items():
            values = values.detach().float().cpu()
            kk = min(k, values.shape[-1])
            for direction, (top, ids) in (("promoted", values.topk(kk, -1)), ("suppressed", (-values).topk(kk, -1))):
                for prompt in range(values.shape[0]):
                    for rank, (value, token_id) in enumerate(zip(top[prompt].tolist(), ids[prompt].tolist()), 1):
                        rows.append({
                            "prompt": prompt, "part": part, "direction": direction, "rank": rank,
                            "token_id": token_id, "token": self._token(token_id),
                            "logit_effect": value if direction == "promoted" else -value,
                        })
        return pd.DataFrame(rows)

    def _token(self, token_id: int) -> str:
        return self.token_strings[token_id] if self.token_strings is not None else str(token_id)


def kl_per_token(
    logits_p: Float[Tensor, "batch pos d_vocab"], logits_q: Float[Tensor, "batch pos d_vocab"]
) -> Float[Tensor, "batch pos"]:
    """``KL(p ‖ q) = Σ_v p_v (log p_v - log q_v)`` per position, in float32 (float64 stays)."""
    dtype = torch.float64 if logits_p.dtype == torch.float64 else torch.float32
    log_p = torch.log_softmax(logits_p.to(dtype), -1)
    log_q = torch.log_softmax(logits_q.to(dtype), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@dataclass(frozen=True)
class OutputComparison:
    """Output-level effect of fine-tuning per token (``pair.compare_outputs``).

    Attributes:
        kl_ft_pt: KL(FT ‖ PT), the pre-trained model's own forward pass as PT. ``[batch, pos]``
        kl_ft_alpha0: KL(FT ‖ α=0): the pre-trained blocks on the fine-tuned embedding and
            unembedding. Equal to ``kl_ft_pt`` when those are shared. ``[batch, pos]``
        logprob_change: ``log p_FT - log p_PT`` at the last real token. ``[batch, d_vocab]``
        tokens, attention_mask: The scored tokens and their mask. ``[batch, pos]``
        str_tokens: Token strings per prompt (padding as ``""``); NaN KL at padding.
        token_strings: The vocabulary as strings.
        prompts: The prompts as given, if known.

    Example:
        >>> out = pair.compare_outputs(prompts, chat_template=True)
        >>> round(float(out.kl_ft_pt[0, -1]), 3)          # KL(ft || pt) at the last token
        15.103
        >>> out.top_tokens(2)[["prompt", "direction", "token", "logprob_change"]].round(1)
           prompt direction    token  logprob_change
        0       0    raised        i            15.2
        1       0    raised   gentle            11.7
        2       1    raised  carrots             0.3
        3       1    raised      for             0.2
        4       0   lowered      the            -7.7
        5       0   lowered    emoho            -3.3
        6       1   lowered     days           -11.5
        7       1   lowered      owl           -10.2
    """

    kl_ft_pt: Float[Tensor, "batch pos"]
    kl_ft_alpha0: Float[Tensor, "batch pos"]
    logprob_change: Float[Tensor, "batch d_vocab"]
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    str_tokens: list[list[str]]
    token_strings: list[str] | None = field(default=None, repr=False)
    prompts: list[str] | None = None

    def to_dataframe(self) -> pd.DataFrame:
        """One row per prompt and real token: ``prompt``, ``position``, ``token``, ``kl_ft_pt``, ``kl_ft_alpha0``."""
        mask = self.attention_mask.bool().cpu()
        b_idx, p_idx = mask.nonzero(as_tuple=True)
        first = mask.long().argmax(-1)
        return pd.DataFrame({
            "prompt": b_idx.numpy(),
            "position": (p_idx - first[b_idx]).numpy(),
            "token": [self.str_tokens[b][p] for b, p in zip(b_idx.tolist(), p_idx.tolist())],
            "kl_ft_pt": self.kl_ft_pt.float().cpu()[b_idx, p_idx].numpy(),
            "kl_ft_alpha0": self.kl_ft_alpha0.float().cpu()[b_idx, p_idx].numpy(),
        })

    def top_tokens(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` next tokens whose log-probability fine-tuning raised and lowered most.

        Columns ``prompt``, ``direction`` (``"raised"`` / ``"lowered"``), ``rank``, ``token_id``,
        ``token``, ``logprob_change`` (at the last real token).
        """
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}.")
        change = self.logprob_change.detach().float().cpu()
        kk = min(k, change.shape[-1])
        rows: list[dict[str, Any]] = []
        for direction, sign in (("raised", 1.0), ("lowered", -1.0)):
            values, ids = (sign * change).topk(kk, -1)
            for prompt in range(change.shape[0]):
                for rank, (value, token_id) in enumerate(zip(values[prompt].tolist(), ids[prompt].tolist()), 1):
                    token = self.token_strings[token_id] if self.token_strings is not None else str(token_id)
                    rows.append({"prompt": prompt, "direction": direction, "rank": rank, "token_id": token_id,
                                 "token": token, "logprob_change": sign * value})
        return pd.DataFrame(rows)
