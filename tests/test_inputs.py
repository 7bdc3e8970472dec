"""Input handling: tokenization, padding, chat template, and every input error with its message."""

from __future__ import annotations

import pytest
import torch

import tuco_lens
from tuco_lens import InputError, InputTypeError
from tuco_lens.inputs import TokenBatch, last_real_index, length_sorted_batches


@pytest.fixture(scope="module")
def pair(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    return tuco_lens.load_pair(str(pt_dir), str(ft_dir))


def test_strings_are_tokenized_like_to_tokens_and_left_padded(pair):
    batch = pair.tokenize(["the cat", "a dog and a bird"])
    short = pair.ft.to_tokens("the cat")[0]
    long = pair.ft.to_tokens("a dog and a bird")[0]
    assert batch.tokens[0, -len(short):].tolist() == short.tolist()
    assert batch.tokens[1].tolist() == long.tolist()
    assert batch.attention_mask.tolist() == [[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)]
    assert batch.last_index.tolist() == [len(long) - 1] * 2
    right = pair.tokenize(["the cat", "a dog and a bird"], padding_side="right")
    assert right.tokens[0, : len(short)].tolist() == short.tolist()
    assert right.last_index.tolist() == [len(short) - 1, len(long) - 1]
    assert batch.prompts == ["the cat", "a dog and a bird"]


def test_chat_template_wraps_prompt_with_generation_prompt(pair):
    batch = pair.tokenize("the cat", chat_template=True)
    text = pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True, tokenize=False
    )
    expected = pair.tokenizer(text, add_special_tokens=False).input_ids
    assert batch.tokens[0].tolist() == expected
    assert expected.count(pair.tokenizer.bos_token_id) == 1  # no doubled BOS
    # TuCo is measured at the template's last token (the start of the assistant turn)
    assert pair.tokenizer.convert_ids_to_tokens(expected[-1]) == pair.tokenizer.convert_ids_to_tokens(
        pair.tokenizer("<|assistant|>", add_special_tokens=False).input_ids[-1]
    )


def test_preformatted_prompt_gets_no_second_bos(pair):
    text = pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith(pair.tokenizer.bos_token)
    assert pair.tokenize(text).tokens.tolist() == pair.tokenize("the cat", chat_template=True).tokens.tolist()
    forced = pair.tokenize(text, prepend_bos=True).tokens[0].tolist()
    assert forced[:2] == [pair.tokenizer.bos_token_id] * 2  # an explicit choice is respected
    plain = pair.tokenize("the cat").tokens[0].tolist()
    assert plain[0] == pair.tokenizer.bos_token_id and plain.count(pair.tokenizer.bos_token_id) == 1


def test_string_and_token_inputs_give_the_same_tuco(pair):
    prompts = ["the cat sat", "a dog"]
    batch = pair.tokenize(prompts)
    from_strings = pair.tuco(prompts)
    from_tokens = pair.tuco(batch.tokens, attention_mask=batch.attention_mask)
    assert torch.equal(from_strings, from_tokens)
    single = pair.tuco("a dog")
    torch.testing.assert_close(single[0], from_strings[1], atol=2e-6, rtol=1e-5)


def test_last_real_index_and_length_sorted_batches():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_real_index(mask).tolist() == [3, 2, 3, 1]
    batch = TokenBatch(torch.arange(16).reshape(4, 4), mask)
    chunks = list(length_sorted_batches(batch, batch_size=2))
    assert [rows.tolist() for rows, _, _ in chunks] == [[2, 1], [0, 3]]  # longest first, stable
    rows, cols, sub = chunks[1]
    assert cols.tolist() == [1, 2, 3]  # column 0 is padding in both rows and is dropped
    assert sub.tokens.tolist() == [[1, 2, 3], [13, 14, 15]]
    seen = torch.cat([rows for rows, _, _ in length_sorted_batches(batch, token_budget=8)])
    assert sorted(seen.tolist()) == [0, 1, 2, 3]
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        list(length_sorted_batches(batch, batch_size=0))


