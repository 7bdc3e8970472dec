"""Inputs that used to be scored silently wrong, or refused with an unhelpful error, on both backends.

Each case ends in one of three outcomes, asserted exactly: a clear ``TuCoError`` (type and
message), a correct result (against an independent computation of the same number), or a
documented warning (:class:`~tuco_lens.errors.TuCoWarning`). The numbers in the comments are
the items of issue 11.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import tuco_lens
from tuco_lens.backends import bridge_from_hf
from tuco_lens.errors import AlphaError, InputError, InputTypeError

# Names added for issue 11 are imported inside the tests, so that each test fails on its own
# assertion (not on an import) against the code before it.

PROMPTS = ["the cat sat on the mat", "a dog", "hello , how are you ?"]


@pytest.fixture(scope="module")
def dirs(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    return str(pt_dir), str(ft_dir)


@pytest.fixture(scope="module")
def pair(dirs, backend):
    return tuco_lens.load_pair(*dirs, backend=backend)


@pytest.fixture
def no_warnings():
    """Any tuco_lens warning not expected by ``pytest.warns`` fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", getattr(tuco_lens.errors, "TuCoWarning", UserWarning))
        yield


# ------------------------------------------------------------------ 5. prompts with no token
@pytest.mark.parametrize("prompt", ["   ", "\n", "\t \n", "\u2028", "\u3000 "])
@pytest.mark.parametrize("chat_template", [False, True])
def test_prompts_with_no_token_are_refused(pair, prompt, chat_template):
    scored = "the chat template around an empty user turn" if chat_template else "the BOS token alone"
    for call in (
        lambda: pair.tuco(prompt, chat_template=chat_template),
        lambda: pair.decompose(["the cat", prompt], chat_template=chat_template),
        lambda: pair.run_with_alpha(prompt, 0.5, chat_template=chat_template),
        lambda: pair.generate(prompt, chat_template=chat_template, max_new_tokens=2),
    ):
        with pytest.raises(InputError, match=f"has no token of its own .* so {scored} would be scored"):
            call()


def test_whitespace_that_is_a_token_is_scored(checkpoint_pair, backend, no_warnings):
    pt_dir, ft_dir = checkpoint_pair("qwen2")  # a byte-level tokenizer: spaces are tokens
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend=backend)
    ids = pair.tokenizer("   ", add_special_tokens=False)["input_ids"]
    assert ids
    batch = pair.tokenize("   ")
    assert batch.tokens[0, -len(ids):].tolist() == ids
    torch.testing.assert_close(pair.tuco("   "), pair.tuco(batch.tokens), rtol=0, atol=0)


def test_steer_refuses_a_prompt_with_no_token(dirs, capsys):
    from tuco_lens.cli import main

    assert main(["steer", "--pt", dirs[0], "--ft", dirs[1], "--prompt", "  ", "--alpha", "1"]) == 2
    assert "has no token of its own" in capsys.readouterr().err


# ------------------------------------------------------------------ 6. padding without a mask
def _ids(pair, name):
    return getattr(pair.tokenizer, f"{name}_token_id")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t, p: torch.cat([t, torch.full((3,), _ids(p, "pad"))])[None], "ends with 3 pad tokens"),
        (lambda t, p: torch.cat([torch.full((2,), _ids(p, "pad")), t])[None], "starts with 2 and ends with 0 pad"),
        (lambda t, p: torch.cat([t, torch.full((2,), _ids(p, "eos"))])[None], "ends with 2 EOS tokens"),
        (lambda t, p: torch.stack([torch.cat([t, torch.full((2,), _ids(p, "eos"))]), torch.cat([t, t[:2]])]),
         "row 0 starts with 0 and ends with 2 EOS"),
        (lambda t, p: torch.stack([torch.cat([torch.full((2,), _ids(p, "eos")), t]), torch.cat([t, t[:2]])]),
         "row 0 starts with 2 and ends with 0 EOS"),
        (lambda t, p: torch.stack([torch.cat([t, torch.full((1,), _ids(p, "pad"))])] * 2), "ends with 1 pad"),
    ],
    ids=["one row right-padded", "one row left-padded", "one row EOS-padded", "EOS right padding",
         "EOS left padding", "equal padding"],
)
def test_unmasked_padding_is_refused(pair, make, message):
    tokens = make(pair.tokenize("the cat sat").tokens[0].cpu(), pair)
    with pytest.raises(InputError, match=f"look padded.*{message}"):
        pair.tuco(tokens)


