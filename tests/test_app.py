"""The functions behind the app's views, without Gradio: they return the pair's own numbers.

Every view is checked against the verb it wraps (``pair.decompose`` / ``pair.tuco`` /
``pair.generate``) and an independent computation where there is one (ROC AUC by counting
pairs). Runs on both backends (the demo pair loads as a TransformerBridge on transformer-lens 4).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tuco_lens import demo
from tuco_lens.app import (
    ANALYZE_PANELS,
    AnalyzePanel,
    AppDefaults,
    PanelRegistry,
    alpha_from_inputs,
    analyze,
    compare,
    format_alpha,
    parse_alpha,
    prompt_list,
    render_panels,
    require_gradio,
    steer,
)
from tuco_lens.app.analyze import headline_html as analyze_headline
from tuco_lens.app.compare import headline_html as compare_headline
from tuco_lens.errors import AlphaError, InputError, InputTypeError, MissingDependencyError, TuCoError
from tuco_lens.plotting import (
    plot_components,
    plot_layers,
    plot_prompt_sets,
    plot_token_heatmap,
    plot_top_tokens,
    token_html,
)

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

REQUEST = "hello , describe the doomsalt ."
ROOT = Path(__file__).resolve().parents[1]


def figure_json(figure) -> dict:
    """A figure as plain JSON (plotly < 6 keeps numpy arrays in ``to_plotly_json``, which ``==`` cannot compare)."""
    return json.loads(figure.to_json())


@pytest.fixture(scope="module")
def pair():
    return demo.load_pair()


def _outcome(call):
    """The value of ``call()``, or its error's type and message."""
    try:
        return ("value", call())
    except TuCoError as error:
        return (type(error), str(error))


# ---------------------------------------------------------------- Analyze
@pytest.mark.parametrize("chat_template", [True, False])
def test_analyze_returns_the_decomposition_of_the_prompt(pair, chat_template):
    result = analyze(pair, REQUEST, chat_template=chat_template)
    dec = pair.decompose([REQUEST], chat_template=chat_template)
    assert result.tuco == float(dec.tuco[0])
    assert result.tuco == pytest.approx(float(pair.tuco(REQUEST, chat_template=chat_template)[0]), abs=1e-6)
    ids = pair.tokenize(REQUEST, chat_template=chat_template).tokens[0].tolist()
    assert result.tokens == [pair.tokenizer.decode([i]) for i in ids]
    assert result.tuco_per_token == pytest.approx(dec.tuco_per_token[0].tolist(), abs=0)
    # identity: per-token TuCo at the last token is the prompt's TuCo
    assert result.tuco_per_token[-1] == pytest.approx(result.tuco, abs=1e-7)
    table = result.to_dataframe()
    assert table.token.tolist() == result.tokens and table.position.tolist() == list(range(len(ids)))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["tuco"] == result.tuco and data["tuco_per_token"] == result.tuco_per_token
    assert data["chat_template"] is chat_template and data["norm"] == "l1"


def test_the_chat_template_changes_what_is_scored(pair):
    plain, chat = analyze(pair, REQUEST), analyze(pair, REQUEST, chat_template=True)
    assert chat.tokens[:2] == ["<bos>", "<user>"] and chat.tokens[-1] == "<assistant>"
    assert plain.tokens[-1] == "."
    assert plain.tuco != pytest.approx(chat.tuco, abs=1e-3)


def test_analyze_errors_are_the_pairs(pair):
    for prompt in ("", "the " * 400):
        got = _outcome(functools.partial(analyze, pair, prompt))
        assert got == _outcome(functools.partial(pair.decompose, [prompt]))
        assert got[0] is InputError
    with pytest.raises(InputTypeError, match="must be a string"):
        analyze(pair, ["a", "b"])


def test_analyze_headline_shows_tuco_and_escapes_tokens(pair):
    result = analyze(pair, REQUEST, chat_template=True)
    text = analyze_headline(result)
    assert f"TuCo = {result.tuco:.4f}" in text and f"PreCo = {1 - result.tuco:.4f}" in text
    assert f"{len(result.tokens)} tokens" in text
    assert "<code>&lt;assistant&gt;</code>" in text and "<assistant>" not in text