@pytest.mark.parametrize(
    "inputs, kwargs, error, message",
    [
        ([], {}, InputError, "input list is empty"),
        ("", {}, InputError, "Prompt 0 is an empty string"),
        (["ok", ""], {}, InputError, "Prompt 1 is an empty string"),
        (["ok", 3], {}, InputTypeError, "Prompt 1 is a int, not a str"),
        (42, {}, InputTypeError, "Expected a prompt"),
        (torch.tensor([[1.0, 2.0]]), {}, InputTypeError, "integer tensor, got dtype torch.float32"),
        (torch.tensor([[True, False]]), {}, InputTypeError, "integer tensor"),
        (torch.tensor([[1, 2, 100000]]), {}, InputError, "Token id 100000 is outside the vocabulary"),
        (torch.tensor([[1, -1, 2]]), {}, InputError, "Token id -1 is outside the vocabulary"),
        (torch.zeros(0, 3, dtype=torch.long), {}, InputError, "Token tensor is empty"),
        (torch.zeros(2, 2, 2, dtype=torch.long), {}, InputError, r"shape \[batch, pos\]"),
        (torch.tensor([[1, 2, 3]]), {"attention_mask": torch.ones(1, 2)}, InputError, "attention_mask has shape"),
        (torch.tensor([[1, 2, 3]]), {"attention_mask": torch.tensor([[1, 2, 1]])}, InputError, "only 0 and 1"),
        (torch.tensor([[1, 2], [3, 4]]), {"attention_mask": torch.tensor([[1, 1], [0, 0]])}, InputError, r"Row\(s\) \[1\]"),
        (torch.tensor([[1, 2]]), {"chat_template": True}, InputError, "needs prompts as strings"),
        ("the cat", {"attention_mask": torch.ones(1, 2)}, InputError, "attention_mask is only for token tensors"),
        ("the cat", {"padding_side": "middle"}, InputError, "padding_side must be"),
        ("the cat " * 200, {}, InputError, "more than the model's context"),
    ],
)
def test_bad_inputs_raise_clear_errors(pair, inputs, kwargs, error, message):
    with pytest.raises(error, match=message):
        pair.tuco(inputs, **kwargs)


def test_unmasked_padding_is_refused(pair):
    padded = pair.ft.to_tokens(["the cat", "a dog and a bird went"], padding_side="right")
    with pytest.raises(InputError, match="look padded"):
        pair.tuco(padded)
    left = pair.ft.to_tokens(["the cat", "a dog and a bird went"], padding_side="left")
    with pytest.raises(InputError, match="look padded"):
        pair.decompose(left)
    # with the mask it is fine, and equals the strings
    mask = (left != pair.tokenizer.pad_token_id).long()
    torch.testing.assert_close(pair.tuco(left, attention_mask=mask), pair.tuco(["the cat", "a dog and a bird went"]))


def test_missing_chat_template_and_tokenizer(pair):
    template = pair.tokenizer.chat_template
    pair.tokenizer.chat_template = None
    try:
        with pytest.raises(InputError, match="has no chat template"):
            pair.tuco("the cat", chat_template=True)
    finally:
        pair.tokenizer.chat_template = template


def test_generation_inputs_are_checked(pair):
    with pytest.raises(InputError, match="max_new_tokens must be a non-negative integer"):
        pair.generate("the cat", max_new_tokens=-1)
    with pytest.raises(InputError, match="exceeds the model's context"):
        pair.generate("the cat", max_new_tokens=10**6)
    with pytest.raises(InputError, match="return_type must be"):
        pair.generate("the cat", return_type="logits")
    text = pair.generate("the cat", max_new_tokens=3)
    assert isinstance(text, str)
    assert isinstance(pair.generate(["the cat", "a dog"], max_new_tokens=3), list)


