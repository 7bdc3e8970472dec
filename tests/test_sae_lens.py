"""TuCo and α-scaling on a fine-tuned ``HookedSAETransformer`` with SAEs spliced in (SAE-Lens).

What is measured is specified in ``docs/sae-lens.md``. Every number is checked against an
independent computation: a layer-by-layer loop that calls the blocks of the pre-trained model
and of a plain (SAE-free) copy of the fine-tuned model directly, and applies each SAE by hand
(``relu((v - b_dec) W_enc + b_enc) W_dec + b_dec``) where it is spliced: between blocks for
``hook_resid_pre`` / ``hook_resid_post``, inside the fine-tuned block (through a
TransformerLens hook on the plain copy) for inner hooks such as ``hook_attn_out``.

Tests (and parameter ids) containing ``resid_post`` need the change to ``tuco_lens/hooks.py``
given in ``docs/sae-lens.md`` ("Status"): without it they fail (``pair.scaled`` raises
``AttributeError: '_SAEWrapper' object has no attribute 'add_hook'``, or the decomposition
counts the SAE's edit as fine-tuning), except ``test_reference_is_the_spliced_model``, which
does not use tuco_lens. ``pytest tests/test_sae_lens.py -k "not resid_post"`` runs the rest,
which pass as is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch

pytest.importorskip("sae_lens")

from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from tiny_models import make_pair, random_tokens  # noqa: E402

from tuco_lens import InputError, TuCoError, TuCoPair, load_pair  # noqa: E402
from tuco_lens.backends import record_processing, recorded_processing  # noqa: E402

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

N_LAYERS = 3
D_SAE = 96

#: Where SAEs are spliced (hook names of the fine-tuned model). Ids with "resid_post" need the patch.
PLACEMENTS = {
    "resid_pre": ["blocks.1.hook_resid_pre"],
    "attn_out": ["blocks.1.hook_attn_out"],
    "hook_z": ["blocks.1.attn.hook_z"],
    "mlp_out": ["blocks.1.hook_mlp_out"],
    "resid_pre0+mlp_out+resid_pre2": [
        "blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_pre"
    ],
    "resid_post": ["blocks.1.hook_resid_post"],
    "resid_post_last": ["blocks.2.hook_resid_post"],
    "resid_post0+resid_pre1+hook_z+resid_post_last": [
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_z",
        "blocks.2.hook_resid_post",
    ],
}
RESIDUAL = ("hook_resid_pre", "hook_resid_post")


def is_residual(hook: str) -> bool:
    return hook.endswith(RESIDUAL)


# ---------------------------------------------------------------------------- building blocks
def make_sae(hook: str, seed: int = 0, d_in: int = 32, use_error_term: bool = False) -> StandardSAE:
    """A StandardSAE for ``hook`` with non-trivial weights: sparse, with a sizeable error.

    Decoder = encoder transposed (rescaled so ReLU features roughly reconstruct their input)
    plus noise; negative encoder biases make the features sparse.
    """
    cfg = StandardSAEConfig(
        d_in=d_in,
        d_sae=D_SAE,
        metadata=SAEMetadata(hook_name=hook),
        reshape_activations="hook_z" if hook.endswith("hook_z") else "none",
    )
    sae = StandardSAE(cfg, use_error_term=use_error_term)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        w_enc = torch.randn(d_in, D_SAE, generator=g) / d_in**0.5
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_enc.T * (2 * d_in / D_SAE) + 0.15 * torch.randn(D_SAE, d_in, generator=g) / D_SAE**0.5)
        sae.b_enc.copy_(-0.15 * torch.rand(D_SAE, generator=g))
        sae.b_dec.copy_(0.05 * torch.randn(d_in, generator=g))
    return sae.eval()


def copy_sae(sae: StandardSAE) -> StandardSAE:
    """An independent copy (``copy.deepcopy`` breaks hook_z SAEs: their reshaping closures
    still point at the original)."""
    new = type(sae)(copy.deepcopy(sae.cfg), use_error_term=sae.use_error_term)
    new.load_state_dict(sae.state_dict())
    return new.eval()


def sae_by_hand(sae: StandardSAE, v: torch.Tensor, use_error_term: bool = False, edit=None):
    """``(output, feature activations)`` of ``sae`` on ``v``, without SAE-Lens code.

    ``edit(acts) -> acts`` intervenes on the features before decoding; with the error term the
    output is ``decode(edited) + (v - decode(clean))``.
    """
    flat = v.flatten(-2) if sae.cfg.reshape_activations == "hook_z" else v
    acts = torch.relu((flat - sae.b_dec) @ sae.W_enc + sae.b_enc)
    clean = acts @ sae.W_dec + sae.b_dec
    out = clean if edit is None else edit(acts) @ sae.W_dec + sae.b_dec
    if use_error_term:
        out = out + (flat - clean)
    return out.reshape(v.shape), acts


def as_sae_model(model) -> HookedSAETransformer:
    """The same model (config, processed weights, tokenizer) as a ``HookedSAETransformer``."""
    out = HookedSAETransformer(copy.deepcopy(model.cfg), move_to_device=False)
    out.load_state_dict(model.state_dict(), strict=True)
    recorded = recorded_processing(model)
    if recorded is not None:
        record_processing(out, recorded)
    if model.tokenizer is not None:
        out.set_tokenizer(model.tokenizer, default_padding_side=model.tokenizer.padding_side)
    return out.eval()


def reference(pt, ft_plain, saes, tokens, alpha=1.0, mask=None, pt_inner_saes=(), sae_fn=sae_by_hand):
    """The spliced, α-scaled fine-tuned model layer by layer, by hand.

    At block l: ``x_l = SAE_pre(s_l)``; ``PTC_l = pt.blocks[l](x_l) - x_l``;
    ``FTC_l = ft_block(x_l) - pt.blocks[l](x_l)`` (ft_block = the plain fine-tuned block with its
    inner SAEs applied by hand); ``y_l = x_l + PTC_l + α FTC_l``; ``s_{l+1} = SAE_post(y_l)``.

    ``sae_fn(sae, v) -> (output, features)`` applies a residual SAE (default: :func:`sae_by_hand`).
    Returns a dict: logits, ptc, ftc and x (lists over layers: PTC_l, FTC_l, x_l), edits (hook -> SAE output - input,
    residual SAEs), features (hook -> activations), s0 (embedding) and sL (the final stream).
    """
    n = ft_plain.cfg.n_layers
    alphas = list(alpha) if isinstance(alpha, Sequence) else [alpha] * n
    by_hook = {sae.cfg.metadata.hook_name: sae for sae in saes}
    features: dict[str, torch.Tensor] = {}
    edits: dict[str, torch.Tensor] = {}

    def inner_hooks(layer: int, hooks_of: dict, record: bool):
        hooks = []
        for name, sae in hooks_of.items():
            if name.startswith(f"blocks.{layer}.") and not is_residual(name):
                def fn(act, hook, sae=sae, name=name):
                    out, acts = sae_by_hand(sae, act)
                    if record:
                        features[name] = acts
                    return out
                hooks.append((name, fn))
        return hooks

    pt_by_hook = {sae.cfg.metadata.hook_name: sae for sae in pt_inner_saes}
    ptc, ftc, xs = [], [], []
    with torch.no_grad():
        s, _, spe, mask = ft_plain.input_to_embed(tokens, attention_mask=mask)
        s0 = s
        for layer in range(n):
            pre, post = f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"
            x = s
            if pre in by_hook:
                x, features[pre] = sae_fn(by_hook[pre], s)
                edits[pre] = x - s
            xs.append(x)
            with pt.hooks(fwd_hooks=inner_hooks(layer, pt_by_hook, record=False)):
                pt_out = pt.blocks[layer](x, attention_mask=mask, shortformer_pos_embed=spe)
            with ft_plain.hooks(fwd_hooks=inner_hooks(layer, by_hook, record=True)):
                ft_out = ft_plain.blocks[layer](x, attention_mask=mask, shortformer_pos_embed=spe)
            ptc.append(pt_out - x)
            ftc.append(ft_out - pt_out)
            y = x + ptc[-1] + alphas[layer] * ftc[-1]
            s = y
            if post in by_hook:
                s, features[post] = sae_fn(by_hook[post], y)
                edits[post] = s - y
        logits = ft_plain.unembed(ft_plain.ln_final(s))
    return dict(logits=logits, ptc=ptc, ftc=ftc, x=xs, edits=edits, features=features, s0=s0, sL=s)


def greedy_by_hand(pt, ft_plain, saes, tokens, alpha, steps):
    for _ in range(steps):
        logits = reference(pt, ft_plain, saes, tokens, alpha)["logits"]
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def hand_tuco(ref, last=-1):
    ptc_sum = sum(p[:, last] for p in ref["ptc"])
    ftc_sum = sum(f[:, last] for f in ref["ftc"])
    a, b = ptc_sum.abs().sum(-1), ftc_sum.abs().sum(-1)
    return b / (a + b), ptc_sum, ftc_sum


def ones(tokens):
    return torch.ones_like(tokens)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request):
    """``(pt, ft_plain, ft)``: a tiny pair, and ft rebuilt as a HookedSAETransformer (no SAE yet)."""
    pt, ft_plain = make_pair(request.param, n_layers=N_LAYERS)
    return pt, ft_plain, as_sae_model(ft_plain)


@pytest.fixture
def spliced(models, request):
    """``(pair, pt, ft_plain, saes)`` with the SAEs of ``request.param`` (a PLACEMENTS key) added."""
    pt, ft_plain, ft = models
    saes = [make_sae(h, seed=i) for i, h in enumerate(PLACEMENTS[request.param])]
    with ft.saes(saes=saes):
        assert set(ft.acts_to_saes) == set(PLACEMENTS[request.param])
        yield TuCoPair(pt, ft), pt, ft_plain, saes
    assert not ft.acts_to_saes


def all_placements():
    return pytest.mark.parametrize("spliced", list(PLACEMENTS), indirect=True)


# ---------------------------------------------------------------------------- the setting itself
def test_sae_model_is_the_fine_tuned_model_and_saes_are_non_trivial(models):
    pt, ft_plain, ft = models
    tokens = random_tokens(2, 8)
    assert torch.equal(ft(tokens), ft_plain(tokens))  # rebuilt as HookedSAETransformer: same model
    _, cache = ft_plain.run_with_cache(tokens)
    for i, hook in enumerate(sorted({h for hooks in PLACEMENTS.values() for h in hooks})):
        sae = make_sae(hook, seed=i)
        act = cache[hook]
        out, acts = sae_by_hand(sae, act)
        with torch.no_grad():
            torch.testing.assert_close(sae(act), out, atol=1e-5, rtol=1e-5)  # the by-hand SAE is SAE-Lens's
        active = (acts > 0).float().mean().item()
        assert 0.05 < active < 0.8, (hook, active)
        relative_error = ((out - act).norm() / act.norm()).item()
        assert 0.05 < relative_error < 1.5, (hook, relative_error)
        with ft.saes(saes=[sae]):
            assert (ft(tokens) - ft_plain(tokens)).abs().max() > 1e-2  # splicing changes the model


@all_placements()
def test_reference_is_the_spliced_model(spliced):
    pair, pt, ft_plain, saes = spliced
    tokens = random_tokens(2, 8, seed=1)
    ref = reference(pt, ft_plain, saes, tokens)
    torch.testing.assert_close(pair.ft(tokens), ref["logits"], atol=1e-4, rtol=1e-4)
    _, cache = pair.ft.run_with_cache(tokens)
    for sae in saes:
        hook = sae.cfg.metadata.hook_name
        torch.testing.assert_close(cache[f"{hook}.hook_sae_acts_post"], ref["features"][hook], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- decomposition
@all_placements()
def test_decompose_and_tuco_match_the_hand_computation(spliced):
    pair, pt, ft_plain, saes = spliced
    tokens = random_tokens(2, 8, seed=2)
    ref = reference(pt, ft_plain, saes, tokens)
    dec = pair.decompose(tokens)
    ptc_norm = torch.stack([p.abs().sum(-1) for p in ref["ptc"]], dim=1)
    ftc_norm = torch.stack([f.abs().sum(-1) for f in ref["ftc"]], dim=1)
    torch.testing.assert_close(dec.ptc_norm, ptc_norm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec.ftc_norm, ftc_norm, atol=1e-4, rtol=1e-4)
    tuco, ptc_sum, ftc_sum = hand_tuco(ref)
    torch.testing.assert_close(dec.ptc_sum, ptc_sum, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec.ftc_sum, ftc_sum, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec.tuco, tuco, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pair.tuco(tokens), tuco, atol=1e-5, rtol=1e-5)  # last-token path


@all_placements()
def test_telescoping_identity_has_one_extra_term_per_residual_sae(spliced):
    """s_L = s_0 + Σ_l (PTC_l + FTC_l) + Σ_residual SAEs (SAE output - SAE input), at the last token."""
    pair, pt, ft_plain, saes = spliced
    tokens = random_tokens(2, 8, seed=3)
    dec = pair.decompose(tokens)
    ft = pair.ft
    with torch.no_grad():
        s_final = ft(tokens, stop_at_layer=N_LAYERS)[:, -1]
        s0 = ft.input_to_embed(tokens)[0][:, -1]
        _, cache = ft.run_with_cache(tokens)
    edits = torch.zeros_like(s0)
    for sae in saes:
        hook = sae.cfg.metadata.hook_name
        if is_residual(hook):
            edits += (cache[f"{hook}.hook_sae_output"] - cache[f"{hook}.hook_sae_input"])[:, -1]
    torch.testing.assert_close(s0 + dec.ptc_sum + dec.ftc_sum + edits, s_final, atol=1e-4, rtol=1e-4)
    if any(is_residual(s.cfg.metadata.hook_name) for s in saes):
        assert edits.abs().max() > 0.05  # the extra terms matter: without them the identity fails
    else:  # SAEs inside blocks only: their edits are part of FTC, the identity is the plain one
        assert torch.equal(edits, torch.zeros_like(edits))


@pytest.mark.parametrize("spliced", ["attn_out", "hook_z"], indirect=True)
def test_inner_sae_on_both_sides_needs_its_own_copy_on_pt(spliced):
    pair, pt, ft_plain, saes = spliced
    tokens = random_tokens(2, 8, seed=4)
    pt_sae = as_sae_model(pt)
    pt_sae.add_sae(copy_sae(saes[0]))  # a copy: the same SAE object would share its hook points
    both = TuCoPair(pt_sae, pair.ft)
    ref = reference(pt, ft_plain, saes, tokens, pt_inner_saes=saes)
    tuco, _, ftc_sum = hand_tuco(ref)
    dec = both.decompose(tokens)
    torch.testing.assert_close(dec.ftc_sum, ftc_sum, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec.tuco, tuco, atol=1e-5, rtol=1e-5)
    assert (dec.tuco - pair.decompose(tokens).tuco).abs().max() > 1e-3  # a different question
    # Under α = 0 the stream is pt's (with its SAE); with a copy the cache holds ft's features.
    with both.scaled(0.5):
        _, cache = pair.ft.run_with_cache(tokens)
    hook = saes[0].cfg.metadata.hook_name
    torch.testing.assert_close(
        cache[f"{hook}.hook_sae_acts_post"],
        reference(pt, ft_plain, saes, tokens, 0.5, pt_inner_saes=saes)["features"][hook],
        atol=1e-5, rtol=1e-4,
    )


def test_one_sae_object_shared_by_pt_and_ft_overwrites_ft_features_in_the_cache(models):
    """Why a copy: SAE-Lens registers the SAE's own hook points in every model it is added to."""
    pt, ft_plain, ft = models
    tokens = random_tokens(2, 8, seed=5)
    hook = "blocks.1.hook_attn_out"
    sae = make_sae(hook)
    pt_sae = as_sae_model(pt)
    pt_sae.add_sae(sae)  # the same object as on ft
    with ft.saes(saes=[sae]):
        with TuCoPair(pt_sae, ft).scaled(1.0):
            _, cache = ft.run_with_cache(tokens)
    ref = reference(pt, ft_plain, [sae], tokens, pt_inner_saes=[sae])
    seen = {}
    with torch.no_grad(), pt.hooks(fwd_hooks=[(hook, lambda act, hook: seen.setdefault("attn_out", act))]):
        pt.blocks[1](ref["x"][1])
    got = cache[f"{hook}.hook_sae_acts_post"]
    # The cached "fine-tuned" features are those of the pre-trained block (it runs after ft's).
    torch.testing.assert_close(got, sae_by_hand(sae, seen["attn_out"])[1], atol=1e-5, rtol=1e-4)
    assert (got - ref["features"][hook]).abs().max() > 1e-3