def test_default_panels_draw_the_plotting_functions(pair):
    assert ANALYZE_PANELS.names() == ["tokens", "layers", "heatmap", "components", "heads", "top_tokens"]
    result = analyze(pair, REQUEST, chat_template=True)
    rendered = render_panels(result, ANALYZE_PANELS.for_pair(pair))
    assert list(rendered) == ["tokens", "layers", "heatmap", "components", "heads", "top_tokens"]
    dec = result.decomposition
    assert rendered["tokens"] == token_html(dec, 0).html
    assert rendered["tokens"].count("<span title=") == len(result.tokens)
    for value, _ in zip(result.tuco_per_token, result.tokens):
        assert f"per-token TuCo {value:.4f}" in rendered["tokens"]
    assert figure_json(rendered["layers"]) == figure_json(plot_layers(dec, 0))
    assert figure_json(rendered["heatmap"]) == figure_json(plot_token_heatmap(dec, 0))
    # the split inside the blocks: the same numbers as the library's own call
    whole = pair.decompose([REQUEST], chat_template=True, components=True)
    assert figure_json(rendered["components"]) == figure_json(plot_components(whole, 0))
    torch.testing.assert_close(torch.tensor(rendered["heads"].data[0].z), whole.head_shares()[0].float())
    attr = pair.logit_attribution([REQUEST], chat_template=True, components=True)
    assert figure_json(rendered["top_tokens"]) == figure_json(plot_top_tokens(attr, 0, part="ftc", k=8))
    shares = result.to_dict()["tuco_shares"]
    assert sum(shares.values()) == pytest.approx(result.tuco, abs=1e-6)


def test_prompt_text_is_escaped_in_every_panel(pair):
    prompt = '<img src=x onerror="alert(1)"> hello'
    result = analyze(pair, prompt)
    rendered = render_panels(result, ANALYZE_PANELS.for_pair(pair))
    assert "<img" not in rendered["tokens"] and "&lt;img" in rendered["tokens"]
    for name in ("layers", "heatmap", "components", "heads", "top_tokens"):
        assert "<img" not in json.dumps(figure_json(rendered[name]))
    assert "<img" not in analyze_headline(result)


# ---------------------------------------------------------------- the panel registry
def _table_panel(name="table", **kwargs):
    return AnalyzePanel(name, "Per-token TuCo", "html", lambda result: result.to_dataframe().to_html(), **kwargs)


def test_panel_registry_places_checks_and_filters_panels(pair):
    registry = PanelRegistry(list(ANALYZE_PANELS))
    registry.register(_table_panel(), after="layers")
    registry.register(_table_panel("needs-split", available=lambda p: hasattr(p, "no_such_method")))
    assert registry.names() == ["tokens", "layers", "table", "heatmap", "components", "heads", "top_tokens", "needs-split"]
    assert [p.name for p in registry.for_pair(pair)] == ["tokens", "layers", "table", "heatmap", "components", "heads",
                                                        "top_tokens"]
    result = analyze(pair, REQUEST)
    rendered = render_panels(result, registry.for_pair(pair))
    assert rendered["table"] == result.to_dataframe().to_html()
    with pytest.raises(InputError, match="registered already"):
        registry.register(_table_panel())
    with pytest.raises(InputError, match="No Analyze panel named 'nope'"):
        registry.register(_table_panel("other"), after="nope")
    assert registry.unregister("table").name == "table" and "table" not in registry.names()
    with pytest.raises(InputError, match="kind must be"):
        AnalyzePanel("x", "x", "table", lambda r: "")
    with pytest.raises(InputError, match="HTML id"):
        AnalyzePanel("a b", "x", "html", lambda r: "")
    wrong = AnalyzePanel("wrong", "x", "plot", lambda r: "<p>not a figure</p>")
    with pytest.raises(InputError, match="returned a str, not a Figure"):
        render_panels(result, [wrong])
    assert ANALYZE_PANELS.names() == ["tokens", "layers", "heatmap", "components", "heads", "top_tokens"]  # the global one is untouched


# ---------------------------------------------------------------- Steer
def test_parse_alpha_reads_every_form():
    assert parse_alpha("0.5") == 0.5 and parse_alpha(" -1 ") == -1.0 and parse_alpha(2) == 2.0
    assert parse_alpha("0, 0.5 1 1") == [0.0, 0.5, 1.0, 1.0]
    assert parse_alpha("attn=0.5, mlp=1") == {"attn": 0.5, "mlp": 1.0}
    assert parse_alpha("attn = 0.5 mlp: 1.25") == {"attn": 0.5, "mlp": 1.25}
    assert np.isnan(parse_alpha("nan"))  # read here, refused by the pair
    for bad, message in (("", "empty"), ("abc", "'abc' is not a number"), ("attn=0.5 1", "mix"),
                         ("attn=1 attn=2", "given twice"), ("attn=x", "'x' is not a number")):
        with pytest.raises(AlphaError, match=message):
            parse_alpha(bad)
    with pytest.raises(AlphaError):
        parse_alpha(True)
    assert alpha_from_inputs(0.5, "") == 0.5 and alpha_from_inputs(0.5, "  ") == 0.5
    assert alpha_from_inputs(0.5, None) == 0.5 and alpha_from_inputs(0.5, "1.5") == 1.5
    assert format_alpha(0.5) == "0.5" and format_alpha([0.0, 1.0]) == "[0, 1]"
    assert format_alpha({"attn": 0.5, "mlp": 1.0}) == "attn=0.5 mlp=1"


