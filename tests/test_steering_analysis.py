"""α steering with cross-validation (tuco_lens.analyses.steering), on the demo pair.

Every number is checked against an independent recomputation: the plain fine-tuned model run one
prompt at a time without padding, α-scaling written out by hand from Definition 5.1 (direct block
calls), option tokens looked up in the vocabulary, and the cross-validation redone by brute force.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from hf_reference import reference_alpha_logits

from tuco_lens import InputError, demo
from tuco_lens.analyses.steering import (
    DEFAULT_ALPHAS,
    alpha_accuracy,
    choose_alpha,
    cv_folds,
    steer_with_cv,
)

pytestmark = pytest.mark.reference  # test tier (tests/conftest.py, TIERS)

N_ITEMS = 40


@pytest.fixture(scope="module")
def pair():
    return demo.load_pair()


@pytest.fixture(scope="module")
def items():
    # Second-language items: about 56% accuracy at alpha = 1, so alpha changes some answers.
    return demo.multiple_choice_items(N_ITEMS, lang2=True)


@pytest.fixture(scope="module")
def hf_pair():
    pt, ft, _ = demo.load_hf_pair()
    return pt, ft


def hand_logits(pair, prompt: str, alpha: float, hf_pair) -> torch.Tensor:
    """Next-token logits of one unpadded prompt, x <- x + PTC + α·FTC written out by hand.

    HookedTransformer pairs: direct block calls. TransformerBridge pairs (transformer-lens 4.x):
    the independent Hugging Face reference (tests/hf_reference.py) on the demo checkpoints.
    """
    ft, pt = pair.ft, pair.pt
    tokens = ft.to_tokens(prompt, prepend_bos=False)  # demo prompts start with "<bos>" already
    assert tokens[0, 0].item() == pair.tokenizer.bos_token_id and (tokens[0] == pair.tokenizer.bos_token_id).sum() == 1
    if pair.backend.name != "HookedTransformer":
        return reference_alpha_logits(*hf_pair, tokens, alpha=alpha)[0, -1]
    with torch.no_grad():
        if alpha == 1.0:
            return ft(tokens)[0, -1]
        x, _, _, _ = ft.input_to_embed(tokens)
        for layer in range(ft.cfg.n_layers):
            pt_out = pt.blocks[layer](x)
            ft_out = ft.blocks[layer](x)
            x = pt_out + alpha * (ft_out - pt_out)
        return ft.unembed(ft.ln_final(x))[0, -1]


@pytest.fixture(scope="module")
def reference(pair, items, hf_pair):
    """{alpha: (correct [n_items] bool, option probabilities list, option logits list)}."""
    vocab = pair.tokenizer.get_vocab()
    out = {}
    for alpha in DEFAULT_ALPHAS:
        correct, probs, logits = [], [], []
        for item in items:
            ids = [vocab[o] for o in item.options]
            z = hand_logits(pair, item.prompt, alpha, hf_pair).double()
            option_logits = z[ids]
            correct.append(int(option_logits.argmax()) == item.answer_index)
            probs.append(torch.softmax(z, -1)[ids].numpy())
            logits.append(option_logits.numpy())
        out[alpha] = (np.array(correct), probs, logits)
    return out


# ----------------------------------------------------------------------------------- folds
@pytest.mark.parametrize("n_items,n_folds", [(90, 5), (7, 3), (5, 5), (11, 2)])
def test_folds_are_disjoint_complete_balanced_and_seeded(n_items, n_folds):
    folds = cv_folds(n_items, n_folds, seed=3)
    assert len(folds) == n_folds
    joined = np.concatenate(folds)
    assert sorted(joined.tolist()) == list(range(n_items))  # complete, and disjoint (no repeats)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    again = cv_folds(n_items, n_folds, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    if n_items > n_folds:
        other = cv_folds(n_items, n_folds, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(folds, other))


def test_too_many_folds_is_refused(pair, items):
    with pytest.raises(InputError, match="n_folds"):
        cv_folds(4, 5)
    with pytest.raises(InputError, match="n_folds"):
        steer_with_cv(pair, items[:3], n_folds=5)


def test_tie_breaking_goes_towards_alpha_one():
    alphas = [0.75, 0.9, 1.0, 1.1, 1.25]
    assert choose_alpha(alphas, [0.5, 0.7, 0.7, 0.6, 0.7]) == 1.0
    assert choose_alpha(alphas, [0.5, 0.7, 0.6, 0.7, 0.5]) == 0.9  # equally far: the smaller
    assert choose_alpha(alphas, [0.5, 0.7, 0.6, 0.7, 0.5], "minimize") == 0.75
    assert choose_alpha(alphas, [0.4, 0.7, 0.6, 0.7, 0.4], "minimize") == 0.75


# ----------------------------------------------------------------------------------- scoring
def test_alpha_one_accuracy_equals_the_plain_fine_tuned_model(pair, items, reference):
    table = alpha_accuracy(pair, items, alphas=[1.0])
    plain_correct = reference[1.0][0]
    assert table["correct"].to_numpy().tolist() == plain_correct.tolist()
    assert table["correct"].mean() == pytest.approx(plain_correct.mean(), abs=0)
    assert 0.3 < plain_correct.mean() < 0.8  # documented: about 56% on the full set
    # Batching (and the padding it implies) changes nothing.
    batched = alpha_accuracy(pair, items, alphas=[1.0], batch_size=7)
    assert batched["chosen"].tolist() == table["chosen"].tolist()


def test_option_probabilities_are_softmax_entries_of_the_logits(pair, items, reference):
    table = alpha_accuracy(pair, items, alphas=[0.9, 1.0, 1.25])
    for alpha in (0.9, 1.0, 1.25):
        rows = table[table.alpha == alpha].sort_values("item")
        _, probs, logits = reference[alpha]
        for i, row in enumerate(rows.itertuples()):
            p = np.array(row.option_probs)
            assert p.sum() <= 1 + 1e-9 and (p >= 0).all()
            np.testing.assert_allclose(p, probs[i], atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(row.option_logits, logits[i], atol=2e-4, rtol=1e-4)
            assert row.answer_prob == pytest.approx(p[row.answer_index], abs=0)
            assert row.chosen == int(np.argmax(row.option_logits))
            assert row.correct == (row.chosen == row.answer_index)


def test_alpha_changes_answers_exactly_as_the_hand_written_scaling(pair, items, reference):
    table = alpha_accuracy(pair, items)
    assert list(table.alpha.unique()) == list(DEFAULT_ALPHAS)
    for alpha in DEFAULT_ALPHAS:
        got = table[table.alpha == alpha].sort_values("item")["correct"].to_numpy()
        assert got.tolist() == reference[alpha][0].tolist(), alpha
    accs = [reference[a][0].mean() for a in DEFAULT_ALPHAS]
    assert len(set(accs)) > 1  # the grid really moves the accuracy on these items


# ----------------------------------------------------------------------------------- CV
@pytest.mark.parametrize("objective", ["maximize", "minimize"])
def test_cv_choice_test_accuracy_and_delta_equal_a_brute_force_recount(pair, items, reference, objective):
    result = steer_with_cv(pair, items, objective=objective, n_folds=5, seed=1)
    correct = {a: reference[a][0] for a in DEFAULT_ALPHAS}
    folds = cv_folds(N_ITEMS, 5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(result.folds, folds))
    hits_star = hits_one = 0
    for k, test in enumerate(folds):
        train = [i for i in range(N_ITEMS) if i not in set(test.tolist())]
        train_acc = {a: correct[a][train].mean() for a in DEFAULT_ALPHAS}
        best = max(train_acc.values()) if objective == "maximize" else min(train_acc.values())
        tied = [a for a in DEFAULT_ALPHAS if train_acc[a] == best]
        expected = sorted(tied, key=lambda a: (abs(a - 1), a))[0]
        assert result.chosen_alphas[k] == expected
        for a in DEFAULT_ALPHAS:
            assert result.train_accuracy.loc[k, a] == pytest.approx(train_acc[a], abs=1e-12)
        assert result.test_accuracy[k] == pytest.approx(correct[expected][test].mean(), abs=1e-12)
        assert result.test_accuracy_alpha1[k] == pytest.approx(correct[1.0][test].mean(), abs=1e-12)
        hits_star += correct[expected][test].sum()
        hits_one += correct[1.0][test].sum()
    assert result.delta == pytest.approx((hits_star - hits_one) / N_ITEMS, abs=1e-12)
    assert result.base_accuracy == pytest.approx(correct[1.0].mean(), abs=1e-12)
    assert result.cv_accuracy == pytest.approx(hits_star / N_ITEMS, abs=1e-12)
    for a in DEFAULT_ALPHAS:
        assert result.accuracy.loc[a] == pytest.approx(correct[a].mean(), abs=1e-12)
    table = result.to_dataframe()
    assert table["n_test"].sum() == N_ITEMS and (table["n_train"] + table["n_test"] == N_ITEMS).all()
    assert table["alpha"].tolist() == result.chosen_alphas
    assert result.table.equals(table)
    assert "Δ" in result.summary()


def test_minimize_picks_the_argmin_and_maximize_the_argmax(pair, items):
    up = steer_with_cv(pair, items, objective="maximize", seed=0)
    down = steer_with_cv(pair, items, objective="minimize", seed=0)
    for k in range(5):
        row = up.train_accuracy.loc[k]
        assert row[up.chosen_alphas[k]] == row.max()
        row = down.train_accuracy.loc[k]
        assert row[down.chosen_alphas[k]] == row.min()
    assert up.base_accuracy == down.base_accuracy
    assert up.cv_accuracy >= down.cv_accuracy


def test_alpha_one_is_the_baseline_even_when_not_a_candidate(pair, items, reference):
    result = steer_with_cv(pair, items, alphas=[0.75, 1.25], n_folds=4)
    assert set(result.chosen_alphas) <= {0.75, 1.25}
    assert 1.0 in result.accuracy.index
    assert result.base_accuracy == pytest.approx(reference[1.0][0].mean(), abs=1e-12)


def test_figure_marks_the_chosen_alphas(pair, items):
    result = steer_with_cv(pair, items, n_folds=5)
    fig = result.figure()
    assert isinstance(fig, go.Figure)
    curve, marks = fig.data[0], fig.data[-1]
    assert list(curve.x) == sorted(DEFAULT_ALPHAS)
    np.testing.assert_allclose(curve.y, result.accuracy.to_numpy())
    assert sorted(marks.x) == sorted(set(result.chosen_alphas))
    for x, y in zip(marks.x, marks.y):
        assert y == pytest.approx(result.accuracy.loc[x])


# ----------------------------------------------------------------------------------- inputs
def test_dicts_dataframe_and_jsonl_give_the_same_answers(pair, items, tmp_path):
    dicts = [{"prompt": it.prompt, "options": list(it.options), "answer_index": it.answer_index} for it in items[:12]]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in dicts) + "\n")
    tables = [
        alpha_accuracy(pair, source, alphas=[0.9, 1.1])
        for source in (items[:12], dicts, pd.DataFrame(dicts), path, str(path))
    ]
    for t in tables[1:]:
        assert t["chosen"].tolist() == tables[0]["chosen"].tolist()


def test_chat_template_wraps_the_prompt_as_a_user_turn(pair):
    question = "where does the fox live ?"
    raw = [{"prompt": question, "options": ["forest", "river"], "answer_index": 0}]
    formatted = [{"prompt": demo.render_chat([{"role": "user", "content": question}]), "options": ["forest", "river"], "answer_index": 0}]
    a = alpha_accuracy(pair, raw, alphas=[1.0], chat_template=True)
    b = alpha_accuracy(pair, formatted, alphas=[1.0])
    assert a["option_probs"].tolist() == b["option_probs"].tolist()


def test_bad_items_are_refused_with_the_item_and_option_named(pair, items):
    good = {"prompt": items[0].prompt, "options": list(items[0].options), "answer_index": 0}
    with pytest.raises(InputError, match=r"Item 1: option 'dark potion' is 2 tokens"):
        alpha_accuracy(pair, [good, {**good, "options": ["fox", "dark potion"]}])
    with pytest.raises(InputError, match=r"Item 0: option 'qwertyuiop' is the unknown token"):
        alpha_accuracy(pair, [{**good, "options": ["fox", "qwertyuiop"]}])
    with pytest.raises(InputError, match="same token"):
        alpha_accuracy(pair, [{**good, "options": ["fox", " fox"]}])
    with pytest.raises(InputError, match="answer_index 4 is out of range"):
        alpha_accuracy(pair, [{**good, "answer_index": 4}])
    with pytest.raises(InputError, match="no 'options'"):
        alpha_accuracy(pair, [{"prompt": "x", "answer_index": 0}])
    with pytest.raises(InputError, match="does not exist"):
        alpha_accuracy(pair, "/nonexistent/items.jsonl")
    with pytest.raises(InputError, match="objective"):
        steer_with_cv(pair, items, objective="max")
    with pytest.raises(InputError, match="repeated"):
        alpha_accuracy(pair, items, alphas=[1.0, 1.0])
