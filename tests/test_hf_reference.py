"""Self-tests of the Hugging Face reference implementation (``tests/hf_reference.py``).

The reference is the ground truth for the rest of the test suite, so it is checked here against things that
do not go through its own hooks: the models' own forward passes and ``generate``, decoder layers called by
hand, hybrid models built by swapping layers, and padded vs unpadded runs.

Models are tiny random Hugging Face models built in memory from configs (no hub access, no tokenizer):
(pt, ft) pairs where ``ft`` is a deep copy of ``pt`` with Gaussian noise added to the decoder-layer
parameters only, so embeddings, final norm and unembedding are shared.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

pytestmark = pytest.mark.reference  # test tier (tests/conftest.py, TIERS)

try:  # works whether or not tests/ is a package
    from tests.hf_reference import (
        decoder_layers,
        position_ids_from_mask,
        reference_alpha_logits,
        reference_decomposition,
        reference_greedy_generate,
    )
except ImportError:
    from hf_reference import (  # type: ignore[no-redef]
        decoder_layers,
        position_ids_from_mask,
        reference_alpha_logits,
        reference_decomposition,
        reference_greedy_generate,
    )

ARCHS = ["gpt2", "llama", "mistral", "qwen2", "gpt_neox", "gemma"]
VOCAB = 100
PAD = 0


# ---------------------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------------------
def make_config(arch: str, n_layers: int = 2) -> transformers.PretrainedConfig:
    # No bos/eos inside the 100-token vocabulary (so generate never stops early); pad id 0.
    special = dict(bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=n_layers, n_head=4, **special
        )
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        **special,
    )
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "mistral":
        # a sliding window shorter than the test prompts exercises the sliding-window mask
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=4, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "gpt_neox":
        # rotary on a quarter of each head (as in Pythia), parallel residual
        return transformers.GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, **common)
    if arch == "gemma":
        return transformers.GemmaConfig(num_key_value_heads=1, head_dim=8, **common)
    raise ValueError(arch)


def make_pair(arch: str, n_layers: int = 2, seed: int = 0, attn: str = "eager", noise: float = 0.05):
    """(pt, ft): random pt with non-degenerate norms/biases; ft = pt + noise on decoder-layer params only."""
    torch.manual_seed(seed)
    cfg = make_config(arch, n_layers)
    pt = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    with torch.no_grad():
        for p in pt.parameters():
            if p.ndim == 1:  # layer-norm / RMS-norm weights and biases
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    ft = copy.deepcopy(pt).eval()
    with torch.no_grad():
        for p in decoder_layers(ft).parameters():
            p.add_(noise * torch.randn_like(p))
    return pt, ft


def final_norm(model):
    for path in (("model", "norm"), ("transformer", "ln_f"), ("gpt_neox", "final_layer_norm")):
        obj = model
        for attr in path:
            obj = getattr(obj, attr, None)
        if obj is not None:
            return obj
    raise ValueError(type(model).__name__)


def rotary(model):
    for path in (("model", "rotary_emb"), ("gpt_neox", "rotary_emb")):
        obj = model
        for attr in path:
            obj = getattr(obj, attr, None)
        if obj is not None:
            return obj
    return None  # GPT-2: learned absolute positions, no rotary


def additive_causal_mask(model, T: int) -> torch.Tensor:
    """The [1, 1, T, T] additive float mask an eager decoder layer expects, built by hand (no padding).

    Query i may attend to key j iff j <= i, and, with a sliding window w (Mistral), i - w < j.
    """
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = j <= i
    window = getattr(model.config, "sliding_window", None)
    if window is not None:
        allowed &= j > i - window
    mask = torch.zeros(T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask[None, None]


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)  # never the pad id


def pad_batch(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(n - len(p), n) if side == "left" else slice(0, len(p))
        ids[i, sl] = p
        mask[i, sl] = 1
    return ids, mask


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; on a shared, busy CPU, torch's default thread pool
    oversubscribes the cores and these tests become ~40x slower. Restored after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    return request.param, *make_pair(request.param)


# ---------------------------------------------------------------------------------------------------------
# Decomposition
# ---------------------------------------------------------------------------------------------------------
def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_stream_and_components(pair):
    """x_l + PTC_l + FTC_l == x_{l+1}; the stream is the fine-tuned model's own (checked against HF)."""
    arch, pt, ft = pair
    ids = random_ids(2, 7)
    out = reference_decomposition(pt, ft, ids)
    L = len(decoder_layers(ft))
    resid, ptc, ftc = out["resid"], out["ptc"], out["ftc"]
    assert resid.shape == (2, L + 1, 7, 32) and ptc.shape == ftc.shape == (2, L, 7, 32)
    assert resid.dtype == ptc.dtype == torch.float64

    for l in range(L):
        torch.testing.assert_close(resid[:, l] + ptc[:, l] + ftc[:, l], resid[:, l + 1], rtol=0, atol=1e-12)
    # total decomposition x_L = x_0 + sum PTC + sum FTC
    torch.testing.assert_close(resid[:, 0] + ptc.sum(1) + ftc.sum(1), resid[:, -1], rtol=0, atol=1e-11)

    # Against HF's own hidden states: x_0..x_{L-1} are hidden_states[0..L-1]; HF's last entry has the final
    # norm applied, which must equal final_norm(x_L).
    with torch.no_grad():
        hf = ft(input_ids=ids, output_hidden_states=True, use_cache=False)
        for l in range(L):
            torch.testing.assert_close(resid[:, l].float(), hf.hidden_states[l], rtol=0, atol=1e-6)
        normed = final_norm(ft)(resid[:, -1].float())
    torch.testing.assert_close(normed, hf.hidden_states[-1], rtol=1e-5, atol=1e-5)
    # the hooks leave the fine-tuned forward untouched
    torch.testing.assert_close(out["logits"], hf.logits, rtol=0, atol=1e-6)

    # non-degenerate fixture: both components matter
    assert (out["tuco"] > 0.02).all() and (out["tuco"] < 0.98).all(), out["tuco"]