def test_generate_returns_the_input_type_as_transformer_lens_does(pair):
    """``return_type="input"`` (the default): text in, continuation text out; token ids in, prompt
    plus new token ids out (a 1-D tensor gives a 1-D tensor), equal to ``return_type="tokens"``."""
    prompts = ["the cat", "a dog eats"]
    batch = pair.tokenize(prompts)
    tokens = pair.generate(batch.tokens, attention_mask=batch.attention_mask, max_new_tokens=3)
    as_tokens = pair.generate(prompts, max_new_tokens=3, return_type="tokens")
    assert isinstance(tokens, torch.Tensor) and torch.equal(tokens, as_tokens)
    assert tokens.shape == (2, batch.tokens.shape[1] + 3)
    texts = pair.generate(batch.tokens, attention_mask=batch.attention_mask, max_new_tokens=3, return_type="str")
    assert texts == pair.generate(prompts, max_new_tokens=3)
    one = pair.tokenize("the cat").tokens[0]
    single = pair.generate(one, max_new_tokens=3)
    assert single.ndim == 1 and torch.equal(single, pair.generate("the cat", max_new_tokens=3, return_type="tokens")[0])
    assert pair.generate(one, max_new_tokens=3, return_type="tokens").shape == (1, single.shape[0])
    assert pair.generate(one, max_new_tokens=3, return_type="str") == pair.generate("the cat", max_new_tokens=3)


# ------------------------------------------------------------------------------ run_batched
RAGGED = ["the cat", "a dog and a bird and a fish", "the sun", "hello there , how are you ?", "a bird"]
SPLITS = [(None, None), (1, None), (2, None), (4, None), (None, 1), (None, 12), (3, 20)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size, token_budget", SPLITS)
def test_run_batched_equals_the_unbatched_computation(pair, padding_side, batch_size, token_budget):
    from tuco_lens.inputs import run_batched

    batch = pair.tokenize(RAGGED, padding_side=padding_side)
    real = batch.attention_mask.bool()
    everything = torch.arange(len(batch))

    def running_sum(sub, rows):  # exact: integer sums of the real tokens so far, per position
        return (sub.tokens * sub.attention_mask).cumsum(-1)

    exact = run_batched(batch, running_sum, batch_size, token_budget, per_position=True, fill=-1)
    assert torch.equal(exact[real], running_sum(batch, everything)[real])
    assert run_batched(batch, lambda sub, rows: sub.n_tokens, batch_size, token_budget).tolist() == batch.n_tokens.tolist()
    assert run_batched(batch, lambda sub, rows: list(sub.prompts), batch_size, token_budget) == RAGGED
    assert run_batched(batch, lambda sub, rows: rows.tolist(), batch_size, token_budget) == list(range(len(RAGGED)))

    def logits(sub, rows):
        with torch.no_grad():
            return pair.backend.forward(sub.tokens, sub.attention_mask)

    def last_logits(sub, rows):
        return logits(sub, rows)[torch.arange(len(sub)), sub.last_index]

    whole = logits(batch, everything)
    per_position = run_batched(batch, logits, batch_size, token_budget, per_position=True, fill=float("nan"))
    assert per_position.shape == whole.shape
    torch.testing.assert_close(per_position[real], whole[real], atol=2e-5, rtol=1e-5)
    per_row = run_batched(batch, last_logits, batch_size, token_budget)
    torch.testing.assert_close(per_row, last_logits(batch, everything), atol=2e-5, rtol=1e-5)
    if batch_size is None and token_budget is None:  # one call on the whole batch: the very same numbers
        assert torch.equal(per_position, whole)


def test_run_batched_in_input_order_and_dropped_columns():
    from tuco_lens.inputs import run_batched

    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0]])
    batch = TokenBatch(torch.arange(20).reshape(5, 4), mask)
    calls = []

    def record(sub, rows):
        calls.append(rows.tolist())
        return sub.tokens

    tokens = run_batched(batch, record, 2, sort_by_length=False, per_position=True, fill=-1)
    assert calls == [[0, 1], [2, 3], [4]]
    assert tokens.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [-1, -1, 18, -1]]
    calls.clear()
    run_batched(batch, record, 2, per_position=True)
    assert calls == [[2, 1], [0, 3], [4]]  # longest first (stable), as length_sorted_batches


