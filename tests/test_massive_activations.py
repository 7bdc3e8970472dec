"""Massive activations: exact low-precision sums, refused float16 overflows, readable views.

Real models write a few huge values (|x| ≈ 28,000 in a 135M instruct model) into one channel of
the residual stream at the first token and at some delimiters. The pair here is the
``llama_chatml`` checkpoint (16 layers, ChatML) with such an activation planted at layer 2 for
the BOS ``<|im_start|>`` and the newline, the token that ends ChatML's generation prompt, so the
token TuCo is measured at carries it too (``checkpoints.plant_massive_activation``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import tuco_lens
from checkpoints import plant_massive_activation
from tuco_lens.backends import native_modules
from tuco_lens.errors import NonFiniteError
from tuco_lens.plotting import plot_layers, plot_token_heatmap

PROMPTS = ["the cat sat on the mat", "hello the dog"]
MASSIVE = 28000.0
LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _planted(checkpoint_pair, root, value):
    pt_dir, ft_dir = checkpoint_pair("llama_chatml")
    tok = AutoTokenizer.from_pretrained(ft_dir)
    ids = (tok.bos_token_id, tok("\n", add_special_tokens=False).input_ids[0])
    return tuple(
        str(plant_massive_activation(d, root / f"{d.name}-{value:g}", token_ids=ids, value=value))
        for d in (pt_dir, ft_dir)
    )


@pytest.fixture(scope="module")
def planted(checkpoint_pair, tmp_path_factory):
    return _planted(checkpoint_pair, tmp_path_factory.mktemp("massive"), MASSIVE)


@pytest.fixture(scope="module")
def pairs(planted, backend):
    return {dtype: tuco_lens.load_pair(*planted, backend=backend, dtype=dtype) for dtype in ("float32", *LOW)}


def test_the_planted_activation_is_massive(pairs):
    pair = pairs["float32"]
    batch = pair.tokenize(PROMPTS, chat_template=True)
    _, cache = pair.ft.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    x = cache["blocks.3.hook_resid_pre"].abs().amax(-1)  # [batch, pos], after the planted layer 2
    massive = (batch.tokens == pair.tokenizer.bos_token_id) | (batch.tokens == batch.tokens[0, -1])
    real = batch.attention_mask.bool()
    assert float(x[massive & real].min()) > 0.8 * MASSIVE
    assert float(x[~massive & real].max()) < 100
    assert bool(massive[:, -1].all())  # the scored token (the template's newline) carries it


@pytest.mark.parametrize("dtype", sorted(LOW))
def test_low_precision_sums_equal_their_exact_value(pairs, dtype):
    """The float32 sums of a bf16/fp16 pair equal the float64 sums of the same components."""
    pair = pairs[dtype]
    batch = pair.tokenize(PROMPTS, chat_template=True)
    layers = []

    def record(layer, x, pt_post, ft_post):
        assert x.dtype == LOW[dtype]
        layers.append((x.double(), pt_post.double(), ft_post.double()))

    # the components of the same forward pass as decompose's (its attention implementation included)
    with torch.no_grad(), native_modules(pair.pt, pair.ft), tuco_lens.PairedBlocks(pair.pt, pair.ft, record, writes=False):
        pair.backend.forward(batch.tokens, batch.attention_mask, logits=False)
    ptc = torch.stack([pt - x for x, pt, _ in layers], 1)  # [batch, layer, pos, d_model], exact
    ftc = torch.stack([ft - pt for _, pt, ft in layers], 1)
    ptc_cum, ftc_cum = ptc.abs().sum(-1), ftc.abs().sum(-1)  # per-layer L1 norms
    ptc_tot, ftc_tot = ptc.cumsum(1).abs().sum(-1), ftc.cumsum(1).abs().sum(-1)
    real = batch.attention_mask.bool()[:, None, :].expand_as(ptc_cum)

    dec = pair.decompose(PROMPTS, chat_template=True)
    assert float(ptc_cum[real].max()) > 0.8 * MASSIVE  # the sums really run through |x| ≈ 28000
    for got, exact in ((dec.ptc_norm, ptc_cum), (dec.ftc_norm, ftc_cum), (dec.ptc_cum_norm, ptc_tot),
                       (dec.ftc_cum_norm, ftc_tot)):
        torch.testing.assert_close(got.double()[real], exact[real], rtol=1e-6, atol=1e-6)
    beta = ftc_tot / (ptc_tot + ftc_tot)
    torch.testing.assert_close(dec.beta.double()[real], beta[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(pair.tuco(PROMPTS, chat_template=True).double(), beta[:, -1, -1], rtol=0, atol=1e-6)
    # Sensitivity: the same running sums kept in the model's dtype are far outside that tolerance.
    running, naive = torch.zeros_like(ptc[:, 0], dtype=LOW[dtype]), []
    for layer in range(ptc.shape[1]):
        running = running + ptc[:, layer].to(LOW[dtype])
        naive.append(running.double().abs().sum(-1))
    error = (torch.stack(naive, 1) - ptc_tot).abs() / ptc_tot
    assert float(error[real].max()) > 1e-4


@pytest.mark.parametrize(("dtype", "tolerance"), [("bfloat16", 0.03), ("float16", 0.003)])
def test_low_precision_tuco_stays_close_to_float32(pairs, dtype, tolerance):
    """The remaining difference is the low-precision models' own rounding (bf16: 8 mantissa bits)."""
    reference = pairs["float32"].decompose(PROMPTS, chat_template=True)
    dec = pairs[dtype].decompose(PROMPTS, chat_template=True)
    real = dec.attention_mask.bool()
    torch.testing.assert_close(dec.tuco, reference.tuco, rtol=0, atol=tolerance)
    torch.testing.assert_close(dec.tuco_per_token[real], reference.tuco_per_token[real], rtol=0, atol=tolerance)
    assert float(reference.tuco.min()) > 0.05