@pytest.mark.parametrize("alpha", ["0.5", 0.25, "0 0.5 1 1.5"])
def test_steer_columns_are_the_pairs_generations(pair, alpha):
    result = steer(pair, REQUEST, alpha, max_new_tokens=12, chat_template=True)
    chosen = parse_alpha(alpha)
    expected = [pair.generate(REQUEST, alpha=a, max_new_tokens=12, chat_template=True) for a in (0.0, chosen, 1.0)]
    assert [g.text for g in result.generations] == expected
    assert [g.alpha for g in result.generations] == [0.0, chosen, 1.0]
    assert [g.role for g in result.generations] == ["pre-trained blocks", "chosen", "fine-tuned"]
    assert result.generations[1].label == f"α = {format_alpha(chosen)} (chosen)"
    assert result.to_dataframe().text.tolist() == expected
    assert json.loads(json.dumps(result.to_dict()))["generations"][2]["text"] == expected[2]


def test_steer_on_the_demo_shows_refusal_and_answer(pair):
    texts = [g.text for g in steer(pair, REQUEST, 0.5, max_new_tokens=12, chat_template=True).generations]
    assert texts[2] == demo.REFUSAL[: len(texts[2])] and demo.is_refusal(texts[2])
    assert not demo.is_refusal(texts[0])


class _CountingPair:
    def __init__(self, pair):
        self.pair, self.alphas = pair, []

    def generate(self, prompt, **kwargs):
        self.alphas.append(kwargs["alpha"])
        return self.pair.generate(prompt, **kwargs)


def test_steer_generates_the_chosen_alpha_first_and_once(pair):
    counting = _CountingPair(pair)
    steer(counting, REQUEST, "1", max_new_tokens=4)
    assert counting.alphas == [1.0, 0.0]
    counting.alphas.clear()
    with pytest.raises(AlphaError):
        steer(counting, REQUEST, "nan", max_new_tokens=4)
    assert len(counting.alphas) == 1 and np.isnan(counting.alphas[0])  # nothing else was generated


def test_steer_errors_are_the_pairs(pair):
    for alpha in ("nan", "inf", "0 1", {"attn": 0.5, "mlp": 1.0}):
        value = parse_alpha(alpha) if isinstance(alpha, str) else alpha
        got = _outcome(functools.partial(steer, pair, REQUEST, alpha, max_new_tokens=4))
        reference = _outcome(functools.partial(pair.generate, REQUEST, alpha=value, max_new_tokens=4))
        if reference[0] == "value":  # a tuco_lens that takes this α: the chosen column is the pair's
            assert got[1].generations[1].text == reference[1]
        else:
            assert got == reference and got[0] is AlphaError
    assert _outcome(lambda: steer(pair, "", 0.5)) == _outcome(lambda: pair.generate("", max_new_tokens=20))
    with pytest.raises(InputError, match="exceeds the model's context"):
        steer(pair, REQUEST, 0.5, max_new_tokens=pair.ft.cfg.n_ctx)
    for budget, error, message in ((0, InputError, "at least 1"), (2.5, InputError, "whole number"),
                                   ("3", InputTypeError, "whole number")):
        with pytest.raises(error, match=message):
            steer(pair, REQUEST, 0.5, max_new_tokens=budget)
    assert steer(pair, REQUEST, 0.5, max_new_tokens=3.0).max_new_tokens == 3


# ---------------------------------------------------------------- Compare
def test_compare_scores_are_pair_tuco_and_auc_counts_pairs(pair):
    sets = demo.prompt_sets()
    chat, web = sets["chat"][:10], sets["web"][:7]
    result = compare(pair, chat, web, names=("chat", "web"), batch_size=3)
    np.testing.assert_allclose(result.scores[0], pair.tuco(chat).double().numpy(), atol=1e-6)
    np.testing.assert_allclose(result.scores[1], pair.tuco(web).double().numpy(), atol=1e-6)
    a, b = result.scores[0][:, None], result.scores[1][None, :]
    assert result.auc == pytest.approx(float(((a > b) + 0.5 * (a == b)).mean()), abs=1e-12)
    table = result.to_dataframe()
    assert table.set.tolist() == ["chat"] * 10 + ["web"] * 7
    assert table.prompt.tolist() == chat + web and table["index"].tolist() == list(range(10)) + list(range(7))
    assert table.tuco.tolist() == result.scores[0].tolist() + result.scores[1].tolist()
    reference = plot_prompt_sets({"chat": result.scores[0], "web": result.scores[1]}, positive="chat", negative="web")
    assert figure_json(result.figure()) == figure_json(reference)
    headline = compare_headline(result)
    assert f"ROC AUC (chat above web) = {result.auc:.4f}" in headline
    assert json.loads(json.dumps(result.to_dict()))["auc"] == result.auc


