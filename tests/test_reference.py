"""tuco_lens against the independent Hugging Face reference (tests/hf_reference.py), every architecture.

Checkpoints are written to temporary directories with misleading names and loaded through
``tuco_lens.load_pair``, like a user's local fine-tune, as HookedTransformers and as
TransformerBridges (the same tests, both backends; only the bridge on transformer-lens 4.x).
On a bridge the verbs run Hugging Face's own attention (SDPA) and the last-token path;
``test_bridge_attention_paths_match_reference`` also runs them with the bridge's eager attention.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

import tuco_lens
from hf_reference import reference_alpha_logits, reference_decomposition, reference_greedy_generate

pytestmark = pytest.mark.reference  # test tier (tests/conftest.py, TIERS)

PROMPTS = ["the cat sat on the mat", "hello", "a dog and a bird went to the river today"]
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def loaded(arch_pair, backend):
    arch, pt_dir, ft_dir = arch_pair
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend=backend)
    assert pair.backend.name == {"hooked": "HookedTransformer", "bridge": "TransformerBridge"}[backend]
    hf = [
        AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval() for d in (pt_dir, ft_dir)
    ]
    return arch, pair, hf[0], hf[1]


def _right_padded(batch):
    """The same rows as a left-padded batch, right-padded."""
    order = torch.argsort(1 - batch.attention_mask, dim=-1, stable=True)
    return batch.tokens.gather(-1, order), batch.attention_mask.gather(-1, order)


@pytest.mark.parametrize("chat_template", [False, True])
def test_tuco_and_per_token_tuco_match_reference(loaded, chat_template):
    arch, pair, hf_pt, hf_ft = loaded
    batch = pair.tokenize(PROMPTS, chat_template=chat_template)
    ref = reference_decomposition(hf_pt, hf_ft, batch.tokens, batch.attention_mask)
    dec = pair.decompose(PROMPTS, chat_template=chat_template)
    torch.testing.assert_close(dec.tuco.double(), ref["tuco"], **TOL)
    torch.testing.assert_close(pair.tuco(PROMPTS, chat_template=chat_template).double(), ref["tuco"], **TOL)
    torch.testing.assert_close(dec.tuco_per_token.double(), ref["tuco_per_token"], equal_nan=True, **TOL)
    torch.testing.assert_close(dec.beta.double(), ref["beta"], equal_nan=True, **TOL)
    scale = float(ref["ptc_norm"].nan_to_num().abs().max())
    torch.testing.assert_close(dec.ptc_norm.double() / scale, ref["ptc_norm"] / scale, equal_nan=True, **TOL)
    torch.testing.assert_close(dec.ftc_norm.double() / scale, ref["ftc_norm"] / scale, equal_nan=True, **TOL)
    assert float(ref["tuco"].min()) > 1e-3  # the fine-tune is visible: a non-trivial comparison


def test_right_padding_and_l2_match_reference(loaded):
    arch, pair, hf_pt, hf_ft = loaded
    tokens, mask = _right_padded(pair.tokenize(PROMPTS))
    ref = reference_decomposition(hf_pt, hf_ft, tokens, mask, norm="l2")
    dec = pair.decompose(tokens, attention_mask=mask, norm="l2")
    torch.testing.assert_close(dec.tuco.double(), ref["tuco"], **TOL)
    torch.testing.assert_close(dec.tuco_per_token.double(), ref["tuco_per_token"], equal_nan=True, **TOL)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.25, -0.5, "per_layer"])
def test_alpha_logits_match_reference(loaded, alpha):
    arch, pair, hf_pt, hf_ft = loaded
    if alpha == "per_layer":
        alpha = [0.25 * (l + 1) for l in range(pair.n_layers)]
    batch = pair.tokenize(PROMPTS)
    ref = reference_alpha_logits(hf_pt, hf_ft, batch.tokens, batch.attention_mask, alpha=alpha)
    got = pair.run_with_alpha(PROMPTS, alpha)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], ref[real], **TOL)


def test_alpha_one_and_zero_match_hugging_face_models(loaded):
    arch, pair, hf_pt, hf_ft = loaded
    batch = pair.tokenize(PROMPTS[:1])
    with torch.no_grad():
        ft_logits = hf_ft(batch.tokens).logits
        pt_logits = hf_pt(batch.tokens).logits
    torch.testing.assert_close(pair.run_with_alpha(PROMPTS[:1], 1.0), ft_logits, **TOL)
    torch.testing.assert_close(pair.run_with_alpha(PROMPTS[:1], 0.0), pt_logits, **TOL)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_generation_matches_reference_greedy(loaded, alpha):
    arch, pair, hf_pt, hf_ft = loaded
    batch = pair.tokenize(PROMPTS)  # left-padded
    ref = reference_greedy_generate(hf_pt, hf_ft, batch.tokens, batch.attention_mask, alpha=alpha, max_new_tokens=6)
    got = pair.generate(PROMPTS, alpha=alpha, max_new_tokens=6, stop_at_eos=False, return_type="tokens")
    assert torch.equal(got, ref)


@contextlib.contextmanager
def _attention_path(pair, attention):
    """``"fast"``: tuco_lens's default (Hugging Face's own attention, SDPA, on a bridge); ``"eager"``:
    a no-op hook on every ``hook_pattern`` of both models, which keeps the bridge's eager attention.
    Yields the number of Hugging Face attention calls so far (a list that grows)."""
    calls, handles = [], []
    for model in (pair.pt, pair.ft):
        for block in model.blocks:
            handles.append(block.attn.original_component.register_forward_hook(lambda *a: calls.append(1)))
            if attention == "eager":
                handles.append(block.attn.hook_pattern.register_forward_hook(lambda *a: None))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("attention", ["fast", "eager"])
def test_bridge_attention_paths_match_reference(loaded, attention):
    """Both attention paths of a bridge, and its last-token path (``pair.tuco``), against the reference."""
    arch, pair, hf_pt, hf_ft = loaded
    if pair.backend.name != "TransformerBridge":
        pytest.skip("a HookedTransformer has one attention path (TransformerLens's own)")
    batch = pair.tokenize(PROMPTS)
    ref = reference_decomposition(hf_pt, hf_ft, batch.tokens, batch.attention_mask)
    ref_logits = reference_alpha_logits(hf_pt, hf_ft, batch.tokens, batch.attention_mask, alpha=0.5)
    ref_tokens = reference_greedy_generate(hf_pt, hf_ft, batch.tokens, batch.attention_mask, alpha=0.5, max_new_tokens=4)
    real = batch.attention_mask.bool()
    with _attention_path(pair, attention) as calls:
        torch.testing.assert_close(pair.tuco(PROMPTS).double(), ref["tuco"], **TOL)
        dec = pair.decompose(PROMPTS)
        logits = pair.run_with_alpha(PROMPTS, 0.5)
        tokens = pair.generate(PROMPTS, alpha=0.5, max_new_tokens=4, stop_at_eos=False, return_type="tokens")
    assert (len(calls) > 0) == (attention == "fast")
    torch.testing.assert_close(dec.tuco.double(), ref["tuco"], **TOL)
    torch.testing.assert_close(dec.beta.double(), ref["beta"], equal_nan=True, **TOL)
    torch.testing.assert_close(logits[real], ref_logits[real], **TOL)
    assert torch.equal(tokens, ref_tokens)
