"""Independent reference implementation of TuCo written directly against Hugging Face ``transformers``.

This module is the *ground truth* the ``tuco_lens`` test suite is checked against. It deliberately does
not import TransformerLens (nor ``tuco_lens``): everything is computed from the Hugging Face decoder
layers themselves, so a bug in the TransformerLens plumbing cannot hide in both sides of a comparison.

Specification: ``../shared/tuco-paper.md`` (beside the checkout) (Nuti et al., "TuCo", ICML 2025).

Definitions used here (the paper's canonical decomposition, Prop. D.3)
-----------------------------------------------------------------------
Let ``x_l`` be the FINE-TUNED model's residual stream entering decoder layer ``l`` (``x_0`` is the
fine-tuned embedding output, including learned positional embeddings for GPT-2 and the sqrt(d) scaling of
Gemma). A "layer" is a whole Hugging Face decoder block (attention + MLP), so for a block ``B``,
``f(x) = B(x) - x``.

* ``PTC_l = pt_layer_l(x_l) - x_l``      (pre-trained block applied to the fine-tuned stream)
* ``FTC_l = ft_layer_l(x_l) - pt_layer_l(x_l)``
* ``x_{l+1} = ft_layer_l(x_l) = x_l + PTC_l + FTC_l``   (the stream is the fine-tuned model's own)
* ``TuCo = ||sum_l FTC_l[n]||_1 / (||sum_l PTC_l[n]||_1 + ||sum_l FTC_l[n]||_1)`` at the last real token n.

The pre-trained block is called on *all positions* with *exactly* the arguments the fine-tuned block
received in the fine-tuned forward pass (same 4D attention mask as Hugging Face prepared it, same position
ids, same rotary ``position_embeddings``), except that any KV cache is removed.

Note on rotary embeddings: we reuse the fine-tuned layer's ``position_embeddings`` (cos, sin) kwargs for
the pre-trained layer. Rotary embeddings have no trained weights, so in a fine-tune the pre-trained
model's ``rotary_emb`` module produces the same values (assuming the same ``rope_theta`` / rope scaling).

FTC_alpha-scaling (Definition 5.1)
----------------------------------
``x_{l+1} = x_l + PTC(x_l) + alpha_l * FTC(x_l)`` with both components recomputed on the *scaled* stream,
implemented as a forward hook that replaces each fine-tuned block's output with
``torch.lerp(pt_out, ft_out, alpha_l)`` (``lerp`` is exact at alpha 0 and 1). The fine-tuned model's
embedding, final norm and unembedding are used.

Requirements / limitations
--------------------------
* Both models must use the same ``attn_implementation`` (the mask Hugging Face builds depends on it:
  "eager" receives a 4D additive float mask, "sdpa" a 4D boolean mask or ``None``). "eager" and "sdpa"
  both work with left and right padding in float32/bfloat16 (the self-tests use "eager" and also run
  the padding tests with "sdpa"). For float64 models WITH padding use "sdpa": HF's eager attention yields
  NaN there (softmax computed in float32 turns the float64 mask minimum into -inf on fully masked pad
  rows); the reference raises a RuntimeError if real-token logits come out NaN. Even unpadded, eager
  float64 is only ~1e-8 accurate for the rotary models (their eager softmax runs in float32).
* Padding: pass an ``attention_mask``; left and right padding both work for the decomposition and the
  alpha logits. ``position_ids`` are always derived from the mask (``position_ids_from_mask``) so that
  padded rows use the same positions as the unpadded prompt.
* No KV cache anywhere: ``reference_greedy_generate`` re-runs the full sequence at every step.
* Single device, no gradient (everything runs under ``torch.no_grad()``).
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from typing import Any, Iterator, Sequence

import torch

__all__ = [
    "decoder_layers",
    "position_ids_from_mask",
    "reference_decomposition",
    "reference_alpha_logits",
    "reference_greedy_generate",
    "reference_components",
    "reference_component_alpha_logits",
    "reference_outputco",
    "sub_blocks",
    "head_projection",
]

# Names under which Hugging Face decoder layers receive a KV cache (they differ per architecture:
# Llama/Mistral/Qwen2/Gemma/GPT-2 use ``past_key_values``, GPT-NeoX uses ``layer_past``; older releases used
# ``past_key_value``). The reference never lets a layer read or write a cache.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------
def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Return the list of decoder blocks of a Hugging Face causal LM.

    Supports ``model.model.layers`` (Llama, Mistral, Qwen2, Gemma, ...), ``model.transformer.h`` (GPT-2,
    GPT-J, ...) and ``model.gpt_neox.layers`` (GPT-NeoX / Pythia). Also accepts the bare base model.
    """
    candidates = (
        ("model", "layers"),
        ("transformer", "h"),
        ("gpt_neox", "layers"),
        ("layers",),
        ("h",),
    )
    for path in candidates:
        obj: Any = model
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"Cannot find the decoder layers of {type(model).__name__}")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Position ids that count only real tokens: ``(cumsum(mask) - 1).clamp(min=0)``.

    Left padding: pads get 0, the first real token 0, then 1, 2, ...  Right padding: real tokens get 0..k-1
    and the trailing pads repeat k-1. Either way every real token has the position it would have in the
    unpadded prompt.
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _prepare_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Return an explicit 2D {0,1} long mask (all ones when ``attention_mask`` is None).

    An explicit mask is always passed to Hugging Face: with ``attention_mask=None`` transformers 5 inspects
    ``position_ids`` for "packed sequences" (position resets), which would not be what we want.
    """
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.to(device=input_ids.device).long()
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("every row of attention_mask needs at least one real token")
    return mask


def _last_real_index(mask: torch.Tensor) -> torch.LongTensor:
    """Index of the last position where ``mask == 1`` in each row (left or right padding)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values