@pytest.mark.parametrize(
    "fn, kwargs, error, message",
    [
        (lambda sub, rows: sub.n_tokens, {"batch_size": 0}, InputError, "batch_size must be a positive integer"),
        (lambda sub, rows: sub.n_tokens, {"token_budget": 0}, InputError, "token_budget must be a positive integer"),
        (lambda sub, rows: sub.n_tokens, {"batch_size": 0, "sort_by_length": False}, InputError, "batch_size must be"),
        (lambda sub, rows: sub.n_tokens, {"token_budget": 8, "sort_by_length": False}, InputError, "sort_by_length=True"),
        (lambda sub, rows: sub.n_tokens[:1], {"batch_size": 2}, InputError, r"shape \(1,\) for a sub-batch"),
        (lambda sub, rows: sub.tokens, {"batch_size": 2}, InputError, "per_position=True"),
        (lambda sub, rows: sub.n_tokens, {"per_position": True}, InputError, r"\[rows, sub_pos, \.\.\.\]"),
        (lambda sub, rows: ["x"], {"batch_size": 2}, InputError, "1 results for a sub-batch of 2 rows"),
        (lambda sub, rows: ["x"] * len(sub), {"per_position": True}, InputError, "not a list"),
        (lambda sub, rows: {"x": 1}, {}, InputTypeError, "tensor .* or a list"),
        (lambda sub, rows: sub.n_tokens if len(sub) == 2 else ["x"], {"batch_size": 2}, InputError, "same kind"),
    ],
)
def test_run_batched_errors(fn, kwargs, error, message):
    from tuco_lens.inputs import run_batched

    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    batch = TokenBatch(torch.arange(9).reshape(3, 3), mask)
    with pytest.raises(error, match=message):
        run_batched(batch, fn, **kwargs)


def test_every_verb_takes_the_same_tokenization_options_and_refuses_others(pair):
    """One input spec: each verb tokenizes exactly as ``pair.tokenize`` with the same options, and an
    unknown keyword is refused by tuco_lens, naming the verb and the options it takes."""
    prompts = ["the cat", "a dog eats"]
    options = {"prepend_bos": False, "padding_side": "right"}
    batch = pair.tokenize(prompts, **options)
    from_tokens = pair.tuco(batch.tokens, attention_mask=batch.attention_mask)
    assert torch.allclose(pair.tuco(prompts, **options), from_tokens, atol=1e-6)
    assert torch.allclose(pair.decompose(prompts, **options).tuco, from_tokens, atol=1e-6)
    logits = pair.run_with_alpha(prompts, 0.5, **options)
    assert torch.allclose(logits, pair.run_with_alpha(batch.tokens, 0.5, attention_mask=batch.attention_mask))
    for verb, call in {
        "tokenize": lambda: pair.tokenize(prompts, chat_templat=True),
        "tuco": lambda: pair.tuco(prompts, chat_templat=True),
        "decompose": lambda: pair.decompose(prompts, prepend=True),
        "run_with_alpha": lambda: pair.run_with_alpha(prompts, 0.5, mask=None),
        "generate": lambda: pair.generate(prompts, max_new_tokens=2, padding=True),
        "compare_outputs": lambda: pair.compare_outputs(prompts, chat=True),
    }.items():
        with pytest.raises(InputTypeError, match=rf"TuCoPair\.{verb}\(\) got an unexpected keyword argument .*attention_mask, chat_template, prepend_bos, padding_side"):
            call()


def test_sample_is_seeded_generation_of_the_repeated_prompts(pair):
    """``pair.sample`` equals ``generate`` on each prompt repeated ``n_samples`` times after
    ``torch.manual_seed(seed)``, leaves the caller's RNG state as it was, and is greedy ``generate``
    with ``do_sample=False``."""
    prompts = ["the cat", "a dog eats"]
    state = torch.get_rng_state()
    samples = pair.sample(prompts, 3, seed=5, max_new_tokens=4, temperature=0.8)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        flat = pair.generate([p for p in prompts for _ in range(3)], max_new_tokens=4, do_sample=True, temperature=0.8)
    assert samples == [flat[:3], flat[3:]]
    assert samples == pair.sample(prompts, 3, seed=5, max_new_tokens=4, temperature=0.8)
    greedy = pair.sample(prompts, 2, do_sample=False, max_new_tokens=4, batch_size=1)
    assert greedy == [[text, text] for text in pair.generate(prompts, max_new_tokens=4)]
    with pytest.raises(InputTypeError, match=r"TuCoPair\.sample\(\) got an unexpected keyword"):
        pair.sample(prompts, chat=True)
