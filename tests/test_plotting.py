"""Figures carry the decomposition's numbers; metrics are exact; reports work offline."""

from __future__ import annotations

import dataclasses
import functools
import html
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from figure_layout import layout_problems
from tiny_models import make_pair, random_tokens

import tuco_lens
from tuco_lens import Decomposition, InputError, InputTypeError, TuCoPair
from tuco_lens.metrics import roc_auc, tpr_at_fpr
from tuco_lens.plotting import (
    TokenHTML,
    plot_alpha_sweep,
    plot_components,
    plot_head_heatmap,
    plot_layers,
    plot_prompt_sets,
    plot_token_heatmap,
    plot_top_tokens,
    save_report,
    token_html,
)
from tuco_lens.plotting._util import PALETTE, colour_at, set_colours

pytestmark = pytest.mark.hooked  # tiny HookedTransformers: transformer-lens 3.x only (skipped on 4.x)

# Row 0 unpadded; row 1 has 2 left pads, row 2 has 1. Tokens repeat ("the") and need escaping.
STR_TOKENS = [
    ["<b>&", " the", "cat", " the", "\n", "x", "end"],
    ["", "", "<b>&", " the", " the", "y", "[/INST]"],
    ["", "a", "b", "c", "a", "b", "c"],
]
PROMPTS = ["<i>first</i> prompt", "second prompt", "third"]


@pytest.fixture(scope="module")
def dec() -> Decomposition:
    tokens = random_tokens(3, 7)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    mask[2, :1] = 0
    decomposition = TuCoPair(*make_pair("llama")).decompose(tokens, attention_mask=mask)
    return dataclasses.replace(decomposition, str_tokens=STR_TOKENS, prompts=PROMPTS)


def real(dec: Decomposition, i: int) -> np.ndarray:
    return dec.attention_mask[i].bool().nonzero().reshape(-1).numpy()


def synthetic_decomposition(batch: int, n_layers: int, n_pos: int, seed: int = 0) -> Decomposition:
    g = torch.Generator().manual_seed(seed)
    ptc = torch.rand(batch, n_layers, n_pos, generator=g) + 0.1
    ftc = torch.rand(batch, n_layers, n_pos, generator=g) * 0.5
    ptc_cum, ftc_cum = ptc.cumsum(1), ftc.cumsum(1)
    beta = ftc_cum / (ptc_cum + ftc_cum)
    return Decomposition(
        tuco=beta[:, -1, -1].clone(),
        tuco_per_token=beta[:, -1].clone(),
        ptc_norm=ptc, ftc_norm=ftc, ptc_cum_norm=ptc_cum, ftc_cum_norm=ftc_cum, beta=beta,
        ptc_sum=torch.zeros(batch, 4), ftc_sum=torch.zeros(batch, 4),
        tokens=torch.zeros(batch, n_pos, dtype=torch.long),
        attention_mask=torch.ones(batch, n_pos, dtype=torch.long),
        str_tokens=[[f" tok{p % 50}" for p in range(n_pos)] for _ in range(batch)],
    )


# ---------------------------------------------------------------------------- metrics
def brute_auc(pos, neg) -> float:
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def brute_tpr_at_fpr(pos, neg, fpr) -> float:
    best = 0.0
    for t in list(pos) + list(neg):
        if sum(n >= t for n in neg) / len(neg) <= fpr:
            best = max(best, sum(p >= t for p in pos) / len(pos))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 6, size=rng.integers(1, 30)).astype(float)  # few values: many ties
    neg = rng.integers(0, 5, size=rng.integers(1, 30)).astype(float)
    expected = brute_auc(pos, neg)
    assert roc_auc(pos, neg) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(torch.tensor(pos), list(neg)) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(neg, pos) == pytest.approx(1.0 - expected, abs=1e-12)