def test_one_eos_at_the_end_is_text(pair):
    tokens = pair.tokenize("the cat sat").tokens
    ended = torch.cat([tokens, torch.full((1, 1), _ids(pair, "eos"), device=tokens.device)], dim=1)
    torch.testing.assert_close(pair.tuco(ended), pair.tuco(ended, attention_mask=torch.ones_like(ended)), rtol=0, atol=0)


# ------------------------------------------------------------------ 7. a cache and its tokens
def test_decompose_cache_refuses_tokens_that_are_not_the_caches(pair):
    batch = pair.tokenize(PROMPTS)
    _, cache = pair.ft.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=pair.resid_names)
    live = pair.decompose(batch.tokens, attention_mask=batch.attention_mask)
    dec = pair.decompose(cache, tokens=batch.tokens, attention_mask=batch.attention_mask)
    torch.testing.assert_close(dec.tuco, live.tuco, atol=1e-6, rtol=0)
    other = batch.tokens.clone()
    other[1, -1] = pair.tokenizer.convert_tokens_to_ids("fish")
    with pytest.raises(InputError, match="not the tokens the cache was computed on: at row 1, position"):
        pair.decompose(cache, tokens=other, attention_mask=batch.attention_mask)
    shuffled = batch.tokens[[2, 0, 1]]
    with pytest.raises(InputError, match="not the tokens the cache was computed on"):
        pair.decompose(cache, tokens=shuffled, attention_mask=batch.attention_mask[[2, 0, 1]])
    old_style = [n for n in pair.resid_names if n != "hook_embed"]
    _, cache = pair.ft.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=old_style)
    with pytest.raises(InputError, match=r"lacks \['hook_embed'\].*names_filter=pair.resid_names"):
        pair.decompose(cache, tokens=batch.tokens, attention_mask=batch.attention_mask)


# ------------------------------------------------------------------ 8. sampling options
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"do_sample": True, "temperature": -1.0}, InputError, "temperature must be a finite number > 0"),
        ({"do_sample": True, "temperature": 0.0}, InputError, "temperature must be a finite number > 0"),
        ({"do_sample": True, "temperature": float("nan")}, InputError, "temperature must be a finite number > 0"),
        ({"do_sample": True, "temperature": float("inf")}, InputError, "temperature must be a finite number > 0"),
        ({"do_sample": True, "temperature": "hot"}, InputError, "temperature must be a finite number > 0"),
        ({"do_sample": True, "top_p": 2.0}, InputError, r"top_p must be a number in \(0, 1\]"),
        ({"do_sample": True, "top_p": 0.0}, InputError, r"top_p must be a number in \(0, 1\]"),
        ({"do_sample": True, "top_k": 0}, InputError, "top_k must be a positive integer"),
        ({"do_sample": True, "top_k": 2.5}, InputError, "top_k must be a positive integer"),
        ({"do_sample": "yes"}, InputTypeError, "do_sample must be True or False"),
        ({"eos_token_id": "x"}, InputTypeError, "eos_token_id must be a token id"),
        ({"eos_token_id": []}, InputTypeError, "eos_token_id must be a token id"),
        ({"eos_token_id": 10**6}, InputError, r"eos_token_id 1000000 is outside the vocabulary"),
        ({"eos_token_id": [3, -1]}, InputError, r"eos_token_id -1 is outside the vocabulary"),
    ],
)
def test_bad_sampling_options_are_refused(pair, kwargs, error, message):
    with pytest.raises(error, match=message):
        pair.generate("the cat", max_new_tokens=3, **kwargs)


