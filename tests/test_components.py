"""The split inside a block (tuco_lens.components) and the output-token views (tuco_lens.attribution).

Every number is checked against the independent Hugging Face reference (``hf_reference.
reference_components`` / ``reference_component_alpha_logits``, written on the decoder layers'
``self_attn`` / ``mlp`` modules and their norms, no TransformerLens) on every architecture and both
backends, or against an identity: the components add up to FTC_l, the heads plus the output-bias
difference add up to the attention term, the α corners are the fine-tuned and pre-trained blocks
bit for bit, the direct logit effects add up to the logits.

Tolerances: 1e-4 relative to the largest magnitude of the compared quantity (float32 models), as
in test_reference.py; identities inside tuco_lens: 1e-5 of the scale.
"""

from __future__ import annotations

import pytest
import torch

import tuco_lens
from hf_reference import (
    reference_alpha_logits,
    reference_component_alpha_logits,
    reference_components,
)
from tuco_lens.backends import HAS_HOOKED_TRANSFORMER
from tuco_lens.errors import AlphaError, InputError, TuCoError

pytestmark = pytest.mark.reference  # test tier (tests/conftest.py, TIERS)

PROMPTS = ["the cat sat on the mat", "hello", "a dog and a bird went to the river today"]


@pytest.fixture(scope="module")
def split(pair_with_hf):
    arch, pair, hf_pt, hf_ft = pair_with_hf
    batch = pair.tokenize(PROMPTS)
    ref = reference_components(hf_pt, hf_ft, batch.tokens, batch.attention_mask, n_heads=pair.ft.cfg.n_heads)
    return pair.decompose(PROMPTS, components=True), ref, batch


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    scale = float(want.nan_to_num().abs().max())
    if scale == 0:  # e.g. the output-bias difference of a model without attention biases
        assert float(got.nan_to_num().abs().max()) == 0.0
        return
    torch.testing.assert_close(got.double() / scale, want.double() / scale, atol=rel, rtol=0, equal_nan=True)


def test_component_sums_and_heads_match_reference(pair_with_hf, split):
    arch, pair, _, _ = pair_with_hf
    dec, ref, batch = split
    for name in ("attn", "mlp", "mlp_via_attn"):
        _close(getattr(dec, f"ftc_{name}_sum"), ref[f"{name}_sum"])
    _close(dec.ftc_head, ref["head"])
    _close(dec.ftc_head_bias[0], ref["head_bias"])
    _close(dec.ftc_head_norm, ref["head"].abs().sum(-1))
    # the fine-tune moves every component (a non-trivial comparison), and TuCo is the paper's
    assert float(dec.ftc_attn_sum.abs().max()) > 1e-2 and float(dec.ftc_mlp_sum.abs().max()) > 1e-2
    torch.testing.assert_close(dec.tuco, pair.decompose(PROMPTS).tuco, atol=1e-6, rtol=0)


def test_component_norms_per_position_match_reference(split):
    dec, ref, batch = split
    pad = ~batch.attention_mask.bool()[:, None, :]
    for name in ("attn", "mlp", "mlp_via_attn"):
        want = ref[name].abs().sum(-1).masked_fill(pad, float("nan"))
        if name == "mlp_via_attn" and float(ref[name].abs().max()) == 0:
            assert float(dec.ftc_mlp_via_attn_norm.nan_to_num().abs().max()) == 0.0
            continue
        _close(getattr(dec, f"ftc_{name}_norm"), want)


def test_components_add_up_to_the_fine_tuning_component(pair_with_hf, split):
    arch, pair, _, _ = pair_with_hf
    dec, ref, _ = split
    total = dec.ftc_attn_sum + dec.ftc_mlp_sum + dec.ftc_mlp_via_attn_sum
    scale = float(dec.ftc_sum.abs().max())
    torch.testing.assert_close(total / scale, dec.ftc_sum / scale, atol=1e-5, rtol=0)
    heads = dec.ftc_head.sum((1, 2)) + dec.ftc_head_bias.sum(1)
    torch.testing.assert_close(heads / scale, dec.ftc_attn_sum / scale, atol=1e-5, rtol=0)
    shares = dec.tuco_shares()
    torch.testing.assert_close(sum(shares.values()), dec.tuco, atol=1e-6, rtol=0)
    bias_share = (dec.ftc_head_bias.sum(1) * dec.ftc_sum.sign()).sum(-1) / (
        dec.ptc_sum.abs().sum(-1) + dec.ftc_sum.abs().sum(-1)
    )
    torch.testing.assert_close(dec.head_shares().sum((1, 2)) + bias_share, shares["attn"], atol=1e-6, rtol=0)
    if arch == "gpt_neox":  # parallel blocks: the MLP never sees the attention's change
        assert float(dec.ftc_mlp_via_attn_sum.abs().max()) == 0.0
    else:
        assert float(dec.ftc_mlp_via_attn_sum.abs().max()) > 1e-3


