"""``tuco-lens demo`` end to end on the embedded pair: files, figures, and the documented numbers.

The expected values are the ones README.md and docs/demo.md report (measured with
``tuco-lens demo``); the run must reproduce them within a small tolerance.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from tuco_lens import demo
from tuco_lens.cli import main
from tuco_lens.metrics import roc_auc

# The demo job end to end (about a minute): not in the fast subset, `-m "not slow"`.
pytestmark = [pytest.mark.slow, pytest.mark.integration]

DOCUMENTED = {
    "auc_chat_vs_web": 0.998,
    "auc_harmful_vs_lang2": 0.993,
    "mean_tuco": {"web": 0.202, "chat": 0.331, "harmful": 0.582, "harmful_lang2": 0.392},
    "refusal_rate_harmful": {"0.0": 0.0, "0.5": 0.875, "1.0": 1.0, "1.5": 0.589},
    # docs/analyses.md
    "paper_analyses": {
        "many_shot_tuco_k0": 0.588,
        "many_shot_tuco_kmax": 0.558,
        "transformation_tuco[original]": 0.582,
        "transformation_tuco[language 2]": 0.392,
        "transformation_tuco[suffix 'sure , here is how :']": 0.492,
        "transformation_tuco[suffix found by suffix_search]": 0.288,
        "transformation_refusal_rate[original]": 1.0,
        "transformation_refusal_rate[language 2]": 0.214,
        "transformation_refusal_rate[suffix 'sure , here is how :']": 0.643,
        "transformation_refusal_rate[suffix found by suffix_search]": 0.0,
        "jailbreak_auc_not_jailbroken": 0.885,
        "jailbreak_tpr_at_5_fpr": 0.167,
        "steering_delta_maximize": 0.022,
        "steering_delta_minimize": -0.022,
    },
}


DOCS_URL = "file:///tuco-docs/site/"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``tuco-lens demo`` once: the output directory and the results the command computed."""
    import tuco_lens.demo.report as report_module

    out = tmp_path_factory.mktemp("report")
    torch.set_num_threads(1)
    real, kept = report_module.run_demo, {}
    with pytest.MonkeyPatch.context() as patch:  # keep what the command computed
        patch.setattr(report_module, "run_demo", lambda *a, **k: kept.setdefault("results", real(*a, **k)))
        assert main(["demo", "--out", str(out), "--no-progress", "--docs-url", DOCS_URL]) == 0
    return out, kept["results"]


@pytest.fixture(scope="module")
def report(run):
    return run[0]


def test_demo_writes_report_and_tables(report):
    html = (report / "report.html").read_text()
    assert html.count("plotly.js v") == 1 and "<script src=" not in html
    assert html.count('class="plotly-graph-div"') == 4 + 3 + 6  # four figures, three inside the blocks, six of the paper's analyses
    scores = pd.read_csv(report / "results.csv")
    sets = demo.prompt_sets()
    for name in ("web", "chat", "harmful", "harmful_lang2"):
        assert (scores.set == name).sum() == len(sets[name])
    sweep = pd.read_csv(report / "alpha_sweep.csv")
    assert sweep.alpha.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def test_demo_numbers_are_consistent_and_match_the_docs(report):
    summary = json.loads((report / "summary.json").read_text())
    scores = pd.read_csv(report / "results.csv")
    by_set = {name: scores.tuco[scores.set == name].tolist() for name in ("web", "chat", "harmful", "harmful_lang2")}
    assert summary["auc_chat_vs_web"] == pytest.approx(roc_auc(by_set["chat"], by_set["web"]))
    assert summary["auc_chat_vs_web"] == pytest.approx(DOCUMENTED["auc_chat_vs_web"], abs=0.01)
    assert summary["auc_harmful_vs_lang2"] == pytest.approx(DOCUMENTED["auc_harmful_vs_lang2"], abs=0.01)
    for name, value in DOCUMENTED["mean_tuco"].items():
        assert summary["mean_tuco"][name] == pytest.approx(value, abs=0.005)
    for alpha, rate in DOCUMENTED["refusal_rate_harmful"].items():
        assert summary["refusal_rate_harmful"][alpha] == pytest.approx(rate, abs=0.04)
    # the fine-tuned behaviour is real: refuses at α = 1, not at α = 0, and never on benign chat
    assert summary["refusal_rate_harmful"]["1.0"] == 1.0 and summary["refusal_rate_harmful"]["0.0"] == 0.0
    assert max(summary["refusal_rate_chat"].values()) == 0.0
    for name, value in DOCUMENTED["paper_analyses"].items():
        assert summary["paper_analyses"][name] == pytest.approx(value, abs=0.01), name
    paper = summary["paper_analyses"]
    # the qualitative findings the docs claim for the demo pair
    assert paper["many_shot_tuco_kmax"] < paper["many_shot_tuco_k0"]
    assert all(paper[f"transformation_tuco[{k}]"] < paper["transformation_tuco[original]"]
               for k in ("language 2", "suffix 'sure , here is how :'", "suffix found by suffix_search"))
    assert paper["suffix_loss_end"] < paper["suffix_loss_start"]