# ---------------------------------------------------------------------------- α-scaling
@all_placements()
@pytest.mark.parametrize("alpha", [0.5, -0.5, [0.0, 1.0, 2.0]], ids=["0.5", "-0.5", "per-layer"])
def test_alpha_matches_the_hand_computation(spliced, alpha):
    pair, pt, ft_plain, saes = spliced
    tokens = random_tokens(2, 8, seed=6)
    got = pair.run_with_alpha(tokens, alpha)
    torch.testing.assert_close(got, reference(pt, ft_plain, saes, tokens, alpha)["logits"], atol=1e-4, rtol=1e-4)
    assert (got - pair.ft(tokens)).abs().max() > 1e-3  # scaling really changed something


@all_placements()
def test_alpha_one_is_the_spliced_model_and_zero_is_pt_with_the_residual_saes(spliced):
    pair, pt, ft_plain, saes = spliced
    tokens = random_tokens(2, 8, seed=7)
    assert torch.equal(pair.run_with_alpha(tokens, 1.0), pair.ft(tokens, attention_mask=ones(tokens)))
    # α = 0: the pre-trained blocks, with the SAEs between blocks still applied (inner SAEs of
    # the fine-tuned blocks have no effect: their block's output is replaced by pt's).
    pt_spliced = as_sae_model(pt)
    for sae in saes:
        if is_residual(sae.cfg.metadata.hook_name):
            pt_spliced.add_sae(copy_sae(sae))
    assert torch.equal(pair.run_with_alpha(tokens, 0.0), pt_spliced(tokens, attention_mask=ones(tokens)))


