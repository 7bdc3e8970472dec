"""Tiny HookedTransformer pairs built from TransformerLens configs (no tokenizer, no files).

``make_pair(kind)`` returns ``(pt, ft)`` where ``ft`` is ``pt`` with Gaussian noise added to
its blocks only (embedding, final norm and unembedding shared), so α = 0 must reproduce ``pt``.
Norm weights and biases are perturbed too, so a mistake that ignores them shows up.

transformer-lens 3.x only: this module imports on 4.x, but its functions need HookedTransformer,
so the tests that use them carry the ``hooked`` marker (conftest skips them on 4.x).
"""

from __future__ import annotations

import torch

from tuco_lens.backends import HookedTransformer, HookedTransformerConfig  # None on transformer-lens 4.x

KINDS = ("llama", "gpt2", "neox")

_CONFIGS = {
    # Llama-style: rotary, RMSNorm, gated MLP, grouped-query attention.
    "llama": dict(
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=2,
        final_rms=True,
    ),
    # GPT-2-style: learned absolute positions, LayerNorm with biases.
    "gpt2": dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"),
    # GPT-NeoX-style: partial rotary, parallel attention and MLP.
    "neox": dict(
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=4,
        parallel_attn_mlp=True,
    ),
}


def make_model(kind: str, seed: int = 0, n_layers: int = 3, dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """A random tiny model of the given kind."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        n_ctx=64,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=53,
        seed=seed,
        dtype=dtype,
        device="cpu",
        **_CONFIGS[kind],
    )
    model = HookedTransformer(cfg)
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b")) or "ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator).to(p.dtype))
    model.eval()
    return model


def make_pair(
    kind: str, noise: float = 0.2, seed: int = 0, n_layers: int = 3, dtype: torch.dtype = torch.float32
) -> tuple[HookedTransformer, HookedTransformer]:
    """``(pt, ft)``: ft = pt + noise on the blocks only."""
    pt = make_model(kind, seed, n_layers, dtype)
    ft = make_model(kind, seed, n_layers, dtype)
    ft.load_state_dict(pt.state_dict())
    generator = torch.Generator().manual_seed(seed + 2000)
    with torch.no_grad():
        for p in ft.blocks.parameters():
            p.add_(noise * p.float().std().clamp_min(0.05) * torch.randn(p.shape, generator=generator).to(p.dtype))
    return pt, ft


def random_tokens(batch: int, pos: int, vocab: int = 53, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[batch, pos]`` (deterministic)."""
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def plain_decomposition(pt: HookedTransformer, ft: HookedTransformer, tokens: torch.Tensor):
    """The plain definition, for one unpadded row batch: per-layer (x_l, PTC_l, FTC_l) in float64.

    Runs the fine-tuned model with a cache, then calls every pre-trained and fine-tuned block
    directly on the cached block inputs. No tuco_lens code is used.
    """
    _, cache = ft.run_with_cache(tokens)
    layers = []
    with torch.no_grad():
        for l in range(ft.cfg.n_layers):
            x = cache[f"blocks.{l}.hook_resid_pre"]
            pt_out = pt.blocks[l](x)
            ft_out = ft.blocks[l](x)
            layers.append((x.double(), (pt_out - x).double(), (ft_out - pt_out).double()))
    final = cache[f"blocks.{ft.cfg.n_layers - 1}.hook_resid_post"].double()
    return layers, final
