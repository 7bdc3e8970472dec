"""``tuco-lens demo`` end to end on the embedded pair: files, figures, and the documented numbers.

The expected values are the ones README.md and docs/demo.md report (measured with
``tuco-lens demo``); the run must reproduce them within a small tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from tuco_lens import demo
from tuco_lens.cli import main
from tuco_lens.metrics import roc_auc

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


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    torch.set_num_threads(1)
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_writes_report_and_tables(report):
    html = (report / "report.html").read_text()
    assert html.count("plotly.js v") == 1 and "<script src=" not in html
    assert html.count("Plotly.newPlot") >= 4 + 6  # four figures, plus six of the paper's analyses
    assert "The paper&#x27;s analyses on the demo pair" in html
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
