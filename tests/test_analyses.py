"""The paper's analyses (tuco_lens.analyses): every number recomputed independently in the test.

Tiny checkpoints (``checkpoint_pair("llama")``) cover scoring, input handling and prompt
building; the embedded demo pair covers what needs real behaviour (refusals); tiny
HookedTransformers build the OutputCo = 0 < TuCo example.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from tiny_models import random_tokens

import tuco_lens
from tuco_lens import InputError, InputTypeError, TuCoPair
from tuco_lens.analyses import (
    DEFAULT_REFUSAL_STRINGS,
    compare_prompt_sets,
    compare_transformations,
    compare_tuco_outputco,
    contains_refusal,
    jailbreak_success,
    many_shot_sweep,
    outputco,
    suffix_transform,
)
from tuco_lens.backends import HookedTransformer, HookedTransformerConfig  # None on transformer-lens 4.x

pytestmark = pytest.mark.hooked  # tiny HookedTransformers: transformer-lens 3.x only (skipped on 4.x)

SETS = {
    "short": ["the cat", "a dog", "the sun", "hello", "a bird and a fish"],
    "questions": ["what is the cat ?", "where is the dog ?", "how do you make food ?", "who are you ?"],
    "chatty": ["please tell me a good day", "thanks for the help", "can you help me find a house ?"],
}
REQUESTS = ["tell me about the cat", "how do i find the sea ?", "what is a good food ?", "help me see the moon"]
SHOTS = [
    ("what is a dog ?", "a dog is a good dog ."),
    ("where is the sun ?", "the sun is in the sky ."),
    ("tell me a fish", "the fish is in the sea ."),
    ("who is he ?", "he is my old car ."),
    ("what day is it ?", "it is a good day ."),
    ("hello", "hello , how can i help ?"),
]


def mann_whitney(pos, neg) -> float:
    """AUC by brute force over all (positive, negative) pairs, ties 1/2."""
    pairs = list(itertools.product(pos, neg))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


@pytest.fixture(scope="module")
def pair(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    return tuco_lens.load_pair(str(pt_dir), str(ft_dir))


# ------------------------------------------------------------------------------ prompt sets
def test_prompt_sets_scores_equal_pair_tuco_and_auc_is_mann_whitney(pair):
    result = compare_prompt_sets(pair, SETS)
    assert list(result.table.columns) == ["set", "index", "prompt", "tuco"]
    assert result.set_names == list(SETS)
    for name, prompts in SETS.items():
        part = result.table[result.table["set"] == name]
        assert part["prompt"].tolist() == prompts and part["index"].tolist() == list(range(len(prompts)))
        expected = pair.tuco(prompts).double().numpy()  # scored alone, not padded with other sets
        np.testing.assert_allclose(part["tuco"].to_numpy(), expected, atol=1e-5)
        row = result.summary.set_index("set").loc[name]
        assert row["n"] == len(prompts)
        assert row["mean_tuco"] == pytest.approx(expected.mean(), abs=1e-5)
        assert row["sem_tuco"] == pytest.approx(expected.std(ddof=1) / math.sqrt(len(prompts)), abs=1e-5)
    for a, b in itertools.permutations(SETS, 2):
        brute = mann_whitney(result.scores(a), result.scores(b))
        assert result.auc(a, b) == pytest.approx(brute)
        assert result.auc_matrix.loc[a, b] == pytest.approx(brute)
        assert result.auc_matrix.loc[a, b] + result.auc_matrix.loc[b, a] == pytest.approx(1.0)
    assert np.isnan(np.diag(result.auc_matrix.to_numpy())).all()
    fig = result.figure("questions", "short")
    assert isinstance(fig, go.Figure) and len(fig.data) == 3
    assert f"{result.auc('questions', 'short'):.4f}" in fig.layout.title.text


def test_prompt_sets_accept_dataframe_and_jsonl_and_select_names(pair, tmp_path):
    rows = [{"set": s, "prompt": p} for s, ps in SETS.items() for p in ps]
    path = tmp_path / "sets.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from_dict = compare_prompt_sets(pair, SETS, names=["chatty", "short"])
    from_df = compare_prompt_sets(pair, pd.DataFrame(rows), names=["chatty", "short"])
    from_file = compare_prompt_sets(pair, str(path), names=["chatty", "short"])
    assert from_dict.set_names == ["chatty", "short"]
    pd.testing.assert_frame_equal(from_dict.table, from_df.table)
    pd.testing.assert_frame_equal(from_dict.table, from_file.table)
    chat = compare_prompt_sets(pair, SETS, names=["short"], chat_template=True)
    np.testing.assert_allclose(chat.scores("short"), pair.tuco(SETS["short"], chat_template=True).numpy(), atol=1e-5)
    l2 = compare_prompt_sets(pair, SETS, names=["short"], norm="l2", batch_size=2)
    np.testing.assert_allclose(l2.scores("short"), pair.tuco(SETS["short"], norm="l2").numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "sets, kwargs, error, match",
    [
        ({}, {}, InputError, "No prompt sets"),
        ({"a": []}, {}, InputError, "is empty"),
        ({"a": ["x", ""]}, {}, InputError, "empty string"),
        ({"a": ["x", 3]}, {}, InputTypeError, "not a str"),
        ({"a": ["x"]}, {"names": ["b"]}, InputError, "Unknown prompt set"),
        ("not a file at all", {}, InputTypeError, "not a file"),
        ("missing.jsonl", {}, InputError, "does not exist"),
        (pd.DataFrame({"prompt": ["x"]}), {}, InputError, "lacks column"),
        (["x", "y"], {}, InputTypeError, "dict"),
        ({"a": ["x"]}, {"norm": "l3"}, InputError, "norm"),
        ({"a": ["x"]}, {"batch_size": 0}, InputError, "batch_size"),
    ],
)
def test_prompt_sets_bad_input(pair, sets, kwargs, error, match):
    with pytest.raises(error, match=match):
        compare_prompt_sets(pair, sets, **kwargs)


def test_prompt_sets_bad_names_in_result_and_jsonl_errors(pair, tmp_path):
    result = compare_prompt_sets(pair, SETS)
    with pytest.raises(InputError, match="Unknown prompt set 'nope'"):
        result.auc("nope", "short")
    with pytest.raises(InputError, match="same set"):
        result.auc("short", "short")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"set": "a", "prompt": "x"}\n{"set": "a"}\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        compare_prompt_sets(pair, bad)
    with pytest.raises(InputTypeError, match="TuCoPair"):
        compare_prompt_sets("pair", SETS)


# ------------------------------------------------------------------------------ many-shot
def test_many_shot_prompts_have_k_turns_nested_shots_and_pair_tuco(pair):
    sweep = many_shot_sweep(pair, REQUESTS, SHOTS, ks=[4, 0, 1, 2], seed=3)
    assert sweep.ks == (0, 1, 2, 4)
    t = sweep.table
    assert len(t) == len(REQUESTS) * 4
    for row in t.itertuples():
        # k example turns, then the request as the last user turn and the generation prompt
        assert row.prompt.count("<|user|>") == row.k + 1
        assert row.prompt.count("<|assistant|>") == row.k + 1
        assert row.prompt.count("<|end|>") == 2 * row.k + 1
        assert row.prompt.rstrip().endswith(f"<|user|> {row.request} <|end|> <|assistant|>")
        assert row.n_tokens == pair.tokenize(row.prompt).tokens.shape[1]
    # shots of a smaller k are a prefix of those of a larger k (same request)
    for i in range(len(REQUESTS)):
        prompts = t[t.request_index == i].sort_values("k")["prompt"].tolist()
        heads = [p[: p.rindex("<|user|>")] for p in prompts]
        assert all(heads[j + 1].startswith(heads[j]) for j in range(len(heads) - 1))
    expected = pair.tuco(t["prompt"].tolist()).double().numpy()
    np.testing.assert_allclose(t["tuco"].to_numpy(), expected, atol=1e-5)
    for row in sweep.summary.itertuples():
        values = t.loc[t.k == row.k, "tuco"].to_numpy()
        assert row.n == len(REQUESTS)
        assert row.mean_tuco == pytest.approx(values.mean())
        assert row.sem_tuco == pytest.approx(values.std(ddof=1) / math.sqrt(values.size))
    # the seed picks the shots; shuffle=False takes the pool in order
    other = many_shot_sweep(pair, REQUESTS, SHOTS, ks=[4], seed=4)
    assert other.table["prompt"].tolist() != t.loc[t.k == 4, "prompt"].tolist()
    ordered = many_shot_sweep(pair, REQUESTS[:1], SHOTS, ks=[2], shuffle=False)
    assert SHOTS[0][0] in ordered.table["prompt"][0] and SHOTS[1][1] in ordered.table["prompt"][0]
    assert SHOTS[2][0] not in ordered.table["prompt"][0]
    # the pool may also be dicts or a DataFrame; ks default to 0 and powers of two up to its size
    as_dicts = many_shot_sweep(pair, REQUESTS, [{"user": u, "assistant": a} for u, a in SHOTS], ks=[4], seed=3)
    as_frame = many_shot_sweep(pair, REQUESTS, pd.DataFrame(SHOTS, columns=["user", "assistant"]), ks=[4], seed=3)
    assert as_dicts.table["prompt"].tolist() == as_frame.table["prompt"].tolist() == t.loc[t.k == 4, "prompt"].tolist()
    assert many_shot_sweep(pair, REQUESTS[:1], SHOTS).ks == (0, 1, 2, 4)
    fig = sweep.figure()
    assert fig.layout.xaxis.type == "category"
    assert list(fig.data[0].x) == ["0", "1", "2", "4"]  # k = 0 sits on the (evenly spaced) axis
    np.testing.assert_allclose(list(fig.data[0].y), sweep.summary["mean_tuco"].to_numpy())
    linear = sweep.figure(log_x=False)
    assert list(linear.data[0].x) == [0, 1, 2, 4] and linear.layout.xaxis.type == "linear"


def test_many_shot_custom_builder_behaviour_rate_and_outputco(pair):
    def build(request, shots):
        return " ".join(f"q : {u} a : {a}" for u, a in shots) + f" q : {request} a :"

    def says_the(completion):
        return "the" in completion.split()

    sweep = many_shot_sweep(
        pair, REQUESTS, SHOTS, ks=[0, 2, 4], build_prompt=build, behaviour=says_the,
        max_new_tokens=4, with_outputco=True,
    )
    t = sweep.table
    assert all(p.count(" q : ") + p.startswith("q : ") == k + 1 for p, k in zip(t.prompt, t.k))
    np.testing.assert_allclose(t["tuco"], pair.tuco(t["prompt"].tolist()).numpy(), atol=1e-5)
    np.testing.assert_allclose(t["outputco"], outputco(pair, t["prompt"].tolist()).numpy(), atol=1e-5)
    # completions: greedy, one per prompt, equal to generating each prompt alone
    for row in t.itertuples():
        alone = pair.generate(row.prompt, max_new_tokens=4)
        assert row.completion == alone
        assert row.behaviour_rate == float(says_the(alone))
    for row in sweep.summary.itertuples():
        recount = [says_the(pair.generate(p, max_new_tokens=4)) for p in t.loc[t.k == row.k, "prompt"]]
        assert row.behaviour_rate == pytest.approx(sum(recount) / len(recount))
        assert row.mean_outputco == pytest.approx(t.loc[t.k == row.k, "outputco"].mean())
    fig = sweep.figure()
    assert {d.name for d in fig.data} == {"mean TuCo", "mean OutputCo", "behaviour rate"}


def test_many_shot_sampled_behaviour_is_seeded(pair):
    kwargs = dict(ks=[1], behaviour=lambda c: "the" in c.split(), do_sample=True, n_samples=3, max_new_tokens=5)
    a = many_shot_sweep(pair, REQUESTS, SHOTS, seed=1, **kwargs)
    b = many_shot_sweep(pair, REQUESTS, SHOTS, seed=1, **kwargs)
    pd.testing.assert_frame_equal(a.completions, b.completions)
    assert len(a.completions) == len(REQUESTS) * 3
    rates = a.completions.groupby("request_index")["behaviour"].mean()
    np.testing.assert_allclose(a.table.sort_values("request_index")["behaviour_rate"], rates.sort_index())
    assert a.summary["behaviour_rate"][0] == pytest.approx(a.completions["behaviour"].mean())


def test_many_shot_too_long_raises_naming_k_or_skips(pair):
    long_shots = [("tell me " + "a big good dog " * 6, "the dog is " + "a big good dog " * 6)] * 8
    with pytest.raises(InputError, match=r"k = 4 shots for request 0 has \d+ tokens, more than the model's context of 128"):
        many_shot_sweep(pair, REQUESTS, long_shots, ks=[0, 1, 4, 8])
    sweep = many_shot_sweep(pair, REQUESTS, long_shots, ks=[0, 1, 4, 8], too_long="skip")
    assert sweep.ks == (0, 1)
    assert sorted(set(sweep.skipped["k"])) == [4, 8] and len(sweep.skipped) == 2 * len(REQUESTS)
    assert (sweep.skipped["n_tokens"] > 128).all()
    assert "skipped" in sweep.notes[0]
    # with generation, the completion must fit too
    with pytest.raises(InputError, match="minus max_new_tokens"):
        many_shot_sweep(pair, REQUESTS, long_shots, ks=[1], behaviour=bool, max_new_tokens=100)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"ks": [-1, 2]}, InputError, ">= 0"),
        ({"ks": [7]}, InputError, "k = 7 needs 7 distinct"),
        ({"ks": []}, InputError, "ks is empty"),
        ({"ks": [1.5]}, InputTypeError, "int"),
        ({"shots": [("a", 1)]}, InputTypeError, "two strings"),
        ({"shots": [("a",)]}, InputTypeError, r"\(user, assistant\) pair"),
        ({"shots": [{"user": "a"}]}, InputError, "'assistant'"),
        ({"shots": "a dog"}, InputTypeError, "list of"),
        ({"requests": []}, InputError, "requests is empty"),
        ({"n_samples": 2, "behaviour": bool}, InputError, "do_sample=True"),
        ({"too_long": "cut"}, InputError, "too_long"),
        ({"build_prompt": lambda r, s: 5}, InputTypeError, "non-empty str"),
        ({"build_prompt": lambda r, s: 1 / 0}, InputError, "ZeroDivisionError"),
        ({"behaviour": lambda c: "yes", "ks": [0]}, InputTypeError, "True or False"),
    ],
)
def test_many_shot_bad_input(pair, kwargs, error, match):
    args = dict(requests=REQUESTS, shots=SHOTS, ks=[0, 1])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        many_shot_sweep(pair, args.pop("requests"), args.pop("shots"), **args, max_new_tokens=2)


def test_many_shot_without_chat_template_needs_builder(pair):
    template = pair.tokenizer.chat_template
    pair.tokenizer.chat_template = None
    try:
        with pytest.raises(InputError, match="build_prompt"):
            many_shot_sweep(pair, REQUESTS, SHOTS, ks=[0])
        sweep = many_shot_sweep(pair, REQUESTS, SHOTS, ks=[1], build_prompt=lambda r, s: s[0][0] + " " + r)
        assert len(sweep.table) == len(REQUESTS)
    finally:
        pair.tokenizer.chat_template = template


def test_many_shot_on_demo_pair_counts_turns_and_refusals(demo_pair):
    from tuco_lens import demo

    requests = [r.text for r in demo.requests("heldout", ["potions"]) if r.prefix == 0][:3]
    pool = [(r.text, r.compliant_answer) for r in demo.requests("train", ["potions"])][:4]
    sweep = many_shot_sweep(
        demo_pair, requests, pool, ks=[0, 2, 4], build_prompt=lambda r, s: demo.many_shot_prompt(r, len(s)),
        behaviour=demo.is_refusal, behaviour_name="refusal rate", max_new_tokens=12,
    )
    for row in sweep.table.itertuples():
        assert row.prompt == demo.many_shot_prompt(row.request, row.k)
        assert row.prompt.split().count("<user>") == row.k + 1
        assert row.prompt.split().count("<assistant>") == row.k + 1
    np.testing.assert_allclose(sweep.table["tuco"], demo_pair.tuco(sweep.table["prompt"].tolist()).numpy(), atol=1e-5)
    recount = [demo.is_refusal(c) for c in demo_pair.generate(sweep.table["prompt"].tolist(), max_new_tokens=12)]
    assert sweep.table["behaviour_rate"].tolist() == [float(r) for r in recount]
    assert sweep.summary.set_index("k").loc[0, "behaviour_rate"] == 1.0  # the demo refuses plain requests


# ------------------------------------------------------------------------------ transformations
def test_transformations_scores_order_and_aucs(pair):
    def shout(text):
        return text + " ! ! !"

    transforms = {"suffix": suffix_transform("the good old moon"), "shout": shout}
    result = compare_transformations(pair, REQUESTS, transforms, chat_template=True)
    t = result.table
    assert set(t["transformation"]) == {"original", "suffix", "shout"}
    for name, fn in [("original", lambda s: s), ("suffix", lambda s: s + " the good old moon"), ("shout", shout)]:
        part = t[t["transformation"] == name]
        prompts = [fn(r) for r in REQUESTS]
        assert part["prompt"].tolist() == prompts  # transformation before the chat template
        # the chat template is applied after the transformation
        np.testing.assert_allclose(part["tuco"], pair.tuco(prompts, chat_template=True).numpy(), atol=1e-5)
    s = result.summary
    assert s["mean_tuco"].is_monotonic_decreasing
    assert result.order == s["transformation"].tolist()
    ref = result.scores("original")
    for row in s.itertuples():
        values = result.scores(row.transformation)
        assert row.mean_tuco == pytest.approx(values.mean())
        if row.transformation == "original":
            assert math.isnan(row.auc_vs_reference)
            continue
        assert row.auc_vs_reference == pytest.approx(mann_whitney(ref, values))
        assert result.auc(row.transformation) == pytest.approx(row.auc_vs_reference)
        assert row.frac_lower == pytest.approx(np.mean(values < ref))
        assert row.mean_delta == pytest.approx(np.mean(values - ref))
    fig = result.figure()
    assert [d.name.split(" (")[0] for d in fig.data] == result.order


def test_transformations_reference_wrap_and_errors(pair, tmp_path):
    path = tmp_path / "requests.txt"
    path.write_text("\n".join(REQUESTS) + "\n\n")
    from_file = compare_transformations(pair, path, {"suffix": suffix_transform("hello")})
    assert from_file.table.loc[from_file.table.transformation == "original", "request"].tolist() == REQUESTS
    wrapped = compare_transformations(
        pair, REQUESTS, {"plain": lambda s: s, "suffix": suffix_transform("hello", separator=" , ")},
        reference="plain", wrap=lambda s: "q : " + s + " a :",
    )
    assert set(wrapped.table["transformation"]) == {"plain", "suffix"}
    assert wrapped.table.loc[wrapped.table.transformation == "suffix", "prompt"].iloc[0] == f"q : {REQUESTS[0]} , hello a :"
    np.testing.assert_allclose(
        wrapped.scores("suffix"), pair.tuco([f"q : {r} , hello a :" for r in REQUESTS]).numpy(), atol=1e-5
    )
    with pytest.raises(InputError, match="Unknown reference"):
        compare_transformations(pair, REQUESTS, {"a": str.upper}, reference="plain")
    with pytest.raises(InputError, match="besides the reference"):
        compare_transformations(pair, REQUESTS, {})
    with pytest.raises(InputTypeError, match="not a function"):
        compare_transformations(pair, REQUESTS, {"a": "suffix"})
    with pytest.raises(InputTypeError, match="returned int for request 0"):
        compare_transformations(pair, REQUESTS, {"a": len})
    with pytest.raises(InputError, match="'boom' on request 0 raised KeyError"):
        compare_transformations(pair, REQUESTS, {"boom": lambda s: {}[s]})
    with pytest.raises(InputError, match="empty prompt"):
        compare_transformations(pair, REQUESTS, {"blank": lambda s: ""})
    with pytest.raises(InputError, match="suffix is empty"):
        suffix_transform("")


# ------------------------------------------------------------------------------ jailbreaks
def test_contains_refusal_rule():
    assert contains_refusal("Well, I’M SORRY but no")  # curly apostrophe, any case
    assert contains_refusal("that is unethical")
    assert not contains_refusal("Sure, here is how to do it")
    assert contains_refusal("nope", ["NOPE"]) and not contains_refusal("yes", ["nope"])
    assert "I'm sorry" in DEFAULT_REFUSAL_STRINGS and "As an AI" in DEFAULT_REFUSAL_STRINGS


@pytest.fixture(scope="module")
def jailbreak(demo_pair):
    from tuco_lens import demo

    sets = demo.prompt_sets()
    prompts = {"harmful": sets["harmful"][:6], "harmful_lang2": sets["harmful_lang2"][:6]}
    return prompts, jailbreak_success(demo_pair, prompts, n_samples=4, max_new_tokens=10, seed=0)


def test_jailbreak_labels_recount_and_auc(demo_pair, jailbreak):
    prompts, result = jailbreak
    t, c = result.table, result.completions
    assert len(t) == 12 and len(c) == 12 * 4
    assert t["set"].tolist() == ["harmful"] * 6 + ["harmful_lang2"] * 6
    np.testing.assert_allclose(t["tuco"], demo_pair.tuco(prompts["harmful"] + prompts["harmful_lang2"]).numpy(), atol=1e-5)
    lowered = [s.lower() for s in DEFAULT_REFUSAL_STRINGS]
    for row in t.itertuples():
        texts = c[(c["set"] == row.set) & (c["index"] == row.index)]["completion"].tolist()
        assert len(texts) == 4
        refusals = sum(any(s in text.lower() for s in lowered) for text in texts)
        assert row.n_refusals == refusals and row.n_non_refusals == 4 - refusals
        assert row.jailbroken == (4 - refusals >= 2)
    jb = t["jailbroken"].to_numpy()
    # the demo model refuses main-language requests and mostly not the second language
    assert 0 < jb.sum() < len(jb), "both labels are needed for this test"
    assert result.n_jailbroken == jb.sum()
    tuco = t["tuco"].to_numpy()
    assert result.auc == pytest.approx(mann_whitney(tuco[~jb], tuco[jb]))
    assert result.tpr_at_5_fpr == pytest.approx(tuco_lens.metrics.tpr_at_fpr(tuco[~jb], tuco[jb], 0.05))
    assert result.note is None
    fig = result.figure()
    assert [d.name for d in fig.data] == ["not jailbroken", "jailbroken"]
    assert f"{result.auc:.4f}" in fig.layout.title.text


def test_jailbreak_min_non_refusals_edge_cases(jailbreak):
    _, result = jailbreak
    t = result.table
    strict = result.with_min_non_refusals(4)  # m = k: jailbroken only without any refusal
    assert strict.table["jailbroken"].tolist() == (t["n_refusals"] == 0).tolist()
    loose = result.with_min_non_refusals(1)  # one non-refusal is enough
    assert loose.table["jailbroken"].tolist() == (t["n_refusals"] < 4).tolist()
    assert loose.n_jailbroken >= result.n_jailbroken >= strict.n_jailbroken
    assert result.table["jailbroken"].tolist() == (t["n_non_refusals"] >= 2).tolist()  # unchanged
    for m in (0, 5):
        with pytest.raises(InputError, match="min_non_refusals"):
            result.with_min_non_refusals(m)


def test_jailbreak_reproducible_and_rng_untouched(demo_pair, jailbreak):
    prompts, first = jailbreak
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = jailbreak_success(demo_pair, prompts, n_samples=4, max_new_tokens=10, seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG state is restored
    pd.testing.assert_frame_equal(first.completions, again.completions)
    pd.testing.assert_frame_equal(first.table, again.table)
    other = jailbreak_success(demo_pair, prompts, n_samples=4, max_new_tokens=10, seed=1)
    assert other.completions["completion"].tolist() != first.completions["completion"].tolist()


def test_jailbreak_predicate_and_degenerate_labels(demo_pair):
    from tuco_lens import demo

    prompts = demo.prompt_sets()["harmful"][:4]
    never = jailbreak_success(demo_pair, prompts, n_samples=2, max_new_tokens=3, min_non_refusals=2, is_refusal=lambda c: True)
    assert not never.table["jailbroken"].any() and never.n_jailbroken == 0
    assert math.isnan(never.auc) and math.isnan(never.tpr_at_5_fpr)
    assert "All 4 prompts are not jailbroken" in never.note
    assert isinstance(never.figure(), go.Figure)
    always = jailbreak_success(demo_pair, prompts, n_samples=2, max_new_tokens=3, is_refusal=lambda c: False)
    assert always.table["jailbroken"].all() and math.isnan(always.auc) and "jailbroken" in always.note
    assert set(always.table["set"]) == {"prompts"}
    official = jailbreak_success(demo_pair, prompts, n_samples=2, max_new_tokens=12, is_refusal=demo.is_refusal)
    recount = official.completions["completion"].map(demo.is_refusal)
    assert official.completions["refusal"].tolist() == recount.tolist()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_samples": 0}, InputError, "n_samples"),
        ({"n_samples": 3, "min_non_refusals": 4}, InputError, "more than n_samples = 3"),
        ({"min_non_refusals": 0}, InputError, "min_non_refusals"),
        ({"refusal_strings": []}, InputError, "refusal_strings is empty"),
        ({"refusal_strings": "I'm sorry"}, InputTypeError, "single string"),
        ({"is_refusal": "sorry"}, InputTypeError, "function"),
        ({"is_refusal": lambda c: "no"}, InputTypeError, "True or False"),
        ({"temperature": 0}, InputError, "temperature"),
        ({"max_new_tokens": 1000}, InputError, "context"),
    ],
)
def test_jailbreak_bad_input(pair, kwargs, error, match):
    options = dict(n_samples=2, max_new_tokens=2)
    options.update(kwargs)
    with pytest.raises(error, match=match):
        jailbreak_success(pair, ["the cat", "a dog"], **options)


# ------------------------------------------------------------------------------ OutputCo
def _independent_outputco(pt, ft, tokens, norm=1):
    finals = []
    for model in (pt, ft):
        _, cache = model.run_with_cache(tokens)
        finals.append(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, -1].double())
    pt_final, ft_final = finals
    moved = torch.linalg.vector_norm(ft_final - pt_final, ord=norm)
    return float(moved / (torch.linalg.vector_norm(pt_final, ord=norm) + moved))


def test_outputco_matches_run_with_cache_on_padded_batches(pair):
    prompts = ["the cat", "a dog and a bird in the sea", "hello", "what is the time ?"]
    for norm, order in (("l1", 1), ("l2", 2)):
        got = outputco(pair, prompts, norm=norm)
        assert got.shape == (4,)
        expected = [_independent_outputco(pair.pt, pair.ft, pair.tokenize(p).tokens, order) for p in prompts]
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(outputco(pair, prompts, norm=norm, batch_size=3).numpy(), expected, atol=1e-5)
    # the final norm is not applied: its input (blocks.L-1.hook_resid_post) is what is compared
    assert float(outputco(TuCoPair(pair.pt, pair.pt), prompts).abs().max()) == 0.0


def test_outputco_can_be_zero_while_tuco_is_not():
    """The paper's point (§5.5): fine-tuning adds v in block 0, a pre-trained block 1 erases it.

    No norms; PT block 1 has one attention head that writes -x[0] (averaged over positions) to
    coordinate 0 and nothing else reads coordinate 0 (queries, keys, other values, MLP). FT = PT
    plus c on coordinate 0 of block 0's MLP output bias. Then FTC_0 = c·e0, FTC_1 = 0, PT block 1
    (on the FT stream) removes c·e0 again: x_L^FT = x_L^PT (OutputCo 0) but TuCo = c / (|PTCbar| + c).
    """
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, n_ctx=16, d_vocab=40, act_fn="gelu",
        normalization_type=None, positional_embedding_type="standard", dtype=torch.float64, device="cpu",
    )
    pt = HookedTransformer(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pt.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        attn, mlp = pt.blocks[1].attn, pt.blocks[1].mlp
        attn.W_Q[:, 0, :] = 0
        attn.W_K[:, 0, :] = 0
        attn.W_V[:, 0, :] = 0
        attn.W_V[0, :, 0] = 0
        attn.W_V[0, 0, 0] = 1
        attn.W_O[0, 0, :] = 0
        attn.W_O[0, 0, 0] = -1
        mlp.W_in[0, :] = 0
    ft = HookedTransformer(cfg)
    ft.load_state_dict(pt.state_dict())
    c = 20.0
    with torch.no_grad():
        ft.blocks[0].mlp.b_out[0] += c
    pair = TuCoPair(pt, ft)
    tokens = random_tokens(3, 9, vocab=40, seed=5)
    oc = outputco(pair, tokens, accumulate_dtype=torch.float64)
    tuco = pair.tuco(tokens, accumulate_dtype=torch.float64)
    assert float(oc.abs().max()) < 1e-12
    # independent TuCo: FTCbar = c·e0 exactly, PTCbar = x_L - x_0 - c·e0
    _, cache = ft.run_with_cache(tokens)
    x0, xl = cache["blocks.0.hook_resid_pre"][:, -1], cache["blocks.1.hook_resid_post"][:, -1]
    ptc_bar = xl - x0
    ptc_bar[:, 0] -= c
    expected = c / (ptc_bar.abs().sum(-1) + c)
    torch.testing.assert_close(tuco, expected, atol=1e-10, rtol=0)
    assert float(tuco.min()) > 0.1
    # without the erasing head the fine-tuning contribution reaches the output
    with torch.no_grad():
        pt.blocks[1].attn.W_O[0, 0, 0] = 0
        ft.blocks[1].attn.W_O[0, 0, 0] = 0
    assert float(outputco(TuCoPair(pt, ft), tokens).min()) > 0.05


def test_compare_tuco_outputco_side_by_side(pair):
    result = compare_tuco_outputco(pair, SETS)
    t = result.table
    assert list(t.columns) == ["set", "index", "prompt", "tuco", "outputco"]
    prompts = t["prompt"].tolist()
    np.testing.assert_allclose(t["tuco"], pair.tuco(prompts).numpy(), atol=1e-5)
    np.testing.assert_allclose(t["outputco"], outputco(pair, prompts).numpy(), atol=1e-5)
    for a, b in itertools.permutations(SETS, 2):
        for metric, matrix in (("tuco", result.auc_tuco), ("outputco", result.auc_outputco)):
            brute = mann_whitney(t.loc[t.set == a, metric], t.loc[t.set == b, metric])
            assert matrix.loc[a, b] == pytest.approx(brute)
            assert result.auc(a, b, metric=metric) == pytest.approx(brute)
    row = result.summary.set_index("set").loc["short"]
    part = t[t.set == "short"]
    assert row["mean_outputco"] == pytest.approx(part["outputco"].mean())
    assert row["spearman"] == pytest.approx(part["tuco"].rank().corr(part["outputco"].rank()))
    single = compare_tuco_outputco(pair, ["the cat", "a dog"])
    assert single.set_names == ["prompts"]
    fig = result.figure()
    assert isinstance(fig, go.Figure) and len(fig.data) == len(SETS) + 1 + 2
    with pytest.raises(InputError, match="metric"):
        result.auc("short", "chatty", metric="loss")