def test_float16_overflow_is_refused(checkpoint_pair, tmp_path, backend):
    """70,000 does not fit float16 (largest 65504): an error, not a TuCo of 0 made of infinities."""
    pair = tuco_lens.load_pair(*_planted(checkpoint_pair, tmp_path, 70000.0), backend=backend, dtype="float16")
    with pytest.raises(NonFiniteError, match="layer 2 .*float16.*dtype='bfloat16'"):
        pair.decompose(PROMPTS, chat_template=True)
    with pytest.raises(NonFiniteError, match="layer 2"):
        pair.tuco(PROMPTS, chat_template=True)


def test_views_stay_readable(pairs, checkpoint_pair, backend):
    dec = pairs["float32"].decompose(PROMPTS, chat_template=True)
    # per layer at the scored (massive) token: one layer's norm is hundreds of times the others'
    norms = dec.at_last_token(dec.ptc_norm)[0]
    assert float(norms.max()) > 100 * float(norms.median())
    assert plot_layers(dec).layout.yaxis.type == "log"
    assert plot_layers(dec, cumulative_norms=True).layout.yaxis.type == "log"
    assert plot_layers(dec, log_norms=False).layout.yaxis.type in (None, "linear")
    ordinary = tuco_lens.load_pair(*map(str, checkpoint_pair("llama_chatml")), backend=backend).decompose(PROMPTS)
    assert plot_layers(ordinary).layout.yaxis.type in (None, "linear")
    # per token: β is a ratio on a fixed [0, 1] colour scale, so a massive token cannot wash the
    # others out; its own column is low (the pre-trained block wrote most of the massive value)
    fig = plot_token_heatmap(dec, 0)
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0.0, 1.0)
    z = torch.tensor(fig.data[0].z)  # [layer, real token]; token 0 is the BOS
    torch.testing.assert_close(z, dec.beta[0][:, dec.attention_mask[0].bool()].cpu())
    assert float(z[:, 1:-1].max()) > 2 * float(z[3:, 0].max())