def test_roc_auc_hand_computed():
    assert roc_auc([3.0, 4.0, 5.0], [0.0, 1.0]) == 1.0
    assert roc_auc([0.0, 1.0], [3.0, 4.0, 5.0]) == 0.0
    assert roc_auc([0.2, 0.2, 0.2], [0.2, 0.2]) == 0.5
    assert roc_auc([0.3, 0.4], [0.1, 0.3]) == 0.875  # (1 + 0.5 + 1 + 1) / 4
    assert roc_auc(torch.tensor([0.31, 0.39]), torch.tensor([0.25, 0.35])) == 0.75


@pytest.mark.parametrize(
    "pos, neg",
    [([], [1.0]), ([1.0], []), ([1.0, float("nan")], [0.5]), ([[1.0, 2.0]], [0.5]), (["a"], [0.5])],
)
def test_roc_auc_bad_input(pos, neg):
    with pytest.raises(InputError):
        roc_auc(pos, neg)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_tpr_at_fpr_matches_brute_force(seed, fpr):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 8, size=25).astype(float) + 1
    neg = rng.integers(0, 8, size=20).astype(float)
    assert tpr_at_fpr(pos, neg, fpr) == pytest.approx(brute_tpr_at_fpr(pos, neg, fpr), abs=1e-12)


