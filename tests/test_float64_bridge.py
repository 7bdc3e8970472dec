"""float64 TransformerBridge pairs are exact: equal to Hugging Face's float64 models, padding included.

TransformerLens's attention bridges compute the softmax in float32 whatever the model dtype; in
float64 that gave NaN logits at the real tokens of left-padded rows (the float64 mask minimum
becomes -inf in float32) and logits about 1e-5 from Hugging Face's.
``tuco_lens.backends.repair_float64_attention`` recomputes the pattern in float64. The
references here are Hugging Face models in float64 with "sdpa" attention (exact in float64,
see tests/test_hf_reference.py::test_float64_models) and tests/hf_reference.py on them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import tuco_lens
from hf_reference import position_ids_from_mask, reference_decomposition, reference_greedy_generate
from tuco_lens.errors import UnsupportedVersionsError

pytestmark = pytest.mark.reference  # test tier (tests/conftest.py, TIERS)

PROMPTS = ["the cat sat on the mat", "hello", "a dog and a bird went to the river today"]
EXACT = dict(atol=1e-12, rtol=1e-12)


def _hf64(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def loaded(arch_pair):
    arch, pt_dir, ft_dir = arch_pair
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge", dtype="float64")
    return arch, pair, _hf64(pt_dir), _hf64(ft_dir)


def test_forward_equals_hugging_face_on_left_padded_rows(loaded):
    arch, pair, _, hf_ft = loaded
    batch = pair.tokenize(PROMPTS)
    assert bool((batch.attention_mask == 0).any())  # really padded
    real = batch.attention_mask.bool()
    with torch.no_grad():
        ours = pair.ft(batch.tokens, attention_mask=batch.attention_mask)
        theirs = hf_ft(
            batch.tokens, attention_mask=batch.attention_mask,
            position_ids=position_ids_from_mask(batch.attention_mask), use_cache=False,
        ).logits
    assert ours.dtype == torch.float64
    assert not torch.isnan(ours[real]).any()
    torch.testing.assert_close(ours[real], theirs[real], **EXACT)


def test_decomposition_equals_the_float64_reference(loaded):
    arch, pair, hf_pt, hf_ft = loaded
    batch = pair.tokenize(PROMPTS)
    ref = reference_decomposition(hf_pt, hf_ft, batch.tokens, batch.attention_mask)
    dec = pair.decompose(PROMPTS, accumulate_dtype=torch.float64)
    torch.testing.assert_close(dec.tuco, ref["tuco"], atol=1e-10, rtol=0)
    torch.testing.assert_close(dec.beta, ref["beta"], atol=1e-10, rtol=0, equal_nan=True)
    torch.testing.assert_close(dec.ftc_sum, ref["ftc_sum"], atol=1e-10, rtol=1e-10)
    assert float(ref["tuco"].min()) > 1e-3


def test_generation_equals_the_float64_reference(loaded):
    arch, pair, hf_pt, hf_ft = loaded
    batch = pair.tokenize(PROMPTS)  # left-padded
    ref = reference_greedy_generate(hf_pt, hf_ft, batch.tokens, batch.attention_mask, alpha=0.5, max_new_tokens=4)
    got = pair.generate(PROMPTS, alpha=0.5, max_new_tokens=4, stop_at_eos=False, return_type="tokens")
    assert torch.equal(got, ref)


@pytest.fixture(scope="module")
def llama64(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    return tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge", dtype="float64")


def test_user_hooks_compose_with_the_float64_pattern(llama64):
    """Hooks on hook_attn_scores feed the exact pattern; hooks on hook_pattern see it."""
    batch = llama64.tokenize(PROMPTS)
    mask = batch.attention_mask
    seen = {}

    def record_pattern(pattern, hook):
        seen["pattern"] = pattern.clone()

    def flatten_scores(scores, hook):  # every visible key equally likely
        return torch.where(scores > torch.finfo(scores.dtype).min / 2, torch.zeros_like(scores), scores)

    with torch.no_grad():
        llama64.ft.run_with_hooks(
            batch.tokens, attention_mask=mask,
            fwd_hooks=[("blocks.0.attn.hook_attn_scores", flatten_scores), ("blocks.0.attn.hook_pattern", record_pattern)],
        )
    pattern = seen["pattern"]  # [batch, head, query, key]
    assert pattern.dtype == torch.float64
    row, query = 1, mask.shape[1] - 1  # the last query of the padded row "hello"
    visible = mask[row].bool()
    expected = visible.double() / visible.sum()
    torch.testing.assert_close(pattern[row, :, query], expected.expand_as(pattern[row, :, query]), **EXACT)
    attention = llama64.ft.blocks[0].attn
    assert not attention.hook_attn_scores._forward_hooks and not attention.hook_pattern._forward_hooks


def test_per_call_hooks_are_removed_after_an_error(llama64):
    batch = llama64.tokenize(PROMPTS)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        llama64.ft.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask,
                                  fwd_hooks=[("blocks.0.attn.hook_pattern", boom)])
    for block in llama64.ft.blocks:
        assert not block.attn.hook_attn_scores._forward_hooks and not block.attn.hook_pattern._forward_hooks


def test_a_pattern_that_is_not_a_softmax_of_the_scores_is_refused(llama64, monkeypatch):
    """If the bridge's attention ever computes its pattern another way, refuse rather than guess."""
    softmax = torch.nn.functional.softmax

    def sharper(x, dim=None, dtype=None, **kwargs):  # stands in for an attention we do not know
        return softmax(2 * x, dim=dim, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "softmax", sharper)
    batch = llama64.tokenize(PROMPTS)
    with pytest.raises(UnsupportedVersionsError, match="float64 attention exact.*dtype='float32'"), torch.no_grad():
        llama64.ft(batch.tokens, attention_mask=batch.attention_mask)


def test_float32_bridges_are_left_as_they_are(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge")
    calls = []
    attention = pair.ft.blocks[0].attn
    handle = attention.hook_pattern.register_forward_hook(lambda m, i, o: calls.append(len(m._forward_hooks)))
    try:
        with torch.no_grad():
            pair.ft(pair.tokenize(PROMPTS[0]).tokens)
    finally:
        handle.remove()
    assert calls == [1]  # only the hook of this test: no float64 recomputation in float32