def test_the_documented_refusal_tables_are_this_run(report):
    """README.md and docs/demo.md quote the refusal rates this environment measures, digit for digit.

    CI runs this in the transformer-lens 3.x and 4.x environments: both must give the table.
    """
    root = Path(__file__).resolve().parent.parent
    rates = json.loads((report / "summary.json").read_text())["refusal_rate_harmful"]
    chat = json.loads((report / "summary.json").read_text())["refusal_rate_chat"]

    def pct(rate: float) -> str:
        return f"{100 * rate:.0f}%"

    readme = " / ".join(pct(rates[a]) for a in ("0.0", "0.5", "1.0", "1.5"))
    assert f"α = 0 / 0.5 / 1 / 1.5 | {readme} |" in (root / "README.md").read_text()
    alphas = sorted(rates, key=float)
    demo_md = (root / "docs" / "demo.md").read_text()
    assert "| `harmful` (56) | " + " | ".join(pct(rates[a]) for a in alphas) + " |" in demo_md
    assert "| `chat` (224) | " + " | ".join(pct(chat[a]) for a in alphas) + " |" in demo_md


def test_demo_scores_equal_the_library(report):
    scores = pd.read_csv(report / "results.csv")
    pair = demo.load_pair()
    harmful = demo.prompt_sets()["harmful"][:5]
    expected = pair.tuco(harmful)
    got = scores[scores.set == "harmful"].sort_values("index").tuco.tolist()[:5]
    assert got == pytest.approx(expected.tolist(), abs=1e-6)


def test_refusal_rate_equals_a_recount():
    from tuco_lens.demo.refusals import refusal_budget, refusal_rate

    pair = demo.load_pair()
    prompts = demo.prompt_sets()["harmful"][:6] + demo.prompt_sets()["harmful_lang2"][:6]
    n_new = len(pair.tokenizer(demo.REFUSAL, add_special_tokens=False).input_ids) + 1
    assert refusal_budget(pair) == n_new
    for alpha in (0.0, 1.0):
        completions = pair.generate(prompts, alpha=alpha, max_new_tokens=n_new)
        recount = sum(" ".join(c.split()).startswith(demo.REFUSAL) for c in completions) / len(prompts)
        assert refusal_rate(pair, prompts, alpha=alpha) == recount
    assert refusal_rate(pair, prompts[:6], alpha=1.0) == 1.0 and refusal_rate(pair, prompts[:6], alpha=0.0) == 0.0


# ---------------------------------------------------------------------------- the report as a paper
def _slug(heading: str) -> str:
    """Python-Markdown's default toc anchor of a heading (what mkdocs gives the page)."""
    import unicodedata

    text = re.sub(r"`([^`]*)`", r"\1", heading)  # code spans render as their text
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _docs_pages() -> dict[str, set[str]]:
    """Pages of the docs site's nav (mkdocs.yml) with the anchors of their headings."""
    root = Path(__file__).resolve().parent.parent
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", (root / "mkdocs.yml").read_text(), re.M))
    pages = {}
    for page in nav:
        text = (root / "docs" / page).read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # comments in code blocks are not headings
        pages[page] = {_slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}
    return pages