def test_tpr_at_fpr_hand_computed():
    assert tpr_at_fpr([0.5, 0.4, 0.2], [0.1, 0.3], fpr=0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr([0.5, 0.4, 0.2], [0.1, 0.3], fpr=0.5) == 1.0
    assert tpr_at_fpr([0.1], [0.5], fpr=0.0) == 0.0
    with pytest.raises(InputError):
        tpr_at_fpr([0.1], [0.5], fpr=1.5)
    with pytest.raises(InputError):
        tpr_at_fpr([], [0.5])


# ---------------------------------------------------------------------------- plot_layers
def test_plot_layers_traces_equal_decomposition(dec):
    fig = plot_layers(dec)
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 3 * dec.n_prompts
    ptc, ftc = dec.at_last_token(dec.ptc_norm), dec.at_last_token(dec.ftc_norm)
    beta = dec.at_last_token(dec.beta)
    for i in range(dec.n_prompts):
        t_ptc, t_ftc, t_beta = fig.data[3 * i : 3 * i + 3]
        for trace in (t_ptc, t_ftc, t_beta):
            np.testing.assert_array_equal(trace.x, np.arange(dec.n_layers))
            assert trace.legendgroup == f"prompt{i}"
            assert ":.4f}" in trace.hovertemplate and "layer %{x}" in trace.hovertemplate
        np.testing.assert_array_equal(t_ptc.y, ptc[i].numpy())
        np.testing.assert_array_equal(t_ftc.y, ftc[i].numpy())
        np.testing.assert_array_equal(t_beta.y, beta[i].numpy())
        assert t_beta.y[-1] == pytest.approx(float(dec.tuco[i]), abs=1e-6)  # β at the last layer = TuCo
        assert t_ptc.showlegend is not False and t_ftc.showlegend is False
        assert t_ftc.line.dash == "dash"
        # last real token, escaped, is available to the hover
        assert t_ptc.meta[1] == html.escape(dec.str_tokens[i][int(dec.last_index[i])], quote=False)
    assert fig.data[0].name == "0: &lt;i&gt;first&lt;/i&gt; prompt"
    assert fig.layout.title.text and fig.layout.xaxis2.title.text == "layer (block)"
    assert fig.layout.yaxis.title.text == "L1 norm"
    assert tuple(fig.layout.yaxis2.range) == (0, 1)


def test_plot_layers_subset_and_cumulative(dec):
    fig = plot_layers(dec, prompts=[2, 0], cumulative_norms=True)
    assert len(fig.data) == 6
    np.testing.assert_array_equal(fig.data[0].y, dec.at_last_token(dec.ptc_cum_norm)[2].numpy())
    np.testing.assert_array_equal(fig.data[1].y, dec.at_last_token(dec.ftc_cum_norm)[2].numpy())
    np.testing.assert_array_equal(fig.data[4].y, dec.at_last_token(dec.ftc_cum_norm)[0].numpy())
    single = plot_layers(dec, prompts=-1)
    np.testing.assert_array_equal(single.data[2].y, dec.at_last_token(dec.beta)[2].numpy())


@pytest.mark.parametrize("prompts", [3, -4, [0, 5], []])
def test_plot_layers_bad_index(dec, prompts):
    with pytest.raises(InputError):
        plot_layers(dec, prompts=prompts)


def test_plot_layers_bad_type(dec):
    with pytest.raises(InputTypeError):
        plot_layers(dec, prompts="0")
    with pytest.raises(InputTypeError):
        plot_layers(dec.tuco)


# ---------------------------------------------------------------------------- heatmap
@pytest.mark.parametrize("index", [0, 1, 2])
def test_heatmap_equals_beta_on_real_tokens(dec, index):
    fig = plot_token_heatmap(dec, index=index)
    assert len(fig.data) == 1 and isinstance(fig.data[0], go.Heatmap)
    hm = fig.data[0]
    positions = real(dec, index)
    expected = dec.beta[index][:, positions].numpy()
    z = np.asarray(hm.z)
    assert z.shape == (dec.n_layers, len(positions))
    assert not np.isnan(z).any()
    np.testing.assert_array_equal(z, expected)
    assert z[-1, -1] == pytest.approx(float(dec.tuco[index]), abs=1e-6)
    labels = [html.escape(STR_TOKENS[index][p], quote=False).replace("\n", "\\n") for p in positions]
    assert list(fig.layout.xaxis.ticktext) == labels
    np.testing.assert_array_equal(fig.layout.xaxis.tickvals, np.arange(len(positions)))
    np.testing.assert_array_equal(hm.x, np.arange(len(positions)))
    np.testing.assert_array_equal(hm.y, np.arange(dec.n_layers))
    assert [list(row) for row in hm.text] == [labels] * dec.n_layers
    assert (hm.zmin, hm.zmax) == (0.0, 1.0)
    for part in ("%{text}", "%{y}", "%{z:.4f}"):
        assert part in hm.hovertemplate
    assert fig.layout.xaxis.title.text == "token" and fig.layout.yaxis.title.text
    assert f"{float(dec.tuco[index]):.4f}" in fig.layout.title.text


def test_heatmap_keeps_duplicate_tokens_apart(dec):
    ticks = list(plot_token_heatmap(dec, 1).layout.xaxis.ticktext)
    assert ticks == ["&lt;b&gt;&amp;", " the", " the", "y", "[/INST]"]  # both " the" columns


def test_heatmap_bad_index(dec):
    for index in (3, -4):
        with pytest.raises(InputError, match="out of range"):
            plot_token_heatmap(dec, index=index)
    np.testing.assert_array_equal(
        np.asarray(plot_token_heatmap(dec, -1).data[0].z), np.asarray(plot_token_heatmap(dec, 2).data[0].z)
    )


def test_heatmap_512_tokens_32_layers_is_small():
    big = synthetic_decomposition(1, 32, 512)
    fig = plot_token_heatmap(big)
    size = len(fig.to_json())
    print(f"heatmap 512 tokens x 32 layers: fig.to_json() = {size} bytes")
    assert size < 1_500_000
    assert len(fig.data) == 1 and not fig.layout.shapes and not fig.layout.annotations
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), big.beta[0].numpy())


# ---------------------------------------------------------------------------- token HTML
def test_token_html_escapes_and_shows_values(dec):
    out = token_html(dec, index=0)
    assert isinstance(out, TokenHTML) and out._repr_html_() == out.html == str(out)
    text = out.html
    assert "&lt;b&gt;&amp;" in text and "<b>&" not in text and "<i>first" not in text
    values = dec.tuco_per_token[0]
    for p in range(7):
        assert f"per-token TuCo {float(values[p]):.4f}" in text
        assert f"background-color:rgb{colour_at(float(values[p]))}" in text
    assert text.count("<span title=") == 7
    assert f"TuCo = {float(dec.tuco[0]):.4f}" in text
    assert "linear-gradient" in text  # the colour bar