def _check_pair(pt: torch.nn.Module, ft: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.ModuleList]:
    pt_layers, ft_layers = decoder_layers(pt), decoder_layers(ft)
    if len(pt_layers) != len(ft_layers):
        raise ValueError(f"layer count differs: pre-trained {len(pt_layers)} vs fine-tuned {len(ft_layers)}")
    pt_attn = getattr(pt.config, "_attn_implementation", None)
    ft_attn = getattr(ft.config, "_attn_implementation", None)
    if pt_attn != ft_attn:
        raise ValueError(
            f"pre-trained and fine-tuned models must use the same attn_implementation "
            f"(got {pt_attn!r} vs {ft_attn!r}): the fine-tuned model's attention mask is reused"
        )
    if pt.training or ft.training:
        raise ValueError("call .eval() on both models first (dropout would make the reference random)")
    return pt_layers, ft_layers


def _alphas(alpha: float | Sequence[float], n_layers: int) -> list[float]:
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.tolist()
    if isinstance(alpha, numbers.Real):
        return [float(alpha)] * n_layers
    alphas = [float(a) for a in alpha]
    if len(alphas) != n_layers:
        raise ValueError(f"alpha has {len(alphas)} entries but the model has {n_layers} layers")
    return alphas


def _hidden_of(output: Any) -> torch.Tensor:
    """Decoder layers in transformers 5 return a tensor; older ones / some models return a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


def _bind_layer_call(layer: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Turn the (args, kwargs) a decoder layer received into one dict of named arguments.

    GPT-2 passes some arguments positionally (``block(hidden, past_key_values, causal_mask,
    encoder_hidden_states, ...)``), the others by keyword; binding against the forward signature makes them
    uniform. The cache arguments are set to None and ``use_cache`` to False so that no cache is read or
    written when the pre-trained layer is called.
    """
    sig = inspect.signature(layer.forward)  # follows functools.wraps of the gradient-checkpointing wrapper
    bound = sig.bind(*args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(layer).__name__}.forward takes *args; cannot bind its call")
        else:
            named[name] = value
    for name in _CACHE_KWARGS:
        if name in named:
            named[name] = None
    if "use_cache" in named:
        named["use_cache"] = False
    first = next(iter(sig.parameters))
    if first != "hidden_states":  # not seen in the supported models, but keep the contract explicit
        named["hidden_states"] = named.pop(first)
    return named