def test_valid_sampling_options_sample_as_before(pair):
    eos = np.int64(_ids(pair, "eos"))
    greedy = pair.generate("the cat", max_new_tokens=4, eos_token_id=eos, return_type="tokens")
    assert torch.equal(greedy, pair.generate("the cat", max_new_tokens=4, eos_token_id=int(eos), return_type="tokens"))
    torch.manual_seed(0)
    a = pair.generate("the cat", max_new_tokens=4, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, return_type="tokens")
    torch.manual_seed(0)
    b = pair.generate("the cat", max_new_tokens=4, do_sample=True, temperature=np.float32(0.7), top_k=np.int64(5),
                      top_p=0.9, return_type="tokens")
    assert torch.equal(a, b)


def test_steer_refuses_a_negative_temperature(dirs, capsys):
    from tuco_lens.cli import main

    code = main(["steer", "--pt", dirs[0], "--ft", dirs[1], "--prompt", "the cat", "--sample", "--temperature", "-1"])
    assert code == 2 and "temperature must be a finite number > 0" in capsys.readouterr().err


# ------------------------------------------------------------------ 10. devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_a_device_this_machine_lacks_is_refused(dirs, backend, device):
    with pytest.raises(InputError, match="is not available on this machine"):
        tuco_lens.load_pair(*dirs, backend=backend, device=device)


@pytest.mark.parametrize(
    "device, error, message",
    [("gpu", InputError, "unknown device 'gpu'"), ("cpu:x", InputError, "unknown device"),
     (3, InputTypeError, "device must be a string or torch.device")],
)
def test_a_device_that_is_no_device_is_refused(dirs, backend, device, error, message):
    with pytest.raises(error, match=message):
        tuco_lens.load_model(dirs[0], backend=backend, device=device)


def test_cuda_index_past_the_device_count_is_refused(dirs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match="has 2 cuda device"):
        tuco_lens.load_model(dirs[0], device="cuda:2")


def test_bridge_weights_go_where_cfg_device_says(dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tuco_lens.load_model(dirs[0], backend="bridge", device="meta")  # a device every machine has
    assert model.cfg.device == "meta"
    assert {p.device.type for p in model.parameters()} == {"meta"}
    hf = AutoModelForCausalLM.from_pretrained(dirs[0])
    bridge = bridge_from_hf(hf, AutoTokenizer.from_pretrained(dirs[0]), name="x", device="meta", dtype=torch.float32)
    assert {p.device.type for p in bridge.parameters()} == {"meta"}


# ------------------------------------------------------------------ 12. doubled BOS
def test_a_doubled_bos_is_warned_about_inside_pair_contexts(pair, no_warnings):
    text = pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith(pair.tokenizer.bos_token)
    doubled = pair.ft.to_tokens(text)  # TransformerLens's rule: a second BOS
    with pytest.warns(UserWarning, match=r"Row\(s\) \[0\] start with two BOS tokens") as caught:
        with pair.scaled(0.5):
            pair.ft.run_with_cache(text)
    assert [w.category.__name__ for w in caught] == ["DoubledBOSWarning"]
    with pytest.warns(UserWarning, match="two BOS tokens"):
        pair.tuco(doubled)
    with pair.scaled(0.5):  # the tokens of pair.tokenize have one BOS: no warning
        pair.ft.run_with_cache(pair.tokenize(text).tokens)
    pair.tuco(text)
    pair.tuco("the cat", chat_template=True)

    from tuco_lens.inputs import doubled_bos_rows

    assert doubled_bos_rows(doubled, pair.tokenizer) == [0]
    left = torch.cat([torch.full((1, 2), _ids(pair, "pad"), device=doubled.device), doubled], dim=1)
    assert doubled_bos_rows(left, pair.tokenizer) == [0]


def test_a_doubled_bos_cannot_be_told_from_padding_when_bos_is_pad(pair):
    from tuco_lens.inputs import doubled_bos_rows

    tokens = pair.ft.to_tokens("<bos> the cat")
    tok = pair.tokenizer
    pad = tok.pad_token
    tok.pad_token = tok.bos_token
    try:
        assert doubled_bos_rows(tokens, tok) == []
    finally:
        tok.pad_token = pad


# ------------------------------------------------------------------ 13. chat template twice
def test_chat_template_on_a_templated_prompt_is_warned_about(pair, no_warnings):
    templated = "<bos><|user|> the cat <|end|> <|assistant|> "  # what the template makes of "the cat"
    assert pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True, tokenize=False
    ) == templated
    with pytest.warns(UserWarning, match="1 of 2 prompts already look chat-formatted .*prompt 1") as caught:
        twice = pair.tuco(["the cat", templated], chat_template=True)
    assert [w.category.__name__ for w in caught] == ["ChatTemplateTwiceWarning"]
    once = pair.tuco(["the cat", templated])
    torch.testing.assert_close(once[1], twice[0], atol=2e-6, rtol=0)  # the right way: no second template
    with pytest.warns(UserWarning, match="already look chat-formatted"):
        pair.tokenize("<|user|> hello <|end|> <|assistant|>", chat_template=True)
    pair.tuco(["the cat", "hello <|end|>"], chat_template=True)  # no warning for plain prompts

    from tuco_lens.inputs import chat_template_frame

    assert chat_template_frame(pair.tokenizer) == ("<bos><|user|> ", " <|end|> <|assistant|> ")