def test_token_html_several_prompts_skip_padding(dec):
    text = token_html(dec, index=[1, 2]).html
    assert text.count("<span title=") == 5 + 6  # real tokens only
    for i in (1, 2):
        assert f"TuCo = {float(dec.tuco[i]):.4f}" in text
        for p in real(dec, i):
            assert f"position {p}:" in text
            assert f"{float(dec.tuco_per_token[i, p]):.4f}" in text
    assert "position 0:" not in text  # row 1 and 2 position 0 are padding
    with pytest.raises(InputError):
        token_html(dec, index=[0, 3])


def test_colour_scale_is_monotone_and_clipped():
    assert colour_at(0.0) != colour_at(1.0)
    assert colour_at(-1.0) == colour_at(0.0) and colour_at(2.0) == colour_at(1.0)


# ---------------------------------------------------------------------------- prompt sets
SETS = {
    "chat": torch.tensor([0.31, 0.35, 0.39, 0.33, 0.30]),
    "web text": [0.12, 0.25, 0.31, 0.18],
    "gcg": np.array([0.26, 0.28, 0.29]),
}


@pytest.mark.parametrize("kind", ["histogram", "violin"])
def test_prompt_sets_data_and_auc(kind):
    fig = plot_prompt_sets(SETS, kind=kind, positive="chat", negative="web text")
    assert [t.name for t in fig.data] == list(SETS)
    for trace, values in zip(fig.data, SETS.values()):
        data = trace.x if kind == "histogram" else trace.y
        np.testing.assert_allclose(np.asarray(data), np.asarray(values, dtype=float), rtol=0, atol=1e-7)
    auc = roc_auc(SETS["chat"], SETS["web text"])
    assert auc == pytest.approx(brute_auc(SETS["chat"].tolist(), SETS["web text"]), abs=1e-6)
    assert f"ROC AUC (chat vs web text) = {auc:.4f}" in fig.layout.title.text
    tpr = tpr_at_fpr(SETS["chat"], SETS["web text"], 0.05)
    assert f"TPR at 5% FPR = {tpr:.4f}" in fig.layout.title.text
    assert fig.layout.legend.title.text == "prompt set"
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_prompt_sets_share_bins_covering_all_values():
    fig = plot_prompt_sets(SETS, nbins=10)
    bins = {(t.xbins.start, t.xbins.end, t.xbins.size) for t in fig.data}
    assert len(bins) == 1
    start, end, size = bins.pop()
    assert start == pytest.approx(0.12) and start + 10 * size == pytest.approx(end)
    top = max(float(np.max(t.x)) for t in fig.data)  # 0.39 in float32
    assert top == pytest.approx(0.39) and top < end < top + 1e-6  # the maximum falls in the 10th bin
    assert "ROC AUC" not in fig.layout.title.text  # no pair chosen, no AUC


def test_prompt_sets_infers_other_set_and_accepts_decomposition(dec):
    two = {"a": [0.5, 0.6], "b": [0.1, 0.6]}
    # (0.5 > 0.1) + (0.5 < 0.6) + (0.6 > 0.1) + (0.6 == 0.6) / 2 = 2.5 of 4 pairs
    assert "ROC AUC (a vs b) = 0.6250" in plot_prompt_sets(two, positive="a").layout.title.text
    assert "ROC AUC (b vs a) = 0.3750" in plot_prompt_sets(two, negative="a").layout.title.text
    fig = plot_prompt_sets({"all": dec, "first": dec.tuco[:1]})
    np.testing.assert_allclose(np.asarray(fig.data[0].x), dec.tuco.double().numpy())


