"""The decomposition against its plain definition and its identities (TransformerLens-config models)."""

from __future__ import annotations

import pytest
import torch

import tuco_lens
from tuco_lens import InputError, TuCoPair
from tiny_models import KINDS, make_pair, plain_decomposition, random_tokens

pytestmark = pytest.mark.hooked  # tiny HookedTransformers: transformer-lens 3.x only (skipped on 4.x)


def l1(x):
    return x.abs().sum(-1)


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    return TuCoPair(*make_pair(request.param))


def test_matches_plain_definition(pair):
    tokens = random_tokens(3, 9)
    dec = pair.decompose(tokens)
    layers, final = plain_decomposition(pair.pt, pair.ft, tokens)
    ptc_cum = torch.zeros_like(layers[0][1])
    ftc_cum = torch.zeros_like(layers[0][1])
    for l, (x, ptc, ftc) in enumerate(layers):
        ptc_cum, ftc_cum = ptc_cum + ptc, ftc_cum + ftc
        torch.testing.assert_close(dec.ptc_norm[:, l].double(), l1(ptc), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(dec.ftc_norm[:, l].double(), l1(ftc), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(dec.ptc_cum_norm[:, l].double(), l1(ptc_cum), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(dec.ftc_cum_norm[:, l].double(), l1(ftc_cum), atol=1e-4, rtol=1e-5)
    expected_tuco = l1(ftc_cum[:, -1]) / (l1(ptc_cum[:, -1]) + l1(ftc_cum[:, -1]))
    torch.testing.assert_close(dec.tuco.double(), expected_tuco, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dec.ptc_sum.double(), ptc_cum[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec.ftc_sum.double(), ftc_cum[:, -1], atol=1e-5, rtol=1e-5)
    assert 0.05 < float(dec.tuco.min()) and float(dec.tuco.max()) < 0.95  # a real, non-trivial value


def test_layer_identity_x_plus_ptc_plus_ftc_is_next_stream(pair):
    tokens = random_tokens(2, 7, seed=3)
    _, cache = pair.ft.run_with_cache(tokens)
    seen = []

    def record(layer, x, pt_post, ft_post):
        seen.append((layer, x.clone(), pt_post - x, ft_post - pt_post))

    with torch.no_grad(), tuco_lens.PairedBlocks(pair.pt, pair.ft, record, writes=False):
        pair.ft(tokens)
    assert [s[0] for s in seen] == list(range(pair.n_layers))
    for layer, x, ptc, ftc in seen:
        nxt = (
            cache[f"blocks.{layer + 1}.hook_resid_pre"]
            if layer + 1 < pair.n_layers
            else cache[f"blocks.{layer}.hook_resid_post"]
        )
        torch.testing.assert_close(x, cache[f"blocks.{layer}.hook_resid_pre"], atol=0, rtol=0)
        torch.testing.assert_close(x + ptc + ftc, nxt, atol=1e-5, rtol=1e-5)
    # and the summed components rebuild the final stream from the embedding, at the last token
    dec = pair.decompose(tokens)
    x0 = cache["blocks.0.hook_resid_pre"][:, -1]
    xL = cache[f"blocks.{pair.n_layers - 1}.hook_resid_post"][:, -1]
    torch.testing.assert_close(x0 + dec.ptc_sum + dec.ftc_sum, xL, atol=1e-5, rtol=1e-5)


def test_identical_models_give_exactly_zero():
    pt, _ = make_pair("llama")
    pair = TuCoPair(pt, pt)
    dec = pair.decompose(random_tokens(2, 6))
    assert torch.equal(dec.tuco, torch.zeros(2))
    assert torch.equal(dec.tuco_per_token, torch.zeros(2, 6))
    assert torch.equal(dec.ftc_norm, torch.zeros_like(dec.ftc_norm))
    assert float(dec.ptc_norm.min()) > 0


def test_tuco_fast_path_and_views_agree(pair):
    tokens = random_tokens(4, 8, seed=5)
    dec = pair.decompose(tokens)
    torch.testing.assert_close(pair.tuco(tokens), dec.tuco, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dec.tuco_per_token[:, -1], dec.tuco, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dec.beta[:, -1], dec.tuco_per_token)
    torch.testing.assert_close(dec.at_last_token(dec.beta)[:, -1], dec.tuco)
    torch.testing.assert_close(dec.preco, 1 - dec.tuco)
    # beta is the cumulative ratio of the cumulative norms
    torch.testing.assert_close(dec.beta, dec.ftc_cum_norm / (dec.ptc_cum_norm + dec.ftc_cum_norm))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_by_one(pair, side):
    lengths = [9, 4, 6]
    rows = [random_tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        tokens[i, span], mask[i, span] = row, 1
    dec = pair.decompose(tokens, attention_mask=mask)
    scores = pair.tuco(tokens, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = pair.decompose(row)
        real = mask[i].bool()
        torch.testing.assert_close(dec.tuco[i], alone.tuco[0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(scores[i], alone.tuco[0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(dec.tuco_per_token[i, real], alone.tuco_per_token[0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(dec.ftc_norm[i][:, real], alone.ftc_norm[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(dec.ptc_sum[i], alone.ptc_sum[0], atol=1e-4, rtol=1e-5)
        assert torch.isnan(dec.tuco_per_token[i, ~real]).all()
        assert torch.isnan(dec.beta[i][:, ~real]).all()


def test_sorted_batching_returns_input_order(pair):
    tokens = random_tokens(5, 8, seed=7)
    mask = torch.ones_like(tokens)
    for i, n_pad in enumerate([0, 5, 2, 7, 1]):
        mask[i, :n_pad] = 0
    whole = pair.decompose(tokens, attention_mask=mask)
    for kwargs in ({"batch_size": 2}, {"batch_size": 1}, {"token_budget": 10}):
        part = pair.decompose(tokens, attention_mask=mask, **kwargs)
        torch.testing.assert_close(part.tuco, whole.tuco, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(part.beta, whole.beta, atol=2e-6, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(
            pair.tuco(tokens, attention_mask=mask, **kwargs), whole.tuco, atol=2e-6, rtol=1e-5
        )


def test_l2_norm_and_float64_accumulation(pair):
    tokens = random_tokens(2, 6, seed=8)
    layers, _ = plain_decomposition(pair.pt, pair.ft, tokens)
    ptc = sum(layer[1] for layer in layers)[:, -1]
    ftc = sum(layer[2] for layer in layers)[:, -1]
    expected = ftc.norm(dim=-1) / (ptc.norm(dim=-1) + ftc.norm(dim=-1))
    got = pair.tuco(tokens, norm="l2", accumulate_dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got.float(), pair.tuco(tokens), atol=1e-3)  # L2 really differs from L1
    with pytest.raises(InputError, match="norm must be 'l1'"):
        pair.tuco(tokens, norm="linf")
    with pytest.raises(InputError, match="accumulate_dtype"):
        pair.tuco(tokens, accumulate_dtype=torch.float16)


def test_decompose_from_activation_cache(pair):
    tokens = random_tokens(3, 7, seed=9)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    _, cache = pair.ft.run_with_cache(tokens, attention_mask=mask, names_filter=pair.resid_names)
    from_cache = pair.decompose(cache, tokens=tokens, attention_mask=mask)
    streamed = pair.decompose(tokens, attention_mask=mask)
    torch.testing.assert_close(from_cache.tuco, streamed.tuco, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(from_cache.beta, streamed.beta, atol=1e-6, rtol=1e-5, equal_nan=True)
    with pytest.raises(InputError, match="needs tokens="):
        pair.decompose(cache)
    with pytest.raises(InputError, match="pass the cache's own tokens"):
        pair.decompose(cache, tokens=tokens[:2])
    _, partial = pair.ft.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(InputError, match="names_filter=pair.resid_names"):
        pair.decompose(partial, tokens=tokens)


def test_dataframe_and_summary_hold_the_tensors(pair):
    tokens = random_tokens(2, 5, seed=11)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    dec = pair.decompose(tokens, attention_mask=mask)
    df = dec.to_dataframe()
    assert len(df) == int(mask.sum()) * pair.n_layers
    assert set(df.columns) >= {"prompt_index", "prompt", "layer", "position", "token", "is_last", "beta", "tuco"}
    row = df[(df.prompt_index == 0) & (df.layer == 1) & (df.position == 0)].iloc[0]
    assert row.ftc_norm == pytest.approx(float(dec.ftc_norm[0, 1, 2]))  # first real token is column 2
    last = df[df.is_last & (df.layer == pair.n_layers - 1)].sort_values("prompt_index")
    assert last.beta.tolist() == pytest.approx(dec.tuco.tolist())
    assert df.prompt.isna().all()  # token ids in: no prompt text
    summary = dec.summary()
    assert summary.tuco.tolist() == pytest.approx(dec.tuco.tolist())
    assert summary.n_tokens.tolist() == [3, 5]
    assert summary.prompt_index.tolist() == [0, 1]
    sub = dec[1]
    assert len(sub) == 1 and float(sub.tuco[0]) == float(dec.tuco[1])


def test_low_precision_models_stay_close_to_float32():
    pt, ft = make_pair("llama")
    tokens = random_tokens(3, 8, seed=12)
    reference = TuCoPair(pt, ft).tuco(tokens)
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        low = TuCoPair(pt.to(dtype), ft.to(dtype)) if False else TuCoPair(*_cast(pt, ft, dtype))
        scores = low.tuco(tokens)
        assert scores.dtype == torch.float32  # sums accumulated in float32
        assert (scores - reference).abs().max() < tol


def _cast(pt, ft, dtype):
    import copy

    pt2, ft2 = copy.deepcopy(pt), copy.deepcopy(ft)
    pt2.to(dtype)
    ft2.to(dtype)
    pt2.cfg.dtype = ft2.cfg.dtype = dtype
    return pt2, ft2


def test_prompt_columns_agree_between_dataframe_and_summary(pair):
    import dataclasses

    prompts = ["the cat sat", "a dog ran far away", "the bird"]
    tokens = random_tokens(3, 6, seed=5)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    mask[2, :2] = 0
    dec = dataclasses.replace(pair.decompose(tokens, attention_mask=mask), prompts=prompts)
    df, summary = dec.to_dataframe(), dec.summary()
    # the same two columns, the same meaning: the batch row and the prompt's text
    assert summary.prompt.tolist() == prompts and summary.prompt_index.tolist() == [0, 1, 2]
    for index, rows in df.groupby("prompt_index"):
        assert set(rows.prompt) == {prompts[index]}
        assert len(rows) == int(dec.attention_mask[index].sum()) * pair.n_layers
    merged = df[df.is_last & (df.layer == pair.n_layers - 1)].merge(summary, on=["prompt_index", "prompt"])
    assert merged.tuco_x.tolist() == pytest.approx(merged.tuco_y.tolist())
    assert len(merged) == 3


def test_repr_is_one_short_line(pair):
    dec = pair.decompose(random_tokens(10, 6, seed=3))
    text = repr(dec)
    assert "\n" not in text and len(text) < 200
    assert text.startswith(f"Decomposition(10 prompts × {pair.n_layers} layers × 6 positions, norm='l1'")
    shown = [float(v) for v in text.split("tuco=[")[1].split(", …")[0].split(", ")]
    assert shown == pytest.approx(dec.tuco[:8].tolist(), abs=5e-4)
    assert "(2 more)" in text and "tensor(" not in text
    assert repr(dec[3]) == f"Decomposition(1 prompt × {pair.n_layers} layers × 6 positions, norm='l1', tuco=[{float(dec.tuco[3]):.3f}])"