def test_components_in_the_dataframes(split):
    dec, _, batch = split
    df = dec.to_dataframe()
    assert {"ftc_attn_norm", "ftc_mlp_norm", "ftc_mlp_via_attn_norm"} <= set(df.columns)
    last = df[df.is_last & (df.prompt_index == 0)].sort_values("layer")
    torch.testing.assert_close(torch.tensor(last.ftc_mlp_norm.values), dec.at_last_token(dec.ftc_mlp_norm)[0].float())
    summary = dec.summary()
    torch.testing.assert_close(
        torch.tensor(summary[["tuco_share_attn", "tuco_share_mlp", "tuco_share_mlp_via_attn"]].sum(1).values),
        dec.tuco.float(), atol=1e-6, rtol=0,
    )
    one = dec[1]
    assert one.ftc_head.shape[0] == 1 and torch.equal(one.ftc_mlp_sum[0], dec.ftc_mlp_sum[1])


@pytest.mark.parametrize("corner", [1.0, 0.0])
def test_component_alpha_corners_are_bit_exact(pair_with_hf, corner):
    arch, pair, _, _ = pair_with_hf
    block = pair.run_with_alpha(PROMPTS, corner)
    heads = torch.full((pair.n_layers, pair.ft.cfg.n_heads), corner)
    for alpha in ({"attn": corner, "mlp": corner}, {"attn": corner, "mlp": corner, "heads": heads}):
        got = pair.run_with_alpha(PROMPTS, alpha)
        if "heads" in alpha and arch == "gpt2" and pair.backend.name == "TransformerBridge":
            # GPT-2's per-head split reads hook_z, which only the bridge's eager attention fires
            # (fused QKV), while the block-level run uses SDPA (tuco_lens.backends.native_modules):
            # the same numbers within float32 rounding of the attention, 1e-5, at real tokens (the
            # padding rows of a left-padded batch attend to nothing and differ between the two).
            real = pair.tokenize(PROMPTS).attention_mask.bool()
            torch.testing.assert_close(got[real], block[real], atol=1e-5, rtol=0)
        else:
            assert torch.equal(got, block)


@pytest.mark.parametrize("attn,mlp", [(0.5, -0.25), (1.0, 0.0), (0.0, 1.0), (1.5, 0.75)])
def test_component_alpha_interior_matches_reference(pair_with_hf, attn, mlp):
    arch, pair, hf_pt, hf_ft = pair_with_hf
    batch = pair.tokenize(PROMPTS)  # padded
    ref = reference_component_alpha_logits(hf_pt, hf_ft, batch.tokens, batch.attention_mask, attn=attn, mlp=mlp)
    got = pair.run_with_alpha(PROMPTS, {"attn": attn, "mlp": mlp})
    real = batch.attention_mask.bool()
    _close(got[real], ref[real])
    one = pair.tokenize(PROMPTS[2:])  # unpadded
    ref_one = reference_component_alpha_logits(hf_pt, hf_ft, one.tokens, one.attention_mask, attn=attn, mlp=mlp)
    _close(pair.run_with_alpha(PROMPTS[2:], {"attn": attn, "mlp": mlp}), ref_one)


def test_per_head_alpha_matches_reference(pair_with_hf):
    arch, pair, hf_pt, hf_ft = pair_with_hf
    heads = torch.linspace(-0.5, 1.5, pair.n_layers * pair.ft.cfg.n_heads).reshape(pair.n_layers, -1)
    batch = pair.tokenize(PROMPTS)
    ref = reference_component_alpha_logits(hf_pt, hf_ft, batch.tokens, batch.attention_mask, attn=0.3, mlp=0.6, heads=heads)
    got = pair.run_with_alpha(PROMPTS, {"attn": 0.3, "mlp": 0.6, "heads": heads})
    real = batch.attention_mask.bool()
    _close(got[real], ref[real])