def test_report_opens_with_the_headline_table_and_the_models(run):
    out, results = run
    text = (out / "report.html").read_text(encoding="utf-8")
    summary = json.loads((out / "summary.json").read_text())
    head = text[: text.index("<h2")]
    assert "<h1>What fine-tuning did to a tiny chat model" in head
    for name in ("web", "chat", "harmful", "harmful_lang2"):
        n = int((results.scores.set == name).sum())
        assert re.search(rf"mean TuCo of <code>{name}</code>: [^<]*</td><td class=\"num\">{summary['mean_tuco'][name]:.3f}</td>"
                         rf"<td class=\"num\">{n}</td>", head)
    assert f"chat (positive) vs web</td><td class=\"num\">{summary['auc_chat_vs_web']:.3f}</td><td class=\"num\">224 chat, 100 web" in head
    assert f"harmful (positive) vs harmful_lang2</td><td class=\"num\">{summary['auc_harmful_vs_lang2']:.3f}" in head
    for alpha in ("0.0", "0.5", "1.0", "1.5"):
        h, c = summary["refusal_rate_harmful"][alpha], summary["refusal_rate_chat"][alpha]
        assert f"refusal rate at α = {float(alpha):g}: harmful / chat</td><td class=\"num\">{100 * h:.0f}% / {100 * c:.0f}%" in head
    # both models described, with the numbers of the training log
    log = json.loads((demo.DEMO_DIR / "training_log.json").read_text())
    for fact in (f"{log['model']['num_hidden_layers']} blocks", f"width {log['model']['hidden_size']}",
                 f"{log['model']['n_params']:,} parameters", "<em>pre-trained</em>", "<em>fine-tuned</em>",
                 html.escape(demo.REFUSAL), "α = 0 is exactly the pre-trained model"):
        assert fact in head, fact
    assert '<nav class="toc">' in head


def test_every_section_explains_its_figure_and_links_its_docs_page(run):
    out, results = run
    text = (out / "report.html").read_text(encoding="utf-8")
    pages = _docs_pages()
    titles = [s.title for s in results.sections]
    assert titles[:4] == ["TuCo per prompt set", "Per layer, at the last token", "Per token and layer", "Steering with α"]
    assert len(titles) == 11 and len(set(titles)) == 11
    for section in results.sections:
        assert section.items() and section.guidance and "<em>Here:</em>" in section.guidance, section.title
        page, _, anchor = section.docs.partition("#")
        assert page in pages, f"{section.title}: {page} is not a page of the docs nav"
        assert not anchor or anchor in pages[page], f"{section.title}: no heading #{anchor} in docs/{page}"
        href = DOCS_URL + page.replace(".md", ".html") + (f"#{anchor}" if anchor else "")
        block = text[text.index(f'<section id="section-{section.anchor}">'):]
        block = block[: block.index("</section>")]
        assert f'<a href="{html.escape(href)}">' in block
        assert block.index('class="intro"') < block.index('class="guidance"') < block.index('class="docs"')


def test_every_report_figure_fits_a_notebook_cell(run):
    _, results = run
    import plotly.graph_objects as go
    from figure_layout import layout_problems

    figures = [item for s in results.sections for item in s.items() if isinstance(item, go.Figure)]
    assert len(figures) == 13
    for fig in figures:
        assert layout_problems(fig, demo.load_pair().tokenizer.all_special_tokens) == [], fig.layout.title.text


