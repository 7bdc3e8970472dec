"""TransformerBridge pairs: what differs from HookedTransformer pairs, and how they compose.

The numbers of a bridge pair against the Hugging Face reference are checked in
``test_reference.py`` (the same tests as for HookedTransformers). Here: the identities that tie
the bridge's own entry points together (its ``run_with_cache``, ``generate`` and hooks inside
``pair.scaled``), the backend choice of ``load_pair``, and the errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import tuco_lens
from tuco_lens import loading
from tuco_lens.backends import HAS_HOOKED_TRANSFORMER, TransformerBridge, backend_of
from tuco_lens.errors import IncompatiblePairError, InputError, InputTypeError, TuCoError

pytestmark = pytest.mark.reference  # test tier (tests/conftest.py, TIERS)

PROMPTS = ["the cat sat on the mat", "hello", "a dog and a bird went to the river"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def bridge_pair(request, checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair(request.param)
    return tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge")


def test_auto_backend_follows_transformer_lens(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir))
    expected = "HookedTransformer" if HAS_HOOKED_TRANSFORMER else "TransformerBridge"
    assert pair.backend.name == expected
    assert isinstance(pair.ft, TransformerBridge) == (not HAS_HOOKED_TRANSFORMER)


def test_decompose_from_bridge_cache_equals_live(bridge_pair):
    batch = bridge_pair.tokenize(PROMPTS)
    _, cache = bridge_pair.ft.run_with_cache(
        batch.tokens, attention_mask=batch.attention_mask, names_filter=bridge_pair.resid_names
    )
    from_cache = bridge_pair.decompose(cache, tokens=batch.tokens, attention_mask=batch.attention_mask)
    live = bridge_pair.decompose(PROMPTS)
    torch.testing.assert_close(from_cache.tuco, live.tuco, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_cache.beta, live.beta, atol=1e-6, rtol=0, equal_nan=True)
    assert float(live.tuco.min()) > 1e-3


def test_decompose_from_cache_refuses_per_layer_attention_types(bridge_pair, monkeypatch):
    batch = bridge_pair.tokenize(PROMPTS[:1])
    _, cache = bridge_pair.ft.run_with_cache(batch.tokens, names_filter=bridge_pair.resid_names)
    config = bridge_pair.ft.original_model.config
    monkeypatch.setattr(config, "layer_types", ["sliding_attention", "full_attention"], raising=False)
    with pytest.raises(TuCoError, match="per-layer attention masks.*pair.decompose\\(tokens\\)"):
        bridge_pair.decompose(cache, tokens=batch.tokens)


def test_components_sum_to_the_next_stream(bridge_pair):
    """x_l + PTC_l + FTC_l is the bridge's own hook_resid_post, and PTC_l is pt's layer on x_l."""
    batch = bridge_pair.tokenize(PROMPTS[:1])
    _, cache = bridge_pair.ft.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    seen = {}

    def record(layer, x, pt_post, ft_post):
        seen[layer] = (x, pt_post, ft_post)

    with torch.no_grad(), tuco_lens.PairedBlocks(bridge_pair.pt, bridge_pair.ft, record, writes=False):
        bridge_pair.ft(batch.tokens, attention_mask=batch.attention_mask)
    for layer, (x, pt_post, ft_post) in seen.items():
        torch.testing.assert_close(x, cache[f"blocks.{layer}.hook_resid_pre"], atol=0, rtol=0)
        torch.testing.assert_close(ft_post, cache[f"blocks.{layer}.hook_resid_post"], atol=0, rtol=0)
        ptc, ftc = pt_post - x, ft_post - pt_post
        torch.testing.assert_close(x + ptc + ftc, ft_post, atol=1e-5, rtol=1e-5)
        assert float(ftc.abs().max()) > 1e-3


def test_bridge_generate_inside_scaled_equals_pair_generate(bridge_pair):
    tokens = bridge_pair.tokenize(PROMPTS[0]).tokens
    for alpha in (0.5, 1.5):
        with bridge_pair.scaled(alpha):
            theirs = bridge_pair.ft.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False)
        ours = bridge_pair.generate(
            tokens, alpha=alpha, max_new_tokens=6, stop_at_eos=False, return_type="tokens"
        )
        assert theirs.tolist() == ours.tolist()


def test_cached_generation_equals_uncached(bridge_pair):
    kwargs = dict(alpha=0.75, max_new_tokens=6, stop_at_eos=False, return_type="tokens")
    cached = bridge_pair.generate(PROMPTS, use_past_kv_cache=True, **kwargs)
    uncached = bridge_pair.generate(PROMPTS, use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_run_with_cache_and_user_hooks_inside_scaled(bridge_pair):
    batch = bridge_pair.tokenize(PROMPTS)
    real = batch.attention_mask.bool()
    reference = bridge_pair.run_with_alpha(PROMPTS, 0.5)
    with bridge_pair.scaled(0.5):
        logits, cache = bridge_pair.ft.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    # (run_with_cache lets Hugging Face build a KV cache, run_with_alpha does not: rounding differs)
    torch.testing.assert_close(logits[real], reference[real], atol=1e-5, rtol=1e-5)
    # a hook added inside the context sees the scaled stream (the cache's resid_post)
    seen = []
    with bridge_pair.scaled(0.5):
        bridge_pair.ft.run_with_hooks(
            batch.tokens,
            attention_mask=batch.attention_mask,
            fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: seen.append(x.clone()))],
        )
    torch.testing.assert_close(seen[0], cache["blocks.0.hook_resid_post"], atol=0, rtol=0)
    # a hook that zeroes the input of block 1 changes what both blocks of layer 1 see
    def zero(x, hook):
        return torch.zeros_like(x)

    with bridge_pair.scaled(0.0):
        zeroed = bridge_pair.ft.run_with_hooks(
            batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=[("blocks.1.hook_resid_pre", zero)]
        )
    with bridge_pair.pt.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", zero)]):
        pt_zeroed = bridge_pair.pt(batch.tokens, attention_mask=batch.attention_mask)
    torch.testing.assert_close(zeroed[real], pt_zeroed[real], atol=1e-5, rtol=1e-5)


def test_hooks_removed_after_error(bridge_pair):
    before = [len(block._forward_pre_hooks) + len(block._forward_hooks) for block in bridge_pair.ft.blocks]
    with pytest.raises(RuntimeError, match="boom"):
        with bridge_pair.scaled(0.5):
            raise RuntimeError("boom")
    after = [len(block._forward_pre_hooks) + len(block._forward_hooks) for block in bridge_pair.ft.blocks]
    assert before == after
    assert all(not backend_of(bridge_pair.ft).resid_post(b).fwd_hooks for b in bridge_pair.ft.blocks)


def test_cache_filled_outside_the_context_is_refused(bridge_pair):
    tokens = bridge_pair.tokenize(PROMPTS[0]).tokens
    cache = transformers.DynamicCache(config=bridge_pair.ft.original_model.config)
    bridge_pair.ft(tokens, past_key_values=cache, use_cache=True)
    with bridge_pair.scaled(0.5), pytest.raises(TuCoError, match="computed without tuco_lens"):
        bridge_pair.ft(tokens[:, -1:], past_key_values=cache, use_cache=True)


def test_alpha_hooks_refused_on_bridges(bridge_pair):
    with pytest.raises(TuCoError, match="pair.scaled"):
        bridge_pair.alpha_hooks(0.5)


def test_mixed_pair_refused(checkpoint_pair):
    if not HAS_HOOKED_TRANSFORMER:
        pytest.skip("needs HookedTransformer (transformer-lens 3.x)")
    pt_dir, ft_dir = checkpoint_pair("llama")
    hooked = tuco_lens.load_model(str(pt_dir), backend="hooked")
    bridge = tuco_lens.load_model(str(ft_dir), backend="bridge")
    with pytest.raises(IncompatiblePairError, match="model class differs"):
        tuco_lens.TuCoPair(hooked, bridge)


def test_bridge_config_difference_refused(checkpoint_pair, tmp_path):
    pt_dir, ft_dir = checkpoint_pair("llama")
    model = AutoModelForCausalLM.from_pretrained(ft_dir)
    model.config.rope_theta = 1234.0
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 1234.0}
    model.save_pretrained(tmp_path / "other-rope")
    AutoTokenizer.from_pretrained(ft_dir).save_pretrained(tmp_path / "other-rope")
    with pytest.raises(IncompatiblePairError, match="rope"):
        tuco_lens.load_pair(str(pt_dir), str(tmp_path / "other-rope"), backend="bridge")


def test_transformers_object_is_left_intact(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    hf = AutoModelForCausalLM.from_pretrained(ft_dir).eval()
    layer_types = [type(layer) for layer in hf.model.layers]
    state = copy.deepcopy(hf.state_dict())
    bridge = tuco_lens.load_model(hf, tokenizer=str(ft_dir), backend="bridge")
    assert isinstance(bridge, TransformerBridge)
    assert [type(layer) for layer in hf.model.layers] == layer_types
    assert all(torch.equal(state[k], v) for k, v in hf.state_dict().items())
    tokens = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(bridge(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_bridge_loading_errors(checkpoint_pair):
    pt_dir, _ = checkpoint_pair("llama")
    with pytest.raises(InputError, match="backend must be one of"):
        tuco_lens.load_model(str(pt_dir), backend="tl4")
    with pytest.raises(InputError, match="HookedTransformer option"):
        tuco_lens.load_model(str(pt_dir), backend="bridge", fold_ln=True)
    with pytest.raises(InputError, match="device_map"):
        tuco_lens.load_model(str(pt_dir), backend="bridge", n_devices=2)
    bridge = tuco_lens.load_model(str(pt_dir), backend="bridge")
    assert tuco_lens.load_model(bridge) is bridge
    if HAS_HOOKED_TRANSFORMER:
        with pytest.raises(InputTypeError, match="backend='auto'"):
            tuco_lens.load_model(bridge, backend="hooked")


def test_bridge_without_tokenizer_is_refused(checkpoint_pair):
    pt_dir, _ = checkpoint_pair("llama")
    config = AutoModelForCausalLM.from_pretrained(pt_dir).config
    config._name_or_path = ""
    hf = AutoModelForCausalLM.from_config(config)  # in memory: no directory, no tokenizer
    hf.name_or_path = ""
    with pytest.raises(TuCoError, match="needs a tokenizer.*tokenizer="):
        tuco_lens.load_model(hf, backend="bridge")


def test_hooked_backend_unavailable_message(monkeypatch, checkpoint_pair):
    """What a transformer-lens 4.x user sees when asking for a HookedTransformer."""
    monkeypatch.setattr(loading, "HAS_HOOKED_TRANSFORMER", False)
    pt_dir, _ = checkpoint_pair("llama")
    with pytest.raises(InputError, match="transformer-lens 4.x removed"):
        tuco_lens.load_model(str(pt_dir), backend="hooked")
