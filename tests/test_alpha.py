"""α-scaled forward passes: the definition, the identities, and composition with user hooks."""

from __future__ import annotations

import math

import pytest
import torch

from tuco_lens import AlphaError, TuCoError, TuCoPair
from tiny_models import KINDS, make_pair, random_tokens

pytestmark = pytest.mark.hooked  # tiny HookedTransformers: transformer-lens 3.x only (skipped on 4.x)


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    return TuCoPair(*make_pair(request.param))


def plain_alpha_logits(pair, tokens, alphas, mask=None):
    """Definition 5.1 by hand: embed, then x <- x + PTC(x) + a·FTC(x) with direct block calls."""
    ft, pt = pair.ft, pair.pt
    with torch.no_grad():
        x, _, spe, mask = ft.input_to_embed(tokens, attention_mask=mask)
        for l in range(ft.cfg.n_layers):
            pt_out = pt.blocks[l](x, attention_mask=mask, shortformer_pos_embed=spe)
            ft_out = ft.blocks[l](x, attention_mask=mask, shortformer_pos_embed=spe)
            x = x + (pt_out - x) + alphas[l] * (ft_out - pt_out)
        return ft.unembed(ft.ln_final(x))


def test_alpha_one_is_fine_tuned_and_zero_is_pre_trained_exactly(pair):
    tokens = random_tokens(2, 8)
    assert torch.equal(pair.run_with_alpha(tokens, 1.0), pair.ft(tokens, attention_mask=torch.ones_like(tokens)))
    assert torch.equal(pair.run_with_alpha(tokens, 0.0), pair.pt(tokens, attention_mask=torch.ones_like(tokens)))
    torch.testing.assert_close(pair.run_with_alpha(tokens, 1.0), pair.ft(tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pair.run_with_alpha(tokens, 0.0), pair.pt(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.25, -0.5, [0.0, 1.0, 2.0]])
def test_alpha_matches_definition_on_the_scaled_stream(pair, alpha):
    tokens = random_tokens(2, 8, seed=1)
    alphas = alpha if isinstance(alpha, list) else [alpha] * pair.n_layers
    got = pair.run_with_alpha(tokens, alpha)
    torch.testing.assert_close(got, plain_alpha_logits(pair, tokens, alphas), atol=1e-4, rtol=1e-4)
    assert (got - pair.ft(tokens)).abs().max() > 1e-3  # scaling really changed something


def test_alpha_padded_batch_equals_one_by_one(pair):
    tokens = random_tokens(2, 9, seed=2)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    batched = pair.run_with_alpha(tokens, 0.5, attention_mask=mask)
    alone = pair.run_with_alpha(tokens[1, 4:], 0.5)
    torch.testing.assert_close(batched[1, 4:], alone[0], atol=1e-4, rtol=1e-4)


def test_per_layer_alpha_of_ones_is_fine_tuned(pair):
    tokens = random_tokens(1, 6, seed=3)
    assert torch.equal(pair.run_with_alpha(tokens, [1.0] * pair.n_layers), pair.run_with_alpha(tokens, 1.0))


def test_scaled_context_works_with_run_with_cache_and_removes_hooks(pair):
    tokens = random_tokens(2, 6, seed=4)
    before = pair.ft(tokens)
    with pair.scaled(0.5):
        logits, cache = pair.ft.run_with_cache(tokens)
    torch.testing.assert_close(logits, pair.run_with_alpha(tokens, 0.5), atol=1e-6, rtol=1e-6)
    # the cached resid_post is the scaled stream, and it feeds the next block
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    alphas = [0.5] * pair.n_layers
    torch.testing.assert_close(logits, plain_alpha_logits(pair, tokens, alphas), atol=1e-4, rtol=1e-4)
    assert torch.equal(pair.ft(tokens), before)
    assert all(len(b.hook_resid_post.fwd_hooks) == 0 for b in pair.ft.blocks)
    assert all(len(b._forward_pre_hooks) == 0 and len(b._forward_hooks) == 0 for b in pair.ft.blocks)
    assert all(len(b.hook_resid_pre._forward_hooks) == 0 for b in pair.ft.blocks)


def test_scaled_context_removes_hooks_after_an_exception(pair):
    tokens = random_tokens(1, 5, seed=5)
    before = pair.ft(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with pair.scaled(0.0):
            raise RuntimeError("boom")
    assert torch.equal(pair.ft(tokens), before)
    # an error inside the forward pass too
    def explode(x, hook):
        raise RuntimeError("inside forward")

    with pytest.raises(RuntimeError, match="inside forward"):
        with pair.scaled(0.5):
            pair.ft.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", explode)])
    assert torch.equal(pair.ft(tokens), before)


def test_hook_order_semantics(pair):
    """Hooks registered before entering are part of the fine-tuned block; hooks inside see the scaled stream."""
    tokens = random_tokens(1, 6, seed=6)
    shift = torch.zeros(pair.ft.cfg.d_model)
    shift[0] = 3.0

    def add_shift(x, hook):
        return x + shift

    # inside: applied on top of the scaled stream at layer 0
    with pair.scaled(0.0):
        inside = pair.ft.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", add_shift)])
    with pair.scaled(0.0):
        _, cache = pair.ft.run_with_cache(tokens)
    expected_stream = cache["blocks.0.hook_resid_post"] + shift
    ft, pt = pair.ft, pair.pt
    x = expected_stream
    for l in range(1, pair.n_layers):
        x = pt.blocks[l](x)
    torch.testing.assert_close(inside, ft.unembed(ft.ln_final(x)), atol=1e-4, rtol=1e-4)

    # before: part of the fine-tuned block, so α = 0 removes it entirely at layer 0
    pair.ft.blocks[0].hook_resid_post.add_hook(add_shift)
    try:
        with pair.scaled(0.0):
            before_entering = pair.ft(tokens)
    finally:
        pair.ft.reset_hooks()
    torch.testing.assert_close(before_entering, pair.run_with_alpha(tokens, 0.0), atol=1e-5, rtol=1e-5)


def test_user_edit_of_resid_pre_is_seen_by_both_blocks(pair):
    """A patching hook on hook_resid_pre changes x_l for the pre-trained block too."""
    tokens = random_tokens(1, 6, seed=7)

    def zero_first(x, hook):
        x = x.clone()
        x[:, 0] = 0.0
        return x

    with pair.scaled(0.0):
        got = pair.ft.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", zero_first)])
    with torch.no_grad():
        x, *_ = pair.ft.input_to_embed(tokens)
        for l in range(pair.n_layers):
            if l == 1:
                x = zero_first(x, None)
            x = pair.pt.blocks[l](x)
        expected = pair.ft.unembed(pair.ft.ln_final(x))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_alpha_hooks_compose_with_run_with_hooks(pair):
    tokens = random_tokens(2, 7, seed=8)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    got = pair.ft.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=pair.alpha_hooks(0.5, attention_mask=mask))
    torch.testing.assert_close(got, pair.run_with_alpha(tokens, 0.5, attention_mask=mask), atol=1e-6, rtol=1e-6)
    assert all(len(b.hook_resid_post.fwd_hooks) == 0 for b in pair.ft.blocks)


def test_nested_scaling_is_refused(pair):
    with pair.scaled(0.5):
        with pytest.raises(TuCoError, match="already scaling"):
            with pair.scaled(2.0):
                pass
        with pytest.raises(TuCoError, match="already scaling"):
            pair.decompose(random_tokens(1, 4))
    pair.decompose(random_tokens(1, 4))  # fine again after exit


@pytest.mark.parametrize(
    "alpha, message",
    [
        (math.nan, "alpha must be finite"),
        (math.inf, "alpha must be finite"),
        ([1.0, 2.0], "one value per layer"),
        ("1.0", "alpha must be a number"),
        ([1.0, "x", 2.0], "must be real numbers"),
        (True, "alpha must be a number"),
    ],
)
def test_bad_alpha_is_refused(pair, alpha, message):
    with pytest.raises(AlphaError, match=message):
        pair.run_with_alpha(random_tokens(1, 3), alpha)
    with pytest.raises(AlphaError, match=message):
        pair.scaled(alpha)
