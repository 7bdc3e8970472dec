"""OutputCo (tuco_lens.analyses.outputco) against the Hugging Face models alone, on every architecture and both backends.

OutputCo compares the residual streams after the last block (before the final norm). On a
TransformerBridge a forward pass with ``stop_at_layer`` returns the logits, and OutputCo was once
computed on those; ``Backend.final_residual`` stops at the last block's ``hook_resid_post`` on
either model class. Tolerance: 1e-5 absolute (OutputCo is in [0, 1]; float32 models).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import tuco_lens
from hf_reference import reference_outputco
from tuco_lens.analyses import outputco
from tuco_lens.backends import backend_of

pytestmark = pytest.mark.reference  # test tier (tests/conftest.py, TIERS)

PROMPTS = ["the cat sat on the mat", "hello", "a dog and a bird went to the river today"]


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_outputco_matches_the_hugging_face_models(pair_with_hf, norm):
    _, pair, hf_pt, hf_ft = pair_with_hf
    batch = pair.tokenize(PROMPTS)
    want = reference_outputco(hf_pt, hf_ft, batch.tokens, batch.attention_mask, norm=norm)
    got = outputco(pair, PROMPTS, norm=norm)
    assert float(want.min()) > 1e-3  # the pair differs: a real comparison, not 0 against 0
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputco(pair, PROMPTS, norm=norm, batch_size=1).double(), want, atol=1e-5, rtol=0)


def test_final_residual_is_the_final_norms_input(pair_with_hf):
    """``Backend.final_residual`` is x_L: the final norm applied to it gives the logits' input."""
    _, pair, _, _ = pair_with_hf
    batch = pair.tokenize(PROMPTS)
    backend = backend_of(pair.ft)
    resid = backend.final_residual(batch.tokens, batch.attention_mask)
    assert resid.shape == (*batch.tokens.shape, pair.ft.cfg.d_model)
    w_u, b_u = backend.unembedding()
    logits = backend.forward(batch.tokens, batch.attention_mask)
    mine = backend.final_norm()(resid) @ w_u + (0 if b_u is None else b_u)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(mine[real], logits[real], atol=1e-4, rtol=1e-4)


def test_accumulate_dtype_is_checked_in_one_place(checkpoint_pair):
    """decompose, tuco and outputco refuse the same dtypes with the same message."""
    from tuco_lens.errors import InputError

    pt_dir, ft_dir = checkpoint_pair("llama")
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge")
    for run in (pair.decompose, pair.tuco, lambda p, **kw: outputco(pair, p, **kw)):
        with pytest.raises(InputError, match=r"accumulate_dtype must be torch.float32 or torch.float64, got torch.float16"):
            run(PROMPTS, accumulate_dtype=torch.float16)
    batch = pair.tokenize(PROMPTS)
    hf = [AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval() for d in (pt_dir, ft_dir)]
    want = reference_outputco(*hf, batch.tokens, batch.attention_mask)
    torch.testing.assert_close(outputco(pair, PROMPTS, accumulate_dtype=torch.float64), want, atol=1e-6, rtol=0)