@all_placements()
def test_scaled_cache_holds_the_sae_features_of_the_steered_model(spliced):
    pair, pt, ft_plain, saes = spliced
    ft = pair.ft
    tokens = random_tokens(2, 8, seed=8)
    with pair.scaled(0.25):
        logits, cache = ft.run_with_cache(tokens)
    ref = reference(pt, ft_plain, saes, tokens, 0.25)
    ref_one = reference(pt, ft_plain, saes, tokens, 1.0)
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, pair.run_with_alpha(tokens, 0.25), atol=1e-6, rtol=1e-6)
    for sae in saes:
        hook = sae.cfg.metadata.hook_name
        got = cache[f"{hook}.hook_sae_acts_post"]
        torch.testing.assert_close(got, ref["features"][hook], atol=1e-5, rtol=1e-4)
        if hook != "blocks.0.hook_resid_pre":  # everything downstream of block 0 depends on α
            assert (got - ref_one["features"][hook]).abs().max() > 1e-3
    # every hook tuco_lens added is gone
    for block in ft.blocks:
        assert not block._forward_pre_hooks and not block._forward_hooks
        assert not block.hook_resid_pre._forward_hooks
        assert not block.hook_resid_post._forward_pre_hooks
    torch.testing.assert_close(ft(tokens), ref_one["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "spliced", ["resid_pre", "hook_z", "resid_post", "resid_post0+resid_pre1+hook_z+resid_post_last"], indirect=True
)
def test_generate_with_kv_cache_matches_greedy_by_hand(spliced):
    pair, pt, ft_plain, saes = spliced
    tokens = random_tokens(2, 5, seed=9)
    for alpha in (0.5, [1.5, 0.0, 1.0]):
        got = pair.generate(tokens, alpha=alpha, max_new_tokens=4, return_type="tokens", stop_at_eos=False)
        assert torch.equal(got, greedy_by_hand(pt, ft_plain, saes, tokens, alpha, 4))
        no_cache = pair.generate(
            tokens, alpha=alpha, max_new_tokens=4, return_type="tokens", stop_at_eos=False, use_past_kv_cache=False
        )
        assert torch.equal(got, no_cache)
    # α = 1 is SAE-Lens's spliced model, greedy without a cache. (Not ft.generate: TransformerLens
    # 3.9's own KV-cache generation disagrees with its no-cache generation on the tiny GPT-2-style
    # model, with or without SAEs.)
    expected = tokens
    with torch.no_grad():
        for _ in range(4):
            expected = torch.cat([expected, pair.ft(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    got = pair.generate(tokens, alpha=1.0, max_new_tokens=4, return_type="tokens", stop_at_eos=False)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------- error term
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_resid_post"],
                         ids=["resid_pre", "attn_out", "resid_post"])
def test_sae_with_error_term_changes_nothing_and_reads_the_steered_stream(models, hook):
    pt, ft_plain, ft = models
    tokens = random_tokens(2, 8, seed=10)
    sae = make_sae(hook, use_error_term=True)
    plain = TuCoPair(pt, ft_plain)
    with ft.saes(saes=[sae]):
        pair = TuCoPair(pt, ft)
        torch.testing.assert_close(pair.decompose(tokens).tuco, plain.decompose(tokens).tuco, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pair.run_with_alpha(tokens, 0.5), plain.run_with_alpha(tokens, 0.5), atol=1e-5, rtol=1e-5)
        with pair.scaled(0.5):
            _, cache = ft.run_with_cache(tokens)
    with plain.scaled(0.5):  # the unspliced α-scaled model
        _, plain_cache = ft_plain.run_with_cache(tokens, names_filter=hook)
    torch.testing.assert_close(
        cache[f"{hook}.hook_sae_acts_post"], sae_by_hand(sae, plain_cache[hook])[1], atol=1e-5, rtol=1e-4
    )


# ---------------------------------------------------------------------------- what fails, loudly
@pytest.mark.parametrize(
    "hook", ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"], ids=["block_input", "last_block_output"]
)
def test_cache_decomposition_and_alpha_hooks_refuse_residual_saes(models, hook):
    pt, ft_plain, ft = models
    tokens = random_tokens(1, 6, seed=11)
    with ft.saes(saes=[make_sae(hook)]):
        pair = TuCoPair(pt, ft)
        _, cache = ft.run_with_cache(tokens)
        assert hook not in cache.cache_dict  # the hook point is now the SAE
        with pytest.raises(InputError, match=f"SAE at {hook}.*pair.decompose\\(tokens\\)"):
            pair.decompose(cache, tokens=tokens)
        with pytest.raises(TuCoError, match=f"alpha_hooks cannot hook {hook}.*pair.scaled"):
            pair.alpha_hooks(0.5)


@pytest.mark.parametrize("hook", ["blocks.2.hook_resid_pre", "blocks.1.hook_attn_out"], ids=["block_input", "inner"])
def test_splicing_at_block_inputs_and_inner_hooks_inside_scaled_is_fine(models, hook):
    pt, ft_plain, ft = models
    tokens = random_tokens(2, 6, seed=12)
    sae = make_sae(hook)
    pair = TuCoPair(pt, ft)
    with pair.scaled(0.5):
        got = ft.run_with_saes(tokens, saes=[sae])
    torch.testing.assert_close(got, reference(pt, ft_plain, [sae], tokens, 0.5)["logits"], atol=1e-4, rtol=1e-4)


def test_splicing_at_resid_post_inside_scaled_raises_instead_of_dropping_the_scaling(models):
    pt, ft_plain, ft = models
    tokens = random_tokens(2, 6, seed=13)
    pair = TuCoPair(pt, ft)
    with pair.scaled(0.5):
        with pytest.raises(TuCoError, match="hook_resid_post was replaced"):
            ft.run_with_saes(tokens, saes=[make_sae("blocks.1.hook_resid_post")])
    assert not ft.acts_to_saes
    assert torch.equal(ft(tokens), ft_plain(tokens))
    # ... and removing one inside (reset_saes) too
    ft.add_sae(make_sae("blocks.1.hook_resid_post"))
    try:
        with pair.scaled(0.5):
            ft.reset_saes()
            with pytest.raises(TuCoError, match="hook_resid_post was replaced"):
                ft(tokens)
    finally:
        ft.reset_saes()


def test_hooks_on_an_sae_at_resid_post_are_removed_after_an_exception(models):
    pt, ft_plain, ft = models
    tokens = random_tokens(1, 5, seed=14)
    with ft.saes(saes=[make_sae("blocks.1.hook_resid_post")]):
        pair = TuCoPair(pt, ft)
        wrapper = ft.blocks[1].hook_resid_post
        before = ft(tokens)
        with pytest.raises(RuntimeError, match="boom"):
            with pair.scaled(0.5):
                assert len(wrapper._forward_pre_hooks) == 1
                raise RuntimeError("boom")
        assert not wrapper._forward_pre_hooks
        assert torch.equal(ft(tokens), before)


# ---------------------------------------------------------------------------- resid_post = next resid_pre
def test_sae_at_resid_post_of_block_l_measures_the_same_as_at_resid_pre_of_block_l_plus_1(models):
    """Both splice the SAE into the same point of the stream; TuCo must not depend on the name."""
    pt, ft_plain, ft = models
    tokens = random_tokens(2, 8, seed=15)
    results = []
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"):
        with ft.saes(saes=[make_sae(hook)]):
            pair = TuCoPair(pt, ft)
            dec = pair.decompose(tokens)
            results.append((dec.ptc_norm, dec.ftc_norm, dec.tuco, pair.run_with_alpha(tokens, [0.5, 2.0, -1.0])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_feature_interventions_compose_with_alpha_at_resid_post(models):
    """Ablating one SAE feature inside pair.scaled(α): the feature is one of the steered stream."""
    pt, ft_plain, ft = models
    tokens = random_tokens(2, 8, seed=16)
    hook = "blocks.1.hook_resid_post"
    sae = make_sae(hook, use_error_term=True)  # the SAE alone changes nothing; the ablation does
    k = int(reference(pt, ft_plain, [sae], tokens, 0.5)["features"][hook].mean((0, 1)).argmax())

    def zero_k(acts):
        acts = acts.clone()
        acts[..., k] = 0
        return acts

    with ft.saes(saes=[sae]):
        pair = TuCoPair(pt, ft)
        with pair.scaled(0.5):
            got = ft.run_with_hooks(tokens, fwd_hooks=[(f"{hook}.hook_sae_acts_post", lambda acts, hook: zero_k(acts))])
        unablated = pair.run_with_alpha(tokens, 0.5)
    ref = reference(
        pt, ft_plain, [sae], tokens, 0.5,
        sae_fn=lambda sae, v: sae_by_hand(sae, v, use_error_term=True, edit=zero_k),
    )
    torch.testing.assert_close(got, ref["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unablated, reference(pt, ft_plain, [], tokens, 0.5)["logits"], atol=1e-4, rtol=1e-4)
    assert (got - unablated).abs().max() > 1e-2


# ---------------------------------------------------------------------------- a loaded checkpoint, text prompts
def test_text_prompts_on_a_loaded_checkpoint_with_a_resid_pre_sae(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    loaded = load_pair(str(pt_dir), str(ft_dir))
    pt, ft_plain = loaded.pt, loaded.ft
    ft = as_sae_model(ft_plain)
    sae = make_sae("blocks.1.hook_resid_pre", d_in=ft.cfg.d_model)
    prompts = ["hello the cat", "tell me what the big dog wants to eat"]
    with ft.saes(saes=[sae]):
        pair = TuCoPair(pt, ft)
        batch = pair.tokenize(prompts, chat_template=True)  # left-padded, with a mask
        ref = reference(pt, ft_plain, [sae], batch.tokens, mask=batch.attention_mask)
        dec = pair.decompose(prompts, chat_template=True)
        torch.testing.assert_close(dec.tuco, hand_tuco(ref)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pair.tuco(prompts, chat_template=True), dec.tuco, atol=1e-5, rtol=1e-5)
        new = pair.generate(prompts[0], alpha=0.5, max_new_tokens=4, chat_template=True,
                            return_type="tokens", stop_at_eos=False)
        one = pair.tokenize(prompts[0], chat_template=True).tokens
        assert torch.equal(new, greedy_by_hand(pt, ft_plain, [sae], one, 0.5, 4))
        assert isinstance(pair.generate(prompts[0], alpha=0.5, max_new_tokens=4, chat_template=True), str)