def test_equal_component_alphas_are_not_the_block_alpha(pair_with_hf):
    """{"attn": α, "mlp": α} leaves the pre-trained MLP's answer to the changed attention unscaled."""
    arch, pair, hf_pt, hf_ft = pair_with_hf
    if arch == "gpt_neox":  # parallel blocks: the two coincide (no MLP<-attention term)
        batch = pair.tokenize(PROMPTS)
        ref = reference_alpha_logits(hf_pt, hf_ft, batch.tokens, batch.attention_mask, alpha=0.5)
        _close(pair.run_with_alpha(PROMPTS, {"attn": 0.5, "mlp": 0.5})[batch.attention_mask.bool()],
               ref[batch.attention_mask.bool()])
        return
    difference = pair.run_with_alpha(PROMPTS, {"attn": 0.5, "mlp": 0.5}) - pair.run_with_alpha(PROMPTS, 0.5)
    assert float(difference.abs().max()) > 1e-3


@pytest.mark.parametrize("alpha", [{"attn": 0.4, "mlp": 1.3}, "heads"])
def test_cached_generation_with_component_alpha_equals_uncached(pair_with_hf, alpha):
    arch, pair, _, _ = pair_with_hf
    if alpha == "heads":
        alpha = {"attn": 0.8, "heads": torch.rand(pair.n_layers, pair.ft.cfg.n_heads)}
    kwargs = dict(alpha=alpha, max_new_tokens=5, stop_at_eos=False, return_type="tokens")
    cached = pair.generate(PROMPTS, use_past_kv_cache=True, **kwargs)
    assert torch.equal(cached, pair.generate(PROMPTS, use_past_kv_cache=False, **kwargs))


def test_logit_attribution_adds_up_to_the_logits(pair_with_hf):
    arch, pair, hf_pt, hf_ft = pair_with_hf
    batch = pair.tokenize(PROMPTS)
    attr = pair.logit_attribution(PROMPTS, components=True)
    with torch.no_grad():
        logits = hf_ft(batch.tokens, attention_mask=batch.attention_mask,
                       position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    _close(attr.logits, logits)
    _close(attr.total(), logits)
    parts = attr.direct["ftc_attn"] + attr.direct["ftc_mlp"] + attr.direct["ftc_mlp_via_attn"]
    _close(parts, attr.direct["ftc"], rel=1e-5)
    heads = sum(attr.head_direct(l, h) for l in range(pair.n_layers) for h in range(pair.ft.cfg.n_heads))
    _close(heads + attr.direct["ftc_head_bias"], attr.direct["ftc_attn"], rel=1e-5)
    dec = pair.decompose(PROMPTS, components=True)
    # the direct effect of Σ FTC is its frozen-norm image: a reference computed from the vectors
    scale = float(attr.direct["ftc"].abs().max())
    assert scale > 1e-3
    table = attr.top_tokens(3)
    assert set(table.part) == {"ftc", "ftc_attn", "ftc_mlp", "ftc_mlp_via_attn"}
    top = table[(table.prompt == 0) & (table.part == "ftc") & (table.direction == "promoted") & (table["rank"] == 1)]
    assert int(top.token_id.iloc[0]) == int(attr.direct["ftc"][0].argmax())
    assert float(top.logit_effect.iloc[0]) == pytest.approx(float(attr.direct["ftc"][0].max()), rel=1e-6)
    low = table[(table.prompt == 0) & (table.part == "ftc") & (table.direction == "suppressed") & (table["rank"] == 1)]
    assert int(low.token_id.iloc[0]) == int(attr.direct["ftc"][0].argmin())
    torch.testing.assert_close(dec.ftc_sum, pair.decompose(PROMPTS).ftc_sum)


def test_logit_attribution_frozen_norm_matches_a_hand_computation(pair_with_hf):
    """Σ FTC's direct effect equals center(v) / s(x_L) ⊙ w @ W_U, computed here from the HF modules."""
    arch, pair, hf_pt, hf_ft = pair_with_hf
    batch = pair.tokenize(PROMPTS)
    attr = pair.logit_attribution(PROMPTS)
    dec = pair.decompose(PROMPTS)
    with torch.no_grad():
        hidden = hf_ft(batch.tokens, attention_mask=batch.attention_mask, output_hidden_states=True,
                       position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0)).hidden_states
    norm = hf_ft.get_decoder().norm if hasattr(hf_ft.get_decoder(), "norm") else (
        hf_ft.transformer.ln_f if hasattr(hf_ft, "transformer") else hf_ft.gpt_neox.final_layer_norm)
    # the stream before the final norm: HF's last hidden state is after it, so rebuild x_L
    x_last = (dec.ptc_sum + dec.ftc_sum).double() + hidden[0][:, -1].double()
    v = dec.ftc_sum.double()
    if isinstance(norm, torch.nn.LayerNorm):
        center = lambda t: t - t.mean(-1, keepdim=True)  # noqa: E731
        weight, eps = norm.weight.double(), norm.eps
    else:
        center = lambda t: t  # noqa: E731
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        weight = norm.weight.double() + (1.0 if "Gemma" in type(norm).__name__ else 0.0)
    s = (center(x_last).pow(2).mean(-1, keepdim=True) + eps).sqrt()
    w_u = hf_ft.get_output_embeddings().weight.double().T
    want = (center(v) / s * weight) @ w_u
    _close(attr.direct["ftc"], want)