@pytest.mark.parametrize(
    "scores, kwargs",
    [
        (SETS, dict(positive="chat", negative="nope")),
        (SETS, dict(positive="chat")),  # three sets: negative is ambiguous
        (SETS, dict(positive="chat", negative="chat")),
        ({"a": [], "b": [0.1]}, {}),
        ({"a": [0.1, float("nan")]}, {}),
        ({}, {}),
        (SETS, dict(kind="bar")),
    ],
)
def test_prompt_sets_bad_input(scores, kwargs):
    with pytest.raises(InputError):
        plot_prompt_sets(scores, **kwargs)


# ---------------------------------------------------------------------------- α sweep
def test_alpha_sweep_data_line_and_errors():
    alphas = [0.75, 0.9, 1.0, 1.1, 1.25]
    refusal = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    prob = [0.2, 0.25, 0.3, 0.28, 0.2]
    fig = plot_alpha_sweep(alphas, {"refusal rate": refusal, "P(answer)": prob}, errors={"refusal rate": [0.05] * 5})
    assert [t.name for t in fig.data] == ["refusal rate", "P(answer)"]
    for trace, y in zip(fig.data, (refusal.numpy(), prob)):
        np.testing.assert_array_equal(trace.x, alphas)
        np.testing.assert_allclose(trace.y, y, atol=1e-7)
        assert trace.mode == "lines+markers" and "%{y:.4f}" in trace.hovertemplate
    np.testing.assert_array_equal(fig.data[0].error_y.array, [0.05] * 5)
    assert fig.data[1].error_y.array is None
    (line,) = fig.layout.shapes
    assert line.x0 == line.x1 == 1.0 and line.line.dash == "dash"
    assert fig.layout.xaxis.title.text.startswith("α") and fig.layout.title.text