def _call_layer(layer: torch.nn.Module, named: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor:
    """Call ``layer`` with the captured arguments but the given hidden states; return its hidden output."""
    call = dict(named)
    call["hidden_states"] = hidden
    return _hidden_of(layer(**call))


@contextlib.contextmanager
def _hooked(ft_layers: torch.nn.ModuleList, pt_layers: torch.nn.ModuleList, on_layer) -> Iterator[None]:
    """Install hooks on every fine-tuned decoder layer.

    For layer ``l`` the pre-hook records the exact (args, kwargs) the fine-tuned layer received (with a
    clone of the incoming hidden states, so nothing done in place later can change them); the forward hook
    then calls the pre-trained layer ``l`` on the same inputs and passes
    ``(l, x_l, pt_out, ft_out)`` to ``on_layer``, whose return value (a tensor or None) replaces the
    fine-tuned layer's hidden output.

    A re-entrancy guard makes this work when ``pt`` and ``ft`` are the very same module objects (calling
    the "pre-trained" layer would otherwise fire these hooks again).
    """
    state = {"busy": False}
    captured: dict[int, dict[str, Any]] = {}
    handles = []

    def make(l: int):
        def pre_hook(module, args, kwargs):
            if state["busy"]:
                return None
            named = _bind_layer_call(module, args, kwargs)
            named["hidden_states"] = named["hidden_states"].clone()
            captured[l] = named
            return None

        def fwd_hook(module, args, kwargs, output):
            if state["busy"]:
                return None
            named = captured.pop(l)
            x = named["hidden_states"]
            state["busy"] = True
            try:
                pt_out = _call_layer(pt_layers[l], named, x)
            finally:
                state["busy"] = False
            ft_out = _hidden_of(output)
            new = on_layer(l, x, pt_out, ft_out)
            if new is None:
                return None
            return _replace_hidden(output, new)

        return pre_hook, fwd_hook

    try:
        for l, layer in enumerate(ft_layers):
            pre_hook, fwd_hook = make(l)
            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(fwd_hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _forward(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor):
    """One full forward of a HF causal LM without cache, with positions derived from the mask.

    Raises if the logits of a real (non-pad) token are NaN. Known cause (transformers 5.x): "eager"
    attention computes the softmax in float32, so in a float64 model the float64 ``finfo.min`` of the mask
    becomes -inf; the fully masked query rows of left padding then give NaN, which leaks into real tokens at
    the next layer (0 * NaN in ``attn_weights @ value``). "sdpa" does not have this problem.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
    )
    if bool(torch.isnan(out.logits[mask.bool()]).any()):
        raise RuntimeError(
            "NaN logits at real tokens. With padding, Hugging Face 'eager' attention produces NaN in float64 "
            "(softmax in float32 turns the float64 mask minimum into -inf); use attn_implementation='sdpa' "
            "or float32 for padded float64 runs."
        )
    return out


def _norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "l1":
        return x.abs().sum(-1)
    if norm == "l2":
        return x.pow(2).sum(-1).sqrt()
    raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_decomposition(
    pt: torch.nn.Module,
    ft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    norm: str = "l1",
) -> dict[str, torch.Tensor]:
    """Canonical PTC/FTC decomposition and TuCo for a batch of prompts.

    Runs the fine-tuned model once (``use_cache=False``); at each fine-tuned decoder layer ``l`` the
    pre-trained layer ``l`` is called on the same inputs (the fine-tuned stream ``x_l``).

    Args:
        pt, ft: pre-trained and fine-tuned Hugging Face causal LMs (same architecture, ``eval()`` mode).
        input_ids: ``[batch, pos]`` token ids.
        attention_mask: ``[batch, pos]`` 1 for real tokens, 0 for padding (left or right); None = no padding.
        norm: ``"l1"`` (the paper) or ``"l2"``.

    Returns a dict of float64 tensors (``L`` = number of layers, ``d`` = d_model):
        ``tuco``            [batch]          TuCo at the last real token of each row.
        ``tuco_per_token``  [batch, pos]     the same ratio at every position; NaN at padding.
        ``beta``            [batch, L, pos]  cumulative ratio over layers 0..l inclusive
                                             (``beta[:, -1] == tuco_per_token``); NaN at padding.
        ``ptc_norm``        [batch, L, pos]  ||PTC_l|| per layer and position; NaN at padding.
        ``ftc_norm``        [batch, L, pos]  ||FTC_l||; NaN at padding.
        ``ptc_sum``         [batch, d]       sum over layers of PTC_l at the last real token.
        ``ftc_sum``         [batch, d]       sum over layers of FTC_l at the last real token.
        ``ptc``             [batch, L, pos, d]  PTC_l at every position (raw, padding not masked).
        ``ftc``             [batch, L, pos, d]  FTC_l at every position (raw, padding not masked).
        ``resid``           [batch, L+1, pos, d]  fine-tuned residual stream x_0..x_L: the block inputs and
                                             the last block's output (before the final norm; raw at padding).
        ``last_index``      [batch] (int64)  index of the last real token used for ``tuco``.
        ``logits``          [batch, pos, vocab]  the fine-tuned model's logits from the same pass
                                             (model dtype), handy for sanity checks.

    Differences ``pt_out - x`` and ``ft_out - pt_out`` are taken in float64 after upcasting the layer
    outputs, so ``x_l + PTC_l + FTC_l == x_{l+1}`` holds to float64 rounding.
    """
    pt_layers, ft_layers = _check_pair(pt, ft)
    mask = _prepare_mask(input_ids, attention_mask)
    n_layers = len(ft_layers)

    xs: list[torch.Tensor | None] = [None] * n_layers
    pt_outs: list[torch.Tensor | None] = [None] * n_layers
    ft_outs: list[torch.Tensor | None] = [None] * n_layers

    def record(l, x, pt_out, ft_out):
        xs[l], pt_outs[l], ft_outs[l] = x.double(), pt_out.double(), ft_out.double()
        return None  # leave the fine-tuned forward untouched

    with _hooked(ft_layers, pt_layers, record):
        logits = _forward(ft, input_ids, mask).logits
    if any(t is None for t in xs):
        raise RuntimeError("some decoder layers were not called during the forward pass")

    x = torch.stack(xs, dim=1)  # [b, L, p, d]
    pt_out = torch.stack(pt_outs, dim=1)
    ft_out = torch.stack(ft_outs, dim=1)
    ptc = pt_out - x
    ftc = ft_out - pt_out
    resid = torch.cat([x, ft_out[:, -1:]], dim=1)  # x_0..x_{L-1}, then x_L = output of the last block

    pad = ~mask.bool()  # [b, p]
    ptc_cum = ptc.cumsum(dim=1)  # [b, L, p, d]: sum over layers 0..l inclusive
    ftc_cum = ftc.cumsum(dim=1)
    ptc_cum_norm = _norm(ptc_cum, norm)
    ftc_cum_norm = _norm(ftc_cum, norm)
    beta = ftc_cum_norm / (ptc_cum_norm + ftc_cum_norm)
    beta = beta.masked_fill(pad[:, None, :], float("nan"))
    tuco_per_token = beta[:, -1].clone()

    ptc_norm = _norm(ptc, norm).masked_fill(pad[:, None, :], float("nan"))
    ftc_norm = _norm(ftc, norm).masked_fill(pad[:, None, :], float("nan"))

    last = _last_real_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    ptc_sum = ptc_cum[rows, -1, last]  # [b, d]
    ftc_sum = ftc_cum[rows, -1, last]
    p_n, f_n = _norm(ptc_sum, norm), _norm(ftc_sum, norm)
    tuco = f_n / (p_n + f_n)

    return {
        "tuco": tuco,
        "tuco_per_token": tuco_per_token,
        "beta": beta,
        "ptc_norm": ptc_norm,
        "ftc_norm": ftc_norm,
        "ptc_sum": ptc_sum,
        "ftc_sum": ftc_sum,
        "ptc": ptc,
        "ftc": ftc,
        "resid": resid,
        "last_index": last,
        "logits": logits,
    }


@torch.no_grad()
def reference_alpha_logits(
    pt: torch.nn.Module,
    ft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    alpha: float | Sequence[float] = 1.0,
) -> torch.Tensor:
    """Logits of the FTC_alpha-scaled model (Definition 5.1), ``[batch, pos, vocab]`` in the model dtype.

    At every layer ``x_{l+1} = x_l + PTC(x_l) + alpha_l * FTC(x_l) = lerp(pt_layer(x_l), ft_layer(x_l), alpha_l)``
    where ``x_l`` is the *scaled* stream (each block, pre-trained and fine-tuned, sees the output of the
    previous scaled block). Embedding, final norm and unembedding are the fine-tuned model's.

    ``alpha`` is one float for all layers or a sequence with one value per layer. ``alpha=1`` reproduces the
    fine-tuned logits exactly; ``alpha=0`` reproduces the pre-trained logits when only the decoder layers
    differ between the two models. No KV cache is used.
    """
    pt_layers, ft_layers = _check_pair(pt, ft)
    mask = _prepare_mask(input_ids, attention_mask)
    alphas = _alphas(alpha, len(ft_layers))

    def scale(l, x, pt_out, ft_out):
        return torch.lerp(pt_out, ft_out, alphas[l])

    with _hooked(ft_layers, pt_layers, scale):
        return _forward(ft, input_ids, mask).logits


@torch.no_grad()
def reference_greedy_generate(
    pt: torch.nn.Module,
    ft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    alpha: float | Sequence[float] = 1.0,
    max_new_tokens: int = 8,
) -> torch.Tensor:
    """Greedy decoding from the alpha-scaled model, without KV cache.

    Each step re-runs :func:`reference_alpha_logits` on the whole sequence so far and appends the argmax of
    the last position's logits (no EOS handling: exactly ``max_new_tokens`` tokens are generated). Batched
    prompts must be LEFT-padded (the new token is appended at the end of every row).

    Returns ``[batch, prompt_len + max_new_tokens]`` token ids (prompt included, padding kept).
    """
    mask = _prepare_mask(input_ids, attention_mask)
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("reference_greedy_generate needs left padding (last column must be real tokens)")
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = reference_alpha_logits(pt, ft, ids, mask, alpha=alpha)
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True).to(ids.dtype)
        ids = torch.cat([ids, next_token], dim=-1)
        mask = torch.cat([mask, torch.ones_like(next_token, dtype=mask.dtype)], dim=-1)
    return ids


# ---------------------------------------------------------------------------------------------------------
# Inside the block: the attention / MLP / head split (tuco_lens.components), written on the HF modules
# ---------------------------------------------------------------------------------------------------------
def sub_blocks(layer: torch.nn.Module) -> dict[str, Any]:
    """The sub-modules of a Hugging Face decoder layer, named as the layer's own forward uses them.

    Returns ``{"attn", "norm_attn", "mlp", "norm_mlp", "o_proj", "parallel"}``: the attention module
    (its output ``[0]`` is what the layer adds to the stream), its input norm, the MLP and its input
    norm, the attention's output projection, and whether attention and MLP both read the block input.
    """
    if hasattr(layer, "self_attn"):  # Llama, Mistral, Qwen2, Gemma
        return dict(attn=layer.self_attn, norm_attn=layer.input_layernorm, mlp=layer.mlp,
                    norm_mlp=layer.post_attention_layernorm, o_proj=layer.self_attn.o_proj, parallel=False)
    if hasattr(layer, "ln_1"):  # GPT-2
        return dict(attn=layer.attn, norm_attn=layer.ln_1, mlp=layer.mlp, norm_mlp=layer.ln_2,
                    o_proj=layer.attn.c_proj, parallel=False)
    if hasattr(layer, "attention"):  # GPT-NeoX
        return dict(attn=layer.attention, norm_attn=layer.input_layernorm, mlp=layer.mlp,
                    norm_mlp=layer.post_attention_layernorm, o_proj=layer.attention.dense,
                    parallel=bool(layer.use_parallel_residual))
    raise ValueError(f"no sub-block recipe for {type(layer).__name__}")


def head_projection(o_proj: torch.nn.Module, n_heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_O [head, d_head, d_model], bias)`` of a Linear (``y = x W^T``) or GPT-2 Conv1D (``y = x W``)."""
    weight = o_proj.weight if type(o_proj).__name__ == "Conv1D" else o_proj.weight.T  # [h * d_head, d_model]
    return weight.reshape(n_heads, -1, weight.shape[-1]), o_proj.bias


@contextlib.contextmanager
def _recording(subs: dict[str, Any], store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record the attention output (``"attn"``) and the output projection's input (``"z"``) into ``store``."""

    def attn_hook(module, args, output):
        store["attn"] = _hidden_of(output)

    def z_hook(module, args):
        store["z"] = args[0]

    handles = [subs["attn"].register_forward_hook(attn_hook), subs["o_proj"].register_forward_pre_hook(z_hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _mlp(subs: dict[str, Any], y: torch.Tensor) -> torch.Tensor:
    return subs["mlp"](subs["norm_mlp"](y))


@torch.no_grad()
def reference_components(
    pt: torch.nn.Module,
    ft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    n_heads: int | None = None,
) -> dict[str, torch.Tensor]:
    """The component split of every FTC_l, in float64, from the HF sub-modules.

    Sequential layers: ``y = x + A_FT(x)``, ``y' = x + A_PT(x)``; ``attn = A_FT(x) - A_PT(x)``,
    ``mlp = M_FT(y) - M_PT(y)``, ``mlp_via_attn = M_PT(y) - M_PT(y')`` with ``M(y) = mlp(norm(y))``.
    Parallel layers read ``x`` in both and have ``mlp_via_attn = 0``. Heads: ``o_h = z_h W_O[h]``.

    Returns ``attn``, ``mlp``, ``mlp_via_attn`` ``[batch, L, pos, d]``, their sums over layers at the
    last real token (``attn_sum``...), ``head`` ``[batch, L, head, d]`` and ``head_bias`` ``[L, d]`` at the
    last real token, and ``ftc`` (the whole FTC_l, ``[batch, L, pos, d]``).
    """
    pt_layers, ft_layers = _check_pair(pt, ft)
    mask = _prepare_mask(input_ids, attention_mask)
    n_heads = n_heads or ft.config.num_attention_heads
    rows = torch.arange(mask.shape[0])
    last = _last_real_index(mask)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("attn", "mlp", "mlp_via_attn", "head", "head_bias", "ftc")}
    captured: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def record(l, x, pt_out, ft_out):
        ft_subs, pt_subs = sub_blocks(ft_layers[l]), sub_blocks(pt_layers[l])
        a_ft, a_pt = captured[l]["ft"]["attn"].double(), captured[l]["pt"]["attn"].double()
        if ft_subs["parallel"]:
            attn, mlp = a_ft - a_pt, _mlp(ft_subs, x).double() - _mlp(pt_subs, x).double()
            via = torch.zeros_like(attn)
        else:  # the MLPs run in the model dtype on the layer's own y = x + A(x)
            y, y_pt = (x + captured[l]["ft"]["attn"]), (x + captured[l]["pt"]["attn"])
            m_pt_y = _mlp(pt_subs, y).double()
            attn = a_ft - a_pt
            mlp = _mlp(ft_subs, y).double() - m_pt_y
            via = m_pt_y - _mlp(pt_subs, y_pt).double()
        heads = []
        bias = torch.zeros(x.shape[-1], dtype=torch.float64)
        for sign, subs, z in ((1.0, ft_subs, captured[l]["ft"]["z"]), (-1.0, pt_subs, captured[l]["pt"]["z"])):
            w_o, b_o = head_projection(subs["o_proj"], n_heads)
            z = z.double()[rows, last].reshape(len(rows), n_heads, -1)
            heads.append(sign * torch.einsum("bhd,hdm->bhm", z, w_o.double()))
            if b_o is not None:
                bias = bias + sign * b_o.double()
        bias = bias.to(x.device)
        for name, value in (("attn", attn), ("mlp", mlp), ("mlp_via_attn", via), ("ftc", ft_out.double() - pt_out.double())):
            out[name].append(value)
        out["head"].append(heads[0] + heads[1])
        out["head_bias"].append(bias)
        return None

    handles = []
    for l, (ft_layer, pt_layer) in enumerate(zip(ft_layers, pt_layers)):
        captured[l] = {"ft": {}, "pt": {}}
        handles.append(_recording(sub_blocks(ft_layer), captured[l]["ft"]))
        handles.append(_recording(sub_blocks(pt_layer), captured[l]["pt"]))
    with contextlib.ExitStack() as stack:
        for h in handles:
            stack.enter_context(h)
        with _hooked(ft_layers, pt_layers, record):
            _forward(ft, input_ids, mask)
    result = {name: torch.stack(values, dim=1) for name, values in out.items() if name not in ("head", "head_bias")}
    result["head"] = torch.stack(out["head"], dim=1)
    result["head_bias"] = torch.stack(out["head_bias"])
    for name in ("attn", "mlp", "mlp_via_attn", "ftc"):
        result[f"{name}_sum"] = result[name].sum(1)[rows, last]
    return result


@torch.no_grad()
def reference_component_alpha_logits(
    pt: torch.nn.Module,
    ft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    attn: float = 1.0,
    mlp: float = 1.0,
    heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits with α per component (the same α at every layer; ``heads`` ``[layer, head]`` optional).

    Sequential: ``y = x + A_PT(x) + a (A_FT(x) - A_PT(x))`` (with heads: ``A_PT + Σ_h a_h Δo_h + a Δb``),
    then ``x' = y + M_PT(y) + b (M_FT(y) - M_PT(y))``. Parallel: both terms read ``x``.
    """
    pt_layers, ft_layers = _check_pair(pt, ft)
    mask = _prepare_mask(input_ids, attention_mask)
    n_heads = ft.config.num_attention_heads
    captured: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def scale(l, x, pt_out, ft_out):
        ft_subs, pt_subs = sub_blocks(ft_layers[l]), sub_blocks(pt_layers[l])
        a_ft, a_pt = captured[l]["ft"]["attn"], captured[l]["pt"]["attn"]
        if heads is None:
            attention = a_pt + attn * (a_ft - a_pt)
        else:
            attention = a_pt.clone()
            for sign, subs, z in ((1.0, ft_subs, captured[l]["ft"]["z"]), (-1.0, pt_subs, captured[l]["pt"]["z"])):
                w_o, b_o = head_projection(subs["o_proj"], n_heads)
                z = z.reshape(*z.shape[:-1], n_heads, -1)
                attention = attention + sign * torch.einsum("bphd,h,hdm->bpm", z, heads[l].to(z.dtype), w_o)
                if b_o is not None:
                    attention = attention + sign * attn * b_o
        if ft_subs["parallel"]:
            m_ft, m_pt = _mlp(ft_subs, x), _mlp(pt_subs, x)
            return x + attention + m_pt + mlp * (m_ft - m_pt)
        y = x + attention
        m_ft, m_pt = _mlp(ft_subs, y), _mlp(pt_subs, y)
        return y + m_pt + mlp * (m_ft - m_pt)

    with contextlib.ExitStack() as stack:
        for l, (ft_layer, pt_layer) in enumerate(zip(ft_layers, pt_layers)):
            captured[l] = {"ft": {}, "pt": {}}
            stack.enter_context(_recording(sub_blocks(ft_layer), captured[l]["ft"]))
            stack.enter_context(_recording(sub_blocks(pt_layer), captured[l]["pt"]))
        with _hooked(ft_layers, pt_layers, scale):
            return _forward(ft, input_ids, mask).logits


@torch.no_grad()
def reference_outputco(
    pt: torch.nn.Module,
    ft: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    norm: str = "l1",
) -> torch.Tensor:
    """OutputCo (§5.5) from the Hugging Face models alone: ``||x_L^FT − x_L^PT|| / (||x_L^PT|| + ||x_L^FT − x_L^PT||)``.

    ``x_L`` is the output of the last decoder layer (the final norm's input) at the last real token,
    each model running its own full forward pass on the same tokens and mask. float64 norms.
    """
    mask = _prepare_mask(input_ids, attention_mask)
    last = _last_real_index(mask)
    finals = []
    for model in (pt, ft):
        seen: list[torch.Tensor] = []
        handle = decoder_layers(model)[-1].register_forward_hook(lambda m, a, out: seen.append(_hidden_of(out)))
        try:
            _forward(model, input_ids, mask)
        finally:
            handle.remove()
        finals.append(seen[0][torch.arange(len(last)), last].double())
    pt_final, ft_final = finals
    moved = _norm(ft_final - pt_final, norm)
    return moved / (_norm(pt_final, norm) + moved)