def test_compare_outputs_kl(pair_with_hf):
    arch, pair, hf_pt, hf_ft = pair_with_hf
    batch = pair.tokenize(PROMPTS)
    out = pair.compare_outputs(PROMPTS)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ft = hf_ft(batch.tokens, attention_mask=batch.attention_mask, position_ids=position_ids).logits.double()
        pt = hf_pt(batch.tokens, attention_mask=batch.attention_mask, position_ids=position_ids).logits.double()
    p, q = ft.log_softmax(-1), pt.log_softmax(-1)
    want = (p.exp() * (p - q)).sum(-1).masked_fill(~batch.attention_mask.bool(), float("nan"))
    _close(out.kl_ft_pt, want)
    # embeddings and unembedding are shared by these checkpoints: α = 0 is the pre-trained model
    _close(out.kl_ft_alpha0, want)
    assert float(out.kl_ft_pt.nan_to_num().min()) >= -1e-6 and bool(out.kl_ft_pt[~batch.attention_mask.bool()].isnan().all())
    change = out.logprob_change[0]
    table = out.top_tokens(2)
    raised = table[(table.prompt == 0) & (table.direction == "raised") & (table["rank"] == 1)]
    assert int(raised.token_id.iloc[0]) == int(change.argmax())
    assert len(out.to_dataframe()) == int(batch.attention_mask.sum())