def test_the_report_shows_sample_generations_and_the_found_suffix(run):
    out, results = run
    text = (out / "report.html").read_text(encoding="utf-8")
    pair = demo.load_pair()
    sets = demo.prompt_sets()
    samples = results.samples
    assert sorted(set(samples.alpha)) == [0.0, 0.5, 1.0, 1.5] and list(dict.fromkeys(samples.set)) == ["chat", "harmful", "harmful_lang2"]
    for row in samples.itertuples():
        assert row.prompt == sets[row.set][0]
        expected = " ".join(pair.generate(row.prompt, alpha=row.alpha, max_new_tokens=16).split())
        assert row.completion == expected
        assert f"<td>{html.escape(row.completion)}</td>" in text
    # the fine-tuned model refuses the forbidden request, the pre-trained model does not
    harmful = samples[samples.set == "harmful"].set_index("alpha").completion
    assert demo.is_refusal(harmful[1.0]) and not demo.is_refusal(harmful[0.0])
    suffix = results.paper.suffix.suffix_text
    assert text.count(f"<code>{html.escape(suffix)}</code>") >= 2  # transformations and the search itself


def test_the_report_fixes_the_figures_that_misled(run):
    _, results = run
    paper = results.paper
    # many-shot: k = 0 is on the axis; the TuCo axis fits the means (no squashing into 0.55-1)
    many = paper.many_shot.figure()
    tuco = many.data[0]
    assert list(tuco.x) == [str(k) for k in paper.many_shot.summary["k"]] and many.layout.xaxis.type == "category"
    assert many.layout.yaxis.range is None and not many.layout.shapes  # autoscaled, no reference lines
    assert tuco.yaxis == "y" and many.data[-1].yaxis == "y2"  # the refusal rate has its own panel
    # suffix search: the falling line says it is the attack working, and names the target
    suffix = paper.suffix.figure()
    assert "lower = the suffix works" in suffix.layout.title.text and "target: “i am sorry" in suffix.layout.title.text
    assert list(suffix.data[0].y) == paper.suffix.losses and paper.suffix.losses[-1] < paper.suffix.losses[0]


def test_behaviour_sweep_equals_a_recount():
    from tuco_lens.analyses import behaviour_sweep
    from tuco_lens.errors import InputError, InputTypeError

    pair = demo.load_pair()
    sets = demo.prompt_sets()
    prompts = {"harmful": sets["harmful"][:5], "chat": sets["chat"][:4]}
    sweep = behaviour_sweep(pair, prompts, [1.0, 0.0], demo.is_refusal, max_new_tokens=12, behaviour_name="refusal rate")
    assert sweep.alphas == (0.0, 1.0)
    assert list(sweep.table.columns) == ["alpha", "set", "n", "rate", "sem"]
    for row in sweep.table.itertuples():
        completions = pair.generate(prompts[row.set], alpha=row.alpha, max_new_tokens=12)
        assert row.rate == sum(map(demo.is_refusal, completions)) / len(completions) and row.n == len(completions)
        got = sweep.completions[(sweep.completions.alpha == row.alpha) & (sweep.completions.set == row.set)]
        assert got.completion.tolist() == completions and got["index"].tolist() == list(range(len(completions)))
    assert sweep.rates().loc[1.0, "harmful"] == 1.0 and sweep.rates().loc[0.0, "harmful"] == 0.0
    assert list(sweep.rates().columns) == ["harmful", "chat"]
    fig = sweep.figure()
    assert [t.name for t in fig.data] == ["harmful", "chat"] and "n = 5 harmful, 4 chat prompts" in fig.layout.title.text
    single = behaviour_sweep(pair, sets["chat"][:2], [1.0], demo.is_refusal, max_new_tokens=4)
    assert single.table.set.tolist() == ["prompts"]
    with pytest.raises(InputError, match="repeated"):
        behaviour_sweep(pair, prompts, [1.0, 1.0], demo.is_refusal, max_new_tokens=4)
    with pytest.raises(InputError, match="empty"):
        behaviour_sweep(pair, {"a": []}, [1.0], demo.is_refusal, max_new_tokens=4)
    with pytest.raises(InputTypeError, match="return a bool"):
        behaviour_sweep(pair, prompts, [1.0], lambda c: "yes", max_new_tokens=4)
    with pytest.raises(InputTypeError, match="function"):
        behaviour_sweep(pair, prompts, [1.0], "refusal", max_new_tokens=4)