def test_ptc_is_pretrained_layer_on_ft_stream(pair):
    """PTC_l is exactly pt_layer_l(x_l) - x_l with x_l the fine-tuned stream (layers called without hooks)."""
    arch, pt, ft = pair
    ids = random_ids(1, 6, seed=3)
    out = reference_decomposition(pt, ft, ids)
    x = out["resid"].float()
    T = ids.shape[1]
    pos = torch.arange(T)[None]
    kwargs = dict(attention_mask=additive_causal_mask(ft, T), position_ids=pos)
    rot = rotary(ft)
    with torch.no_grad():
        for l, (pt_layer, ft_layer) in enumerate(zip(decoder_layers(pt), decoder_layers(ft))):
            if rot is not None:
                kwargs["position_embeddings"] = rot(x[:, l], pos)
            pt_out = pt_layer(x[:, l], **kwargs)
            ft_out = ft_layer(x[:, l], **kwargs)
            torch.testing.assert_close(out["ptc"][:, l].float(), pt_out - x[:, l], rtol=0, atol=1e-5)
            torch.testing.assert_close(out["ftc"][:, l].float(), ft_out - pt_out, rtol=0, atol=1e-5)


def test_summaries_consistent(pair):
    """tuco == tuco_per_token at the last token; beta[:, -1] == tuco_per_token; norms and sums recomputed."""
    arch, pt, ft = pair
    ids = random_ids(3, 6, seed=5)
    out = reference_decomposition(pt, ft, ids)
    L = len(decoder_layers(ft))
    rows = torch.arange(3)
    assert torch.equal(out["last_index"], torch.full((3,), 5))
    assert out["tuco"].shape == (3,) and out["tuco_per_token"].shape == (3, 6)
    assert out["beta"].shape == out["ptc_norm"].shape == out["ftc_norm"].shape == (3, L, 6)
    assert out["ptc_sum"].shape == out["ftc_sum"].shape == (3, 32)

    torch.testing.assert_close(out["tuco"], out["tuco_per_token"][rows, -1], rtol=0, atol=1e-12)
    assert torch.equal(out["beta"][:, -1], out["tuco_per_token"])
    torch.testing.assert_close(out["ptc_sum"], out["ptc"].sum(1)[:, -1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["ftc_sum"], out["ftc"].sum(1)[:, -1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["ptc_norm"], out["ptc"].abs().sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out["ftc_norm"], out["ftc"].abs().sum(-1), rtol=0, atol=1e-12)

    # TuCo from its definition: L1 norm of the sums over layers (NOT the sum of per-layer norms)
    p1, f1 = out["ptc_sum"].abs().sum(-1), out["ftc_sum"].abs().sum(-1)
    torch.testing.assert_close(out["tuco"], f1 / (p1 + f1), rtol=0, atol=1e-12)
    f_naive = out["ftc_norm"][:, :, -1].sum(1)
    p_naive = out["ptc_norm"][:, :, -1].sum(1)
    assert not torch.allclose(out["tuco"], f_naive / (p_naive + f_naive), atol=1e-6)

    # beta_l over layers 0..l inclusive
    for l in range(L):
        pc = out["ptc"][:, : l + 1].sum(1).abs().sum(-1)
        fc = out["ftc"][:, : l + 1].sum(1).abs().sum(-1)
        torch.testing.assert_close(out["beta"][:, l], fc / (pc + fc), rtol=0, atol=1e-12)
    assert ((out["beta"] >= 0) & (out["beta"] <= 1)).all()


def test_identical_models_give_zero(pair):
    arch, pt, _ = pair
    ids, mask = pad_batch([random_ids(1, 5)[0], random_ids(1, 3, seed=2)[0]], "left")
    for ft in (pt, copy.deepcopy(pt)):  # the very same object (re-entrant hooks) and a copy
        out = reference_decomposition(pt, ft, ids, mask)
        assert torch.equal(out["tuco"], torch.zeros(2, dtype=torch.float64))
        real = mask.bool()
        assert torch.equal(out["tuco_per_token"][real], torch.zeros(int(real.sum()), dtype=torch.float64))
        assert torch.isnan(out["tuco_per_token"][~real]).all()
        assert (out["ftc"] == 0).all() and (out["ftc_sum"] == 0).all()
        assert (out["ptc_sum"].abs().sum(-1) > 0).all()


def test_l2_norm(pair):
    arch, pt, ft = pair
    ids = random_ids(2, 5, seed=7)
    out1 = reference_decomposition(pt, ft, ids, norm="l1")
    out2 = reference_decomposition(pt, ft, ids, norm="l2")
    p2, f2 = out2["ptc_sum"].norm(dim=-1), out2["ftc_sum"].norm(dim=-1)
    torch.testing.assert_close(out2["tuco"], f2 / (p2 + f2), rtol=0, atol=1e-12)
    torch.testing.assert_close(out2["ptc_norm"], out2["ptc"].norm(dim=-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out2["ftc_norm"], out2["ftc"].norm(dim=-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out2["tuco"], out2["tuco_per_token"][:, -1], rtol=0, atol=1e-12)
    # same components, different norm
    torch.testing.assert_close(out1["ftc"], out2["ftc"], rtol=0, atol=0)
    assert not torch.allclose(out1["tuco"], out2["tuco"])
    with pytest.raises(ValueError):
        reference_decomposition(pt, ft, ids, norm="linf")


# ---------------------------------------------------------------------------------------------------------
# alpha scaling
# ---------------------------------------------------------------------------------------------------------
def test_alpha_endpoints(pair):
    arch, pt, ft = pair
    ids = random_ids(2, 6, seed=11)
    L = len(decoder_layers(ft))
    a1 = reference_alpha_logits(pt, ft, ids, alpha=1.0)
    a0 = reference_alpha_logits(pt, ft, ids, alpha=0.0)
    torch.testing.assert_close(a1, hf_logits(ft, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(a0, hf_logits(pt, ids), rtol=0, atol=1e-5)
    assert torch.equal(reference_alpha_logits(pt, ft, ids, alpha=[1.0] * L), a1)
    assert torch.equal(reference_alpha_logits(pt, ft, ids, alpha=[0.0] * L), a0)
    mid = reference_alpha_logits(pt, ft, ids, alpha=0.5)
    assert (mid - a1).abs().max() > 1e-3 and (mid - a0).abs().max() > 1e-3
    with pytest.raises(ValueError):
        reference_alpha_logits(pt, ft, ids, alpha=[1.0] * (L + 1))


def test_alpha_per_layer_equals_hybrid_model(pair):
    """alpha = [1, 0] is the fine-tuned model with its last layer replaced by the pre-trained one."""
    arch, pt, ft = pair
    ids = random_ids(2, 6, seed=13)
    hybrid = copy.deepcopy(ft)
    decoder_layers(hybrid)[1] = copy.deepcopy(decoder_layers(pt)[1])
    torch.testing.assert_close(
        reference_alpha_logits(pt, ft, ids, alpha=[1.0, 0.0]), hf_logits(hybrid, ids), rtol=0, atol=1e-5
    )
    hybrid = copy.deepcopy(pt)
    decoder_layers(hybrid)[1] = copy.deepcopy(decoder_layers(ft)[1])
    torch.testing.assert_close(
        reference_alpha_logits(pt, ft, ids, alpha=[0.0, 1.0]), hf_logits(hybrid, ids), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_hand_computed_one_layer(arch):
    """1-layer model: PTC/FTC, TuCo and alpha-scaled logits computed by calling the modules directly."""
    pt, ft = make_pair(arch, n_layers=1, seed=21)
    ids = random_ids(1, 7, seed=22)  # longer than Mistral's sliding window (4)
    T = ids.shape[1]
    with torch.no_grad():
        x0 = ft(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[0]  # embedding output
        pos = torch.arange(T)[None]
        kwargs = dict(attention_mask=additive_causal_mask(ft, T))
        if rotary(ft) is not None:
            kwargs.update(position_ids=pos, position_embeddings=rotary(pt)(x0, pos))
        pt_out = decoder_layers(pt)[0](x0, **kwargs).double()
        ft_out = decoder_layers(ft)[0](x0, **kwargs).double()
        ptc = pt_out - x0.double()
        ftc = ft_out - pt_out
        p, f = ptc[0, -1].abs().sum(), ftc[0, -1].abs().sum()
        tuco = f / (p + f)
        alpha = 0.3
        x1 = (x0.double() + ptc + alpha * ftc).float()
        logits = ft.get_output_embeddings()(final_norm(ft)(x1))

    out = reference_decomposition(pt, ft, ids)
    torch.testing.assert_close(out["tuco"], tuco[None], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["ptc_sum"], ptc[:, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["ftc_sum"], ftc[:, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(reference_alpha_logits(pt, ft, ids, alpha=alpha), logits, rtol=0, atol=1e-5)
    # extrapolation (alpha > 1) is also a plain linear combination on a 1-layer model
    with torch.no_grad():
        x1 = (x0.double() + ptc + 1.5 * ftc).float()
        logits = ft.get_output_embeddings()(final_norm(ft)(x1))
    torch.testing.assert_close(reference_alpha_logits(pt, ft, ids, alpha=1.5), logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_matches_unpadded(arch, side, attn):
    pt, ft = make_pair(arch, attn=attn)
    prompts = [random_ids(1, 6, seed=31)[0], random_ids(1, 3, seed=32)[0], random_ids(1, 1, seed=33)[0]]
    ids, mask = pad_batch(prompts, side)
    out = reference_decomposition(pt, ft, ids, mask)
    alphas = [0.7, [1.2, 0.4]]
    batch_logits = [reference_alpha_logits(pt, ft, ids, mask, alpha=a) for a in alphas]
    for i, p in enumerate(prompts):
        real = mask[i].bool()
        single = reference_decomposition(pt, ft, p[None])
        torch.testing.assert_close(out["tuco"][i], single["tuco"][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["tuco_per_token"][i, real], single["tuco_per_token"][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["beta"][i][:, real], single["beta"][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["ptc_norm"][i][:, real], single["ptc_norm"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["ftc_norm"][i][:, real], single["ftc_norm"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["resid"][i][:, real], single["resid"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["ptc_sum"][i], single["ptc_sum"][0], rtol=1e-5, atol=1e-5)
        assert torch.isnan(out["tuco_per_token"][i, ~real]).all()
        assert torch.isnan(out["beta"][i][:, ~real]).all()
        assert out["last_index"][i] == (ids.shape[1] - 1 if side == "left" else len(p) - 1)
        for a, logits in zip(alphas, batch_logits):
            single_logits = reference_alpha_logits(pt, ft, p[None], alpha=a)
            torch.testing.assert_close(logits[i, real], single_logits[0], rtol=0, atol=1e-5)
    # alpha=1 with padding is still the fine-tuned model (same position ids)
    with torch.no_grad():
        hf = ft(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    a1 = reference_alpha_logits(pt, ft, ids, mask, alpha=1.0)
    torch.testing.assert_close(a1[mask.bool()], hf.logits[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_float64_models(arch):
    """float64 models (sdpa when padded) agree with the float32 reference; eager + padding + float64 raises."""
    pt, ft = make_pair(arch)
    ids, mask = pad_batch([random_ids(1, 6, seed=51)[0], random_ids(1, 3, seed=52)[0]], "left")
    ref32 = reference_decomposition(pt, ft, ids, mask)
    pt64, ft64 = make_pair(arch, attn="sdpa")
    pt64.double(), ft64.double()
    ref64 = reference_decomposition(pt64, ft64, ids, mask)
    torch.testing.assert_close(ref64["tuco"], ref32["tuco"], rtol=0, atol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(ref64["tuco_per_token"][real], ref32["tuco_per_token"][real], rtol=0, atol=1e-5)
    with torch.no_grad():
        hf64 = ft64(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    a1 = reference_alpha_logits(pt64, ft64, ids, mask, alpha=1.0)
    torch.testing.assert_close(a1[real], hf64.logits[real], rtol=0, atol=1e-12)
    # eager in float64: works without padding (only ~1e-8 accurate: the rotary models' eager attention does its
    # softmax in float32), NaN in HF itself with padding (the reference raises)
    pt.double(), ft.double()
    torch.testing.assert_close(
        reference_decomposition(pt, ft, ids[:1])["tuco"], ref64["tuco"][:1], rtol=0, atol=1e-6
    )
    if arch != "gpt2":  # GPT-2's attention does its softmax in the model dtype and is unaffected
        with pytest.raises(RuntimeError, match="NaN"):
            reference_decomposition(pt, ft, ids, mask)


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------
def hf_greedy(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=PAD
        )


def test_greedy_generate_matches_hf(pair):
    arch, pt, ft = pair
    n = 6
    ids = random_ids(1, 4, seed=41)
    mask = torch.ones_like(ids)
    for alpha, model in ((1.0, ft), (0.0, pt)):
        ours = reference_greedy_generate(pt, ft, ids, alpha=alpha, max_new_tokens=n)
        assert ours.shape == (1, 4 + n)
        assert torch.equal(ours, hf_greedy(model, ids, mask, n)), (alpha, ours)
    # left-padded batch
    ids, mask = pad_batch([random_ids(1, 5, seed=42)[0], random_ids(1, 2, seed=43)[0]], "left")
    for alpha, model in ((1.0, ft), (0.0, pt)):
        ours = reference_greedy_generate(pt, ft, ids, mask, alpha=alpha, max_new_tokens=n)
        assert torch.equal(ours, hf_greedy(model, ids, mask, n)), (alpha, ours)


def test_greedy_generate_alpha_consistent():
    """Each generated token is the argmax of reference_alpha_logits on the sequence so far."""
    pt, ft = make_pair("llama")
    ids = random_ids(1, 3, seed=44)
    out = reference_greedy_generate(pt, ft, ids, alpha=[1.3, 0.6], max_new_tokens=4)
    assert torch.equal(out[:, :3], ids)
    for t in range(3, 7):
        logits = reference_alpha_logits(pt, ft, out[:, :t], alpha=[1.3, 0.6])
        assert out[0, t] == logits[0, -1].argmax()


# ---------------------------------------------------------------------------------------------------------
# Guard rails
# ---------------------------------------------------------------------------------------------------------
def test_errors():
    pt, ft = make_pair("llama")
    ids = random_ids(2, 4)
    right_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left padding"):
        reference_greedy_generate(pt, ft, ids, right_mask, max_new_tokens=1)
    with pytest.raises(ValueError):
        reference_decomposition(pt, ft, ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    pt_sdpa, _ = make_pair("llama", attn="sdpa")
    with pytest.raises(ValueError, match="attn_implementation"):
        reference_decomposition(pt_sdpa, ft, ids)
    ft.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            reference_decomposition(pt, ft, ids)
    finally:
        ft.eval()
    # hooks are removed afterwards, even after an error inside the hooked forward (token id out of vocabulary)
    with pytest.raises(IndexError):
        reference_decomposition(pt, ft, torch.full((1, 3), VOCAB + 5))
    for layer in decoder_layers(ft):
        assert not layer._forward_hooks and not layer._forward_pre_hooks