def test_bad_component_alpha_is_refused(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge")
    with pytest.raises(AlphaError, match="keys 'attn', 'mlp' and 'heads'"):
        pair.run_with_alpha(PROMPTS, {"attention": 0.5})
    with pytest.raises(AlphaError, match=r"shape \(2, 4\)"):
        pair.run_with_alpha(PROMPTS, {"heads": torch.ones(3, 4)})
    with pytest.raises(AlphaError, match="finite"):
        pair.run_with_alpha(PROMPTS, {"mlp": float("nan")})
    with pytest.raises(AlphaError, match="one value per layer"):
        pair.run_with_alpha(PROMPTS, {"attn": [1.0, 0.5, 0.0]})
    with pytest.raises(AlphaError, match="numbers"):
        pair.run_with_alpha(PROMPTS, {"heads": "all"})
    batch = pair.tokenize(PROMPTS[:1])
    _, cache = pair.ft.run_with_cache(batch.tokens, names_filter=pair.resid_names)
    with pytest.raises(InputError, match=r"components=True\) is not available"):
        pair.decompose(cache, tokens=batch.tokens, components=True)
    dec = pair.decompose(PROMPTS)
    with pytest.raises(InputError, match="components=True"):
        dec.tuco_shares()


@pytest.mark.skipif(not HAS_HOOKED_TRANSFORMER, reason="tiny HookedTransformer configs need transformer-lens 3.x")
def test_post_attention_norm_refuses_the_head_split_only(tiny_hooked):
    """Gemma-2-style blocks (a norm after the attention output): heads refused, attention / MLP split works."""
    options = dict(normalization_type="RMS", use_normalization_before_and_after=True, positional_embedding_type="rotary",
                   rotary_dim=4)
    pt = tiny_hooked(**options)
    ft = tiny_hooked(**options)
    with torch.no_grad():
        for p_pt, p_ft in zip(pt.parameters(), ft.parameters()):
            p_ft.copy_(p_pt + 0.1 * torch.randn_like(p_pt))
        for name in ("embed.W_E", "unembed.W_U", "unembed.b_U", "ln_final.w"):
            ft.get_parameter(name).copy_(pt.get_parameter(name))
    pair = tuco_lens.TuCoPair(pt, ft)
    tokens = torch.randint(0, 128, (2, 7))
    with pytest.raises(TuCoError, match="not a sum of per-head terms.*heads=False"):
        pair.decompose(tokens, components=True)
    dec = pair.decompose(tokens, components=True, heads=False)
    assert dec.ftc_head is None
    total = dec.ftc_attn_sum + dec.ftc_mlp_sum + dec.ftc_mlp_via_attn_sum
    torch.testing.assert_close(total, dec.ftc_sum, atol=1e-5, rtol=1e-5)
    assert torch.equal(pair.run_with_alpha(tokens, {"attn": 1.0, "mlp": 1.0}), pair.run_with_alpha(tokens, 1.0))
    with pytest.raises(TuCoError, match="per-head"):
        pair.run_with_alpha(tokens, {"attn": 0.5, "heads": torch.rand(2, 4)})


def test_component_figures_show_the_numbers(checkpoint_pair):
    from tuco_lens.plotting import plot_components, plot_head_heatmap, plot_top_tokens

    pt_dir, ft_dir = checkpoint_pair("llama")
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir))
    dec = pair.decompose(PROMPTS, components=True)
    fig = plot_components(dec, 2)
    assert [t.type for t in fig.data] == ["bar", "bar", "bar", "scatter"] and fig.layout.barmode == "stack"
    torch.testing.assert_close(torch.tensor(fig.data[1].y), dec.at_last_token(dec.ftc_mlp_norm)[2].float())
    torch.testing.assert_close(torch.tensor(fig.data[3].y), dec.at_last_token(dec.ftc_norm)[2].float())
    heat = plot_head_heatmap(dec, 1)
    torch.testing.assert_close(torch.tensor(heat.data[0].z), dec.ftc_head_norm[1].float())
    shares = plot_head_heatmap(dec, 1, shares=True)
    torch.testing.assert_close(torch.tensor(shares.data[0].z), dec.head_shares()[1].float())
    attr = pair.logit_attribution(PROMPTS, components=True)
    bars = plot_top_tokens(attr, 0, part="ftc_mlp", k=3)
    values = sorted(attr.direct["ftc_mlp"][0].tolist())
    assert sorted(bars.data[0].x) == pytest.approx(values[:3] + values[-3:], rel=1e-6)
    head = plot_top_tokens(attr, 0, part="head 1.2", k=2)
    assert max(head.data[0].x) == pytest.approx(float(attr.head_direct(1, 2)[0].max()), rel=1e-6)
    with pytest.raises(InputError, match="components=True"):
        plot_components(pair.decompose(PROMPTS))
    with pytest.raises(InputError, match="out of range"):
        plot_top_tokens(attr, 5)


def test_components_do_not_depend_on_batching_or_padding_side(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("mistral")
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir))
    whole = pair.decompose(PROMPTS, components=True)
    for other in (pair.decompose(PROMPTS, components=True, batch_size=1),
                  pair.decompose(PROMPTS, components=True, padding_side="right")):
        for name in ("ftc_attn_sum", "ftc_mlp_sum", "ftc_mlp_via_attn_sum", "ftc_head", "ftc_head_norm"):
            torch.testing.assert_close(getattr(other, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.at_last_token(other.ftc_mlp_norm), whole.at_last_token(whole.ftc_mlp_norm),
                                   atol=1e-5, rtol=1e-5)
    attr = pair.logit_attribution(PROMPTS, components=True, batch_size=2)
    torch.testing.assert_close(attr.total(), pair.logit_attribution(PROMPTS).logits, atol=1e-4, rtol=1e-4)


def test_logit_attribution_that_misses_the_logits_is_refused(checkpoint_pair, monkeypatch):
    """The self-check raises tuco_lens's TuCoError (this path once raised NameError: TuCoError unimported)."""
    pt_dir, ft_dir = checkpoint_pair("llama")
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge")
    exact = tuco_lens.attribution.LogitAttribution.total
    monkeypatch.setattr(tuco_lens.attribution.LogitAttribution, "total", lambda self: exact(self) + 1.0)
    with pytest.raises(TuCoError, match=r"miss the fine-tuned logits by 1\.00e\+00"):
        pair.logit_attribution(PROMPTS[:1])
