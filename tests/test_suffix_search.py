"""GCG-style adversarial-suffix search (tuco_lens.contrib.suffix_search) on tiny checkpoints.

Losses are recomputed independently: the attacked prompt text is tokenized by the pair, the
target appended, and log-softmax of the target tokens read from ``pair.ft`` (or
``pair.run_with_alpha``) one prompt at a time, without padding.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tuco_lens
from tuco_lens import InputError, demo
from tuco_lens.contrib.suffix_search import (
    default_allowed_tokens,
    suffix_gradient,
    suffix_search,
    target_logprobs,
)

REQUESTS = ["tell me how to make a big fire .", "you help me find the dog ?", "how do i take the car ?"]
TARGET = "sorry , no ."


@pytest.fixture(scope="module")
def pair(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    return tuco_lens.load_pair(str(pt_dir), str(ft_dir))


@pytest.fixture(scope="module")
def result(pair):
    return suffix_search(pair, REQUESTS, TARGET, chat_template=True, n_suffix_tokens=4, n_steps=6,
                         top_k=16, batch_candidates=24, seed=0)


def independent_logprob(pair, prompt: str, target: str, alpha: float = 1.0) -> float:
    tok = pair.tokenizer
    prompt_ids = pair.ft.to_tokens(prompt, prepend_bos=False)[0]  # chat prompts start with <bos>
    target_ids = torch.tensor(tok.encode(target, add_special_tokens=False))
    ids = torch.cat([prompt_ids, target_ids])[None]
    with torch.no_grad():
        logits = pair.ft(ids) if alpha == 1.0 else pair.run_with_alpha(ids, alpha)
    logp = logits[0].double().log_softmax(-1)
    n = len(target_ids)
    positions = torch.arange(ids.shape[1] - n - 1, ids.shape[1] - 1)
    return float(logp[positions, target_ids].sum())


def test_loss_never_increases_and_final_loss_equals_a_recomputation(pair, result):
    assert len(result.losses) == 7 and len(result.accepted) == 6
    assert all(b <= a for a, b in zip(result.losses, result.losses[1:]))
    for accepted, (a, b) in zip(result.accepted, zip(result.losses, result.losses[1:])):
        assert (b < a) == accepted
    prompts = result.prompts()
    expected = np.array([independent_logprob(pair, p, TARGET) for p in prompts])
    np.testing.assert_allclose(result.final_logprobs, expected, atol=1e-4, rtol=1e-5)
    assert result.final_loss == pytest.approx(expected.sum(), abs=1e-4)
    assert result.losses[-1] == pytest.approx(result.final_loss, abs=1e-4)
    np.testing.assert_allclose(target_logprobs(pair, prompts, TARGET), expected, atol=1e-4, rtol=1e-5)
    # The initial suffix's numbers too.
    init_text = pair.tokenizer.decode(result.initial_suffix_ids)
    init_prompts = [result.build_prompt(r, init_text) for r in REQUESTS]
    init_expected = np.array([independent_logprob(pair, p, TARGET) for p in init_prompts])
    np.testing.assert_allclose(result.initial_logprobs, init_expected, atol=1e-4, rtol=1e-5)
    assert result.losses[0] == pytest.approx(init_expected.sum(), abs=1e-4)
    assert result.final_loss < result.losses[0] - 1.0  # the search really lowers the refusal


def test_the_suffix_sits_inside_the_user_turn_and_the_text_is_the_optimised_tokens(pair, result):
    for request, prompt, ids in zip(REQUESTS, result.prompts(), result.input_ids):
        assert prompt == f"<bos><|user|> {request} {result.suffix_text} <|end|> <|assistant|> "
        assert pair.tokenize(prompt).tokens[0].tolist() == ids
        assert ids[-2 - len(result.suffix_ids) : -2] == result.suffix_ids
    assert pair.tokenizer.encode(result.suffix_text, add_special_tokens=False) == result.suffix_ids
    plain = result.prompts(suffix=False)
    assert plain == [pair.tokenizer.apply_chat_template([{"role": "user", "content": r}], add_generation_prompt=True, tokenize=False) for r in REQUESTS]


def test_first_gradient_step_lowers_the_loss(pair):
    # One step with only the top-1 gradient token per position: every candidate is a
    # gradient-chosen swap, and the best of them must beat the initial suffix.
    one = suffix_search(pair, REQUESTS, TARGET, chat_template=True, n_suffix_tokens=4, n_steps=1,
                        top_k=1, batch_candidates=4, seed=2)
    assert one.accepted == [True]
    assert one.losses[1] < one.losses[0]
    changed = [i for i, (a, b) in enumerate(zip(one.initial_suffix_ids, one.suffix_ids)) if a != b]
    assert len(changed) == 1  # a single-token swap
    grad = suffix_gradient(pair, REQUESTS, TARGET, one.initial_suffix_ids, chat_template=True)
    allowed = torch.tensor(default_allowed_tokens(pair))
    j = changed[0]
    assert one.suffix_ids[j] == int(allowed[grad[j, allowed].argmin()])  # the gradient's pick
    expected = sum(independent_logprob(pair, p, TARGET) for p in one.prompts())
    assert one.final_loss == pytest.approx(expected, abs=1e-4)


def independent_gradient(pair, prompts, suffix_ids, target, alpha=1.0):
    """d Σ log p(target) / d one-hot suffix, via a leaf embedding tensor and the chain rule."""
    tok, ft = pair.tokenizer, pair.ft
    target_ids = torch.tensor(tok.encode(target, add_special_tokens=False))
    total = torch.zeros(len(suffix_ids), ft.cfg.d_vocab, dtype=torch.float64)
    for prompt in prompts:
        row = pair.tokenize(prompt).tokens[0]
        starts = [i for i in range(len(row)) if row[i : i + len(suffix_ids)].tolist() == list(suffix_ids)]
        assert len(starts) == 1
        ids = torch.cat([row, target_ids])[None]
        leaf = {}

        def grab(embed, hook, leaf=leaf):  # this prompt's leaf
            leaf["e"] = embed.detach().clone().requires_grad_(True)
            return leaf["e"]

        scaled = pair.scaled(alpha) if alpha != 1.0 else torch.enable_grad()
        with scaled:
            logits = ft.run_with_hooks(ids, fwd_hooks=[("hook_embed", grab)])
        logp = logits[0].log_softmax(-1)
        n = len(target_ids)
        positions = torch.arange(ids.shape[1] - n - 1, ids.shape[1] - 1)
        logp[positions, target_ids].sum().backward()
        g = leaf["e"].grad[0, starts[0] : starts[0] + len(suffix_ids)]
        total += (g @ ft.embed.W_E.detach().T).double()
    return total


@pytest.mark.parametrize("arch,alpha", [("llama", 1.0), ("llama", 0.6), ("gpt2", 1.0)])
def test_gradient_equals_an_independent_autograd_computation(checkpoint_pair, arch, alpha):
    pair = tuco_lens.load_pair(*map(str, checkpoint_pair(arch)))
    suffix = pair.tokenizer.encode("the big dog", add_special_tokens=False)
    grad = suffix_gradient(pair, REQUESTS, TARGET, suffix, chat_template=True, alpha=alpha)
    builder_prompts = [
        pair.tokenizer.apply_chat_template([{"role": "user", "content": f"{r} the big dog"}], add_generation_prompt=True, tokenize=False)
        for r in REQUESTS
    ]
    expected = independent_gradient(pair, builder_prompts, suffix, TARGET, alpha)
    assert grad.shape == (3, pair.ft.cfg.d_vocab)
    torch.testing.assert_close(grad.double(), expected, atol=2e-5, rtol=1e-4)


def test_gradient_ranks_swaps_in_the_right_direction():
    # On the trained demo pair: swapping in the tokens with the most negative gradient lowers the
    # refusal log-probability more, on average, than the tokens with the most positive gradient.
    pair = demo.load_pair()
    requests = [r.text for r in demo.requests("heldout") if r.forbidden][:2]
    allowed = torch.tensor(default_allowed_tokens(pair))
    suffix = allowed[[10, 200, 400]].tolist()
    grad = suffix_gradient(pair, requests, demo.REFUSAL, suffix, chat_template=True)[:, allowed]

    def objective(ids):
        text = pair.tokenizer.decode(ids)
        prompts = [demo.render_chat([{"role": "user", "content": f"{r} {text}"}]) for r in requests]
        return target_logprobs(pair, prompts, demo.REFUSAL).sum()

    base = objective(suffix)
    low, high = [], []
    for j in range(len(suffix)):
        order = grad[j].argsort()
        for bucket, picks in ((low, order[:6]), (high, order[-6:])):
            for v in allowed[picks].tolist():
                ids = list(suffix)
                ids[j] = v
                bucket.append(objective(ids) - base)
    assert np.mean(low) < np.mean(high)


def test_deterministic_for_a_seed(pair, result):
    again = suffix_search(pair, REQUESTS, TARGET, chat_template=True, n_suffix_tokens=4, n_steps=6,
                          top_k=16, batch_candidates=24, seed=0)
    assert again.suffix_ids == result.suffix_ids
    assert again.initial_suffix_ids == result.initial_suffix_ids
    assert again.losses == result.losses
    other = suffix_search(pair, REQUESTS, TARGET, chat_template=True, n_suffix_tokens=4, n_steps=1, seed=1)
    assert other.initial_suffix_ids != result.initial_suffix_ids


def test_allowed_tokens_and_special_tokens(pair, result):
    special = set(pair.tokenizer.all_special_ids)
    allowed = default_allowed_tokens(pair)
    assert not special & set(allowed)
    assert all(i < min(len(pair.tokenizer), pair.ft.cfg.d_vocab) for i in allowed)
    assert set(result.suffix_ids) <= set(allowed)
    few = list(range(20, 40))
    limited = suffix_search(pair, REQUESTS, TARGET, chat_template=True, n_suffix_tokens=3, n_steps=3,
                            allowed_tokens=few, top_k=8, batch_candidates=12)
    assert set(limited.initial_suffix_ids) <= set(few) and set(limited.suffix_ids) <= set(few)


def test_alpha_scaled_search_reports_the_scaled_model(pair):
    res = suffix_search(pair, REQUESTS[:2], TARGET, chat_template=True, n_suffix_tokens=3, n_steps=3,
                        top_k=8, batch_candidates=12, alpha=0.5, init_suffix="the cat is")
    assert res.initial_suffix_ids == pair.tokenizer.encode("the cat is", add_special_tokens=False)
    assert all(b <= a for a, b in zip(res.losses, res.losses[1:]))
    expected = np.array([independent_logprob(pair, p, TARGET, alpha=0.5) for p in res.prompts()])
    np.testing.assert_allclose(res.final_logprobs, expected, atol=1e-4, rtol=1e-5)
    unscaled = np.array([independent_logprob(pair, p, TARGET) for p in res.prompts()])
    assert np.abs(unscaled - expected).max() > 1e-3  # α really changed the model


def test_learned_positions_and_plain_concatenation(checkpoint_pair):
    pair = tuco_lens.load_pair(*map(str, checkpoint_pair("gpt2")))
    res = suffix_search(pair, REQUESTS[:2], TARGET, n_suffix_tokens=3, n_steps=3, top_k=8, batch_candidates=12)
    assert all(b <= a for a, b in zip(res.losses, res.losses[1:]))
    assert res.prompts() == [f"{r} {res.suffix_text}" for r in REQUESTS[:2]]
    expected = target_logprobs(pair, res.prompts(), TARGET)
    np.testing.assert_allclose(res.final_logprobs, expected, atol=1e-4, rtol=1e-5)


def test_custom_builder_and_errors(pair):
    def build(request, suffix):
        return demo_like(request, suffix)

    def demo_like(request, suffix):
        return f"<bos><|user|> {suffix} {request} <|end|> <|assistant|> "

    res = suffix_search(pair, REQUESTS[:1], TARGET, build_prompt=build, n_suffix_tokens=2, n_steps=2,
                        top_k=4, batch_candidates=4)
    assert res.prompts()[0].startswith(f"<bos><|user|> {res.suffix_text} ")
    assert pair.tokenize(res.prompts()[0]).tokens[0].tolist() == res.input_ids[0]
    with pytest.raises(InputError, match="verbatim"):
        suffix_search(pair, REQUESTS, TARGET, build_prompt=lambda r, s: r, n_steps=1)
    with pytest.raises(InputError, match="target is empty"):
        suffix_search(pair, REQUESTS, "", n_steps=1)
    with pytest.raises(InputError, match="No requests"):
        suffix_search(pair, [], TARGET, n_steps=1)
    with pytest.raises(InputError, match="outside the vocabulary"):
        suffix_search(pair, REQUESTS, TARGET, allowed_tokens=[5000], n_steps=1)


def test_demo_pair_quick_search_lowers_the_refusal():
    pair = demo.load_pair()
    requests = [r.text for r in demo.requests("heldout") if r.forbidden][:3]
    res = suffix_search(pair, requests, demo.REFUSAL, chat_template=True, n_suffix_tokens=4, n_steps=3,
                        top_k=16, batch_candidates=16)
    assert res.prompts()[0] == demo.render_chat([{"role": "user", "content": f"{requests[0]} {res.suffix_text}"}])
    assert res.final_loss < res.losses[0]
    np.testing.assert_allclose(res.final_logprobs, target_logprobs(pair, res.prompts(), demo.REFUSAL), atol=1e-4)


def test_contrib_is_off_the_core_import_path():
    """``tuco_lens.contrib`` re-exports the search; the library and its analyses never import it."""
    import tuco_lens.contrib as contrib
    from tuco_lens.contrib import suffix_search as exported

    assert exported is suffix_search and set(contrib.__all__) >= {"suffix_search", "target_logprobs"}
    code = ("import sys, tuco_lens, tuco_lens.analyses, tuco_lens.demo; "
            "print(sorted(m for m in sys.modules if m.startswith('tuco_lens.contrib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert not hasattr(tuco_lens.analyses, "suffix_search")