# ------------------------------------------------------------------ 14. valid values, other types
@pytest.mark.parametrize(
    "alpha",
    [np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5), np.array([0.5, 0.5]),
     torch.tensor([0.5, 0.5]), [np.float32(0.5), 0.5], (0.5, np.float16(0.5))],
    ids=["np.float32", "np.float64", "0-d array", "0-d tensor", "array", "tensor", "list of numpy", "tuple"],
)
def test_alpha_as_numpy_or_torch_equals_alpha_as_float(pair, alpha):
    expected = pair.run_with_alpha(PROMPTS[0], 0.5)
    torch.testing.assert_close(pair.run_with_alpha(PROMPTS[0], alpha), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "alpha, message",
    [(np.array([[0.5, 0.5]]), "array of shape"), (np.array([0.5, np.nan]), "alpha must be finite"),
     (np.bool_(True), "got bool"), ([np.float32(0.5)], "one value per layer"), ("0.5", "got str")],
)
def test_bad_alphas_of_other_types_are_refused(pair, alpha, message):
    with pytest.raises(AlphaError, match=message):
        pair.run_with_alpha(PROMPTS[0], alpha)


@pytest.mark.parametrize("as_type", [list, np.array, tuple], ids=["list", "numpy", "tuple"])
def test_a_mask_of_another_type_with_1d_tokens(pair, as_type):
    batch = pair.tokenize(PROMPTS[1])
    tokens = torch.cat([torch.full((2,), _ids(pair, "pad"), device=batch.tokens.device), batch.tokens[0]])
    mask = [0, 0] + [1] * batch.tokens.shape[1]
    expected = pair.tuco(batch.tokens)
    torch.testing.assert_close(pair.tuco(tokens, attention_mask=as_type(mask)), expected, rtol=0, atol=2e-6)
    with pytest.raises(InputTypeError, match="attention_mask must be a tensor"):
        pair.tuco(tokens, attention_mask={"a": 1})


def test_scaled_survives_reset_hooks_and_leaves_other_permanent_hooks(pair):
    """pair.scaled's hooks are permanent TransformerLens hooks: ``reset_hooks()`` inside the
    context keeps α-scaling on, and leaving the context removes only tuco_lens's own hooks."""
    plain = pair.ft(PROMPTS[:1]).detach()
    want = pair.run_with_alpha(PROMPTS[:1], 0.5).detach()
    assert float((want - plain).abs().max()) > 1e-3  # α = 0.5 is not the fine-tuned model
    point = pair.ft.blocks[0].hook_resid_post
    calls = []

    def count(x, hook):
        calls.append(hook.name)
        return x

    point.add_hook(count, is_permanent=True)
    try:
        with pair.scaled(0.5):
            pair.ft.reset_hooks()
            torch.testing.assert_close(pair.ft(PROMPTS[:1]), want, atol=1e-5, rtol=1e-5)
        n = len(calls)
        torch.testing.assert_close(pair.ft(PROMPTS[:1]), plain, atol=1e-6, rtol=1e-6)
        assert len(calls) == n + 1  # the user's permanent hook is still there
    finally:
        pair.ft.reset_hooks(including_permanent=True)