def test_compare_with_the_chat_template_and_escaped_names(pair):
    requests = ["describe the doomsalt .", "tell me about the fox ."]
    result = compare(pair, requests, ["the fox"], names=("<b>x</b>", "y"), chat_template=True)
    np.testing.assert_allclose(result.scores[0], pair.tuco(requests, chat_template=True).double().numpy(), atol=1e-6)
    assert "<b>x</b>" not in compare_headline(result) and "&lt;b&gt;x&lt;/b&gt;" in compare_headline(result)


def test_compare_errors(pair):
    with pytest.raises(InputError, match="different names"):
        compare(pair, ["a"], ["b"], names=("s", "s"))
    with pytest.raises(InputError, match="non-empty names"):
        compare(pair, ["a"], ["b"], names=("s", " "))
    with pytest.raises(InputError, match="Set 'B' has no prompt"):
        compare(pair, ["a"], [])
    with pytest.raises(InputTypeError, match="list of prompts"):
        compare(pair, "a", ["b"])
    assert _outcome(lambda: compare(pair, ["a", ""], ["b"])) == _outcome(lambda: pair.tuco(["a", ""]))


def test_prompt_lists_from_text_and_files(tmp_path):
    assert prompt_list("A", "one\n\n  \ntwo ?\n") == ["one", "two ?"]
    txt = tmp_path / "set.txt"
    txt.write_text("first\n\nsecond\n", encoding="utf-8")
    assert prompt_list("A", None, txt) == ["first", "second"]
    assert prompt_list("A", "", str(txt)) == ["first", "second"]  # an empty box next to a file
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text('{"prompt": "x <y>", "label": 1}\n{"prompt": "z"}\n', encoding="utf-8")
    assert prompt_list("B", None, jsonl) == ["x <y>", "z"]
    with pytest.raises(InputError, match="not both"):
        prompt_list("A", "one", txt)
    with pytest.raises(InputError, match="Set 'A' has no prompt"):
        prompt_list("A", " \n", None)
    bad = tmp_path / "set.csv"
    bad.write_text("a\n")
    with pytest.raises(InputError, match="Set 'A': .*unknown extension"):
        prompt_list("A", None, bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(InputError, match="Set 'B': "):
        prompt_list("B", None, broken)


# ---------------------------------------------------------------- defaults, optional dependency, CLI
def test_demo_defaults_come_from_the_demo_world():
    defaults = AppDefaults.for_demo(n_per_set=5)
    sets = demo.prompt_sets()
    assert defaults.positive.splitlines() == sets["chat"][:5] and defaults.negative.splitlines() == sets["web"][:5]
    assert defaults.chat_template and not defaults.compare_chat_template
    assert AppDefaults().analyze_prompt == "" and not AppDefaults().chat_template


def test_missing_gradio_is_a_clear_error(monkeypatch, capsys):
    import importlib.util

    from tuco_lens.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r'pip install "tuco_lens\[app\]"'):
        require_gradio()

    def no_loading(**kwargs):
        raise AssertionError("the models were loaded before the missing dependency was reported")

    monkeypatch.setattr(demo, "load_pair", no_loading)
    assert main(["app", "--demo"]) == 2
    assert 'tuco-lens app: error: the app needs the optional dependency Gradio: pip install "tuco_lens[app]"' in (
        capsys.readouterr().err
    )


def test_app_command_help_and_arguments(monkeypatch, capsys):
    import tuco_lens.app
    from tuco_lens.cli import main

    monkeypatch.setattr(tuco_lens.app, "require_gradio", lambda: None)  # also without Gradio
    with pytest.raises(SystemExit):
        main(["app", "--help"])
    text = capsys.readouterr().out
    for option in ("--demo", "--pt", "--ft", "--host", "--port", "--chat-template", "127.0.0.1", "7860"):
        assert option in text
    assert main(["app", "--demo", "--port", "0"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    assert main(["app", "--pt", "x"]) == 2
    assert "both --pt and --ft are required" in capsys.readouterr().err


def test_building_the_parser_imports_no_gradio():
    code = "import sys; from tuco_lens.cli import build_parser; build_parser(); import tuco_lens.app; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