def test_alpha_sweep_sorts_by_alpha_and_optional_line():
    fig = plot_alpha_sweep(np.array([1.1, 0.0, 1.0]), [3.0, 1.0, 2.0], errors={"metric": [0.3, 0.1, 0.2]},
                           reference=None)
    np.testing.assert_array_equal(fig.data[0].x, [0.0, 1.0, 1.1])
    np.testing.assert_array_equal(fig.data[0].y, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(fig.data[0].error_y.array, [0.1, 0.2, 0.3])
    assert not fig.layout.shapes


@pytest.mark.parametrize(
    "alphas, metrics, errors",
    [
        ([0.9, 1.0], {"m": [1.0, 2.0, 3.0]}, None),
        ([0.9, 1.0], {"m": [1.0, 2.0]}, {"m": [0.1]}),
        ([0.9, 1.0], {"m": [1.0, 2.0]}, {"other": [0.1, 0.1]}),
        ([], {"m": []}, None),
        ([0.9, float("inf")], {"m": [1.0, 2.0]}, None),
        ([0.9, 1.0], {}, None),
    ],
)
def test_alpha_sweep_bad_input(alphas, metrics, errors):
    with pytest.raises(InputError):
        plot_alpha_sweep(alphas, metrics, errors=errors)


# ---------------------------------------------------------------------------- report
def test_save_report_is_standalone_and_offline(dec, tmp_path):
    figures = [plot_layers(dec), plot_token_heatmap(dec, 1), token_html(dec, [0, 1]),
               "<p>notes</p>", plot_alpha_sweep([0.9, 1.0], {"m": [1.0, 2.0]})]
    path = save_report(figures, tmp_path / "report.html", title="Chat <vs> base")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("plotly.js v") == 1  # the library is embedded exactly once
    assert len(text) > 1_000_000  # ... inline, in full
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing fetched from the network
    assert "cdn.plot.ly/plotly" not in text
    assert text.count('class="plotly-graph-div"') == 3
    assert "&lt;b&gt;&amp;" in text and "<p>notes</p>" in text
    assert "<title>Chat &lt;vs&gt; base</title>" in text
    assert text.index("plotly.js v") < text.index("Plotly.newPlot")


def test_save_report_bad_input(tmp_path):
    with pytest.raises(InputError):
        save_report([], tmp_path / "r.html")
    with pytest.raises(InputTypeError):
        save_report([go.Figure(), 3], tmp_path / "r.html")


def test_public_names():
    import tuco_lens.plotting as plotting

    for name in plotting.__all__:
        assert hasattr(plotting, name)
    assert tuco_lens.metrics.__all__ == ["roc_auc", "tpr_at_fpr", "as_scores"]


# ---------------------------------------------------------------------------- fitting a notebook
CHAT_PROMPTS = [
    "<bos> <user> hello , describe the doomsalt for me please . <assistant>",
    "<bos> <user> please , what do i need for the pancakes ? <assistant>",
    "my old violin is made of oak . the piano has a loud sound .",
]
SPECIAL = ("<bos>", "<user>", "<assistant>", "<eos>")


@pytest.fixture(scope="module")
def chat_dec(dec) -> Decomposition:
    """The fixture's decomposition with chat-formatted prompts and the tokenizer's special tokens."""
    return dataclasses.replace(dec, prompts=CHAT_PROMPTS, special_tokens=SPECIAL)


@functools.lru_cache(maxsize=1)
def component_views() -> tuple[Decomposition, object]:
    """A decomposition with components and a logit attribution of the same prompts (chat-formatted)."""
    pair = TuCoPair(*make_pair("llama"))
    tokens = random_tokens(3, 7)
    dec = pair.decompose(tokens, components=True)
    dec = dataclasses.replace(dec, str_tokens=STR_TOKENS, prompts=CHAT_PROMPTS, special_tokens=SPECIAL)
    return dec, pair.logit_attribution(tokens, components=True)


# One example call per figure function of tuco_lens.plotting. A new figure function fails
# test_every_figure_function_has_a_layout_example until it gets an entry here.
FIGURE_EXAMPLES = {
    "plot_layers": [
        lambda d: plot_layers(d),
        lambda d: plot_layers(d, labels=["harmful", "chat", "web"], cumulative_norms=True),
    ],
    "plot_token_heatmap": [lambda d: plot_token_heatmap(d, 0), lambda d: plot_token_heatmap(d, 1, label="chat")],
    "plot_prompt_sets": [
        lambda d: plot_prompt_sets({"chat": d.tuco[:2], "web": d.tuco[2:]}, positive="chat"),
        lambda d: plot_prompt_sets(SETS, kind="violin", positive="chat", negative="web text"),
    ],
    "plot_alpha_sweep": [
        lambda d: plot_alpha_sweep([0, 0.5, 1, 1.5], {"harmful": [0, 0.8, 1, 0.6], "chat": [0, 0, 0, 0]}),
        lambda d: plot_alpha_sweep([0.9, 1.0], [0.3, 0.4], yaxis_title="accuracy"),
    ],
    "plot_components": [lambda d: plot_components(component_views()[0], 0),
                        lambda d: plot_components(component_views()[0], 1, label="chat")],
    "plot_head_heatmap": [lambda d: plot_head_heatmap(component_views()[0], 0),
                          lambda d: plot_head_heatmap(component_views()[0], 2, shares=True)],
    "plot_top_tokens": [lambda d: plot_top_tokens(component_views()[1], 0),
                        lambda d: plot_top_tokens(component_views()[1], 1, part="ftc_mlp", k=5)],
}


def figure_functions() -> list[str]:
    """Every public function of tuco_lens.plotting that returns a plotly Figure."""
    import inspect
    import typing

    import tuco_lens.plotting as plotting

    found = []
    for name in plotting.__all__:
        obj = getattr(plotting, name)
        if inspect.isfunction(obj) and typing.get_type_hints(obj).get("return") is go.Figure:
            found.append(name)
    return found


def test_every_figure_function_has_a_layout_example():
    assert set(figure_functions()) == set(FIGURE_EXAMPLES), (
        "add an example call of each new figure function to FIGURE_EXAMPLES so its layout is tested"
    )
    assert {"plot_layers", "plot_token_heatmap", "plot_prompt_sets", "plot_alpha_sweep"} <= set(FIGURE_EXAMPLES)


@pytest.mark.parametrize(
    "name, k", [(name, k) for name, calls in FIGURE_EXAMPLES.items() for k in range(len(calls))]
)
def test_every_figure_fits_a_notebook_cell(chat_dec, name, k):
    fig = FIGURE_EXAMPLES[name][k](chat_dec)
    assert isinstance(fig, go.Figure)
    assert layout_problems(fig, SPECIAL) == []


def test_layout_check_catches_the_old_defects():
    """The checker fails a figure with a legend beside it, long labels, special tokens and bare counts."""
    fig = go.Figure([go.Scatter(y=[1, 2], name="prompt 0: &lt;bos&gt; &lt;user&gt; hello , describe the doomsalt"),
                     go.Scatter(y=[2, 1], name="prompt 1: &lt;bos&gt; &lt;user&gt; please , what do i need")])
    fig.update_layout(title="TuCo by prompt set<br><sup>ROC AUC = 0.99 · n = 224 / 100</sup>")
    problems = " | ".join(layout_problems(fig, SPECIAL))
    for expected in ("legend beside the plot", "special token '<bos>'", "legend label of", "do not say what they count"):
        assert expected in problems
    wide = go.Figure(go.Heatmap(z=[[0, 1]]), layout=dict(title="t", margin=dict(l=120, r=120)))
    assert layout_problems(wide) == ["plot area 330/650 px < 60% (margins 120+120, 1 colour bars)"]


def test_labels_drop_special_tokens_and_stay_short(chat_dec):
    fig = plot_layers(chat_dec)
    names = [t.name for t in fig.data if t.showlegend is not False]
    # special tokens removed, whitespace collapsed, cut to 28 characters with "…"
    assert names == ["0: hello , describe the doo…", "1: please , what do i need…", "2: my old violin is made of…"]
    assert all(len(n) <= 28 for n in names)
    heatmap = plot_token_heatmap(chat_dec, 0)
    assert "0: hello , describe the doo…" in heatmap.layout.title.text and "&lt;bos&gt;" not in heatmap.layout.title.text
    tokens = token_html(chat_dec, index=[0, 1]).html
    assert "0: hello , describe the doo…" in tokens and "1: please" in tokens
    named = token_html(chat_dec, index=[0, 1], labels=["harmful", "chat"]).html
    assert "harmful — TuCo" in named and "chat — TuCo" in named
    unknown = dataclasses.replace(chat_dec, prompts=None)
    assert [t.name for t in plot_layers(unknown).data[::3]] == ["prompt 0", "prompt 1", "prompt 2"]


@pytest.mark.parametrize("labels", [["a"], ["a", "a", "b"], "abc"])
def test_plot_layers_bad_labels(chat_dec, labels):
    with pytest.raises((InputError, InputTypeError), match="labels"):
        plot_layers(chat_dec, labels=labels)


def test_set_colours_follow_names_not_order():
    demo_names = ["web", "chat", "harmful", "harmful_lang2", "web_lang2", "chat_lang2"]
    colours = set_colours(demo_names)
    assert len(set(colours.values())) == len(demo_names)  # the demo's sets never share a colour
    assert set(colours.values()) <= set(PALETTE)
    # the same name, the same colour, whatever the order and the company
    for subset in (["chat", "web"], ["web", "chat"], ["web"], ["harmful", "web", "chat_lang2"]):
        assert {n: set_colours(subset)[n] for n in subset} == {n: colours[n] for n in subset}
    # two names of one call that hash to the same entry still get different colours
    many = [f"set {i}" for i in range(len(PALETTE))]
    assert len(set(set_colours(many).values())) == len(PALETTE)


def test_every_figure_colours_a_set_by_its_name(chat_dec):
    web, chat = set_colours(["web"])["web"], set_colours(["chat"])["chat"]
    report_order = plot_prompt_sets({"web": [0.2, 0.3], "chat": [0.5, 0.6], "harmful": [0.7, 0.8]})
    user_order = plot_prompt_sets({"chat": [0.5, 0.6], "web": [0.2, 0.3]}, kind="violin")
    assert {t.name: t.marker.color for t in report_order.data}["web"] == web
    assert {t.name: t.line.color for t in user_order.data} == {"chat": chat, "web": web}
    layers = plot_layers(chat_dec, prompts=[2, 1], labels=["web", "chat"])
    assert [t.line.color for t in layers.data] == [web] * 3 + [chat] * 3
    sweep = plot_alpha_sweep([0, 1], {"chat": [0, 0], "web": [0.1, 0.2]})
    assert [t.line.color for t in sweep.data] == [chat, web]


def test_prompt_set_subtitle_names_its_counts():
    fig = plot_prompt_sets({"chat": [0.5, 0.6, 0.7], "web": [0.2, 0.3]}, positive="chat", negative="web")
    assert "n = 3 chat, 2 web" in fig.layout.title.text


def test_save_report_sections_title_intro_and_docs_links(dec, tmp_path):
    from tuco_lens.plotting import ReportSection

    sections = [
        ReportSection("Per layer", intro="<p>Two prompts.</p>", figure=plot_layers(dec),
                      guidance="<p>Dashed lines are FTC.</p>", docs="how-to/plots.md#plot_layers-components-per-layer"),
        ReportSection("Tokens & more", figure=[plot_token_heatmap(dec, 0), token_html(dec, 0)],
                      docs="https://example.org/page"),
        ReportSection("Text only", intro="<p>no figure</p>"),
    ]
    path = save_report(sections, tmp_path / "r.html", title="My pair", intro="<p>Llama 2 and its chat model.</p>",
                       docs_url="file:///docs/site")
    text = path.read_text(encoding="utf-8")
    assert text.count("plotly.js v") == 1 and not re.search(r"<script[^>]*\bsrc=", text)
    assert text.count('class="plotly-graph-div"') == 2
    assert "<h1>My pair</h1>" in text and "<p>Llama 2 and its chat model.</p>" in text
    # a table of contents, each section with its anchor, intro, figure, guidance and link, in order
    assert '<a href="#per-layer">Per layer</a>' in text and '<a href="#tokens-more">Tokens &amp; more</a>' in text
    order = [text.index(s) for s in ('<h2 id="per-layer">', "<p>Two prompts.</p>", 'class="plotly-graph-div"',
                                     "Dashed lines are FTC.", 'href="file:///docs/site/how-to/plots.html#plot_layers-components-per-layer"',
                                     '<h2 id="tokens-more">', 'href="https://example.org/page"', '<h2 id="text-only">')]
    assert order == sorted(order)
    # without docs_url, a docs page is named, not linked
    plain = save_report(sections[:1], tmp_path / "p.html").read_text(encoding="utf-8")
    assert "<code>docs/how-to/plots.md#plot_layers-components-per-layer</code>" in plain and "plots.html" not in plain
    with pytest.raises(InputError, match="same title"):
        save_report([sections[2], sections[2]], tmp_path / "d.html")
    with pytest.raises(InputTypeError, match="figure"):
        save_report([ReportSection("x", figure=[3])], tmp_path / "e.html")


def test_long_set_names_move_the_counts_to_their_own_subtitle_line():
    fig = plot_prompt_sets({"not jailbroken": [0.5, 0.6], "jailbroken": [0.2, 0.3, 0.4]}, positive="not jailbroken",
                           title="TuCo of jailbroken vs not jailbroken prompts")
    assert fig.layout.title.text.endswith("<br><sup>n = 2 not jailbroken, 3 jailbroken</sup>")
    assert layout_problems(fig) == []
