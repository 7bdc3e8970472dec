"""``tuco-lens top`` (corpus view) and ``tuco-lens reproduce owt-hh`` (the paper's Table 1), offline on the demo pair.

The reproduce test runs on small local stand-ins for OpenWebText and HH-RLHF that it writes
itself; the AUC it prints is checked against an AUC computed here from ``pair.tuco`` of the
preprocessed prompts by pairwise comparison.
"""

from __future__ import annotations

import html
import itertools
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from tuco_lens import demo
from tuco_lens.cli import main
from tuco_lens.corpus_view import top_prompts, write_top_page
from tuco_lens.errors import InputError
from tuco_lens.reproduce import first_human_turn, owt_hh_summary, paper_auc, web_substring
from tuco_lens.scoring import read_scores

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)


@pytest.fixture(scope="module")
def pair():
    return demo.load_pair()


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A per-token score table of demo prompts from three sets (Parquet)."""
    sets = demo.prompt_sets()
    records = [{"prompt": p, "set": name} for name in ("web", "chat", "harmful") for p in sets[name][:5]]
    root = tmp_path_factory.mktemp("top")
    source = root / "p.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = root / "scores.parquet"
    assert main(["score", "--demo", "--prompts", str(source), "--per-token", "--out", str(out), "--no-progress"]) == 0
    return out, records


def auc_by_pairs(positive, negative) -> float:
    """P(a positive scores higher than a negative), ties one half: the plain definition."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positive, negative))
    return wins / (len(positive) * len(negative))


# ---------------------------------------------------------------------- tuco-lens top
def test_top_prompts_are_the_extremes(scored):
    out, records = scored
    table = read_scores(out)
    top = top_prompts(out, k=4)
    by_value = sorted(range(len(table)), key=lambda i: (-table["tuco"][i], i))
    assert top.highest["index"].tolist() == by_value[:4]
    assert top.lowest["index"].tolist() == sorted(range(len(table)), key=lambda i: (table["tuco"][i], i))[:4]
    assert top.label == "set"
    both = top.to_dataframe()
    assert both.groupby("which").size().to_dict() == {"highest": 4, "lowest": 4}
    with pytest.raises(InputError, match="no label column 'topic'"):
        top_prompts(out, label="topic")
    with pytest.raises(InputError, match="k must be a positive integer"):
        top_prompts(out, k=0)


def test_top_page_colours_tokens_and_shows_each_label(scored, tmp_path, capsys):
    out, records = scored
    page = tmp_path / "top.html"
    assert main(["top", "--scores", str(out), "--k", "3", "--out", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    table = read_scores(out)
    best = table.loc[table["tuco"].idxmax()]
    worst = table.loc[table["tuco"].idxmin()]
    assert f"#1 · prompt {best['index']} · set = {best['set']} — TuCo = {best['tuco']:.4f}" in text
    assert f"#1 · prompt {worst['index']} · set = {worst['set']} — TuCo = {worst['tuco']:.4f}" in text
    assert text.index("Highest TuCo") < text.index(f"prompt {best['index']} ·", text.index("Highest TuCo"))
    last = len(best["tokens"]) - 1
    tip = f"position {last}: {best['tokens'][-1]!r} — per-token TuCo {best['tuco_per_token'][-1]:.4f}"
    assert html.escape(tip, quote=True) in text  # the last token's exact value on hover
    assert len(re.findall(r"#\d · prompt \d+ ·", text)) == 6
    for name in ("web", "chat", "harmful"):
        assert f'"name":"{name}"' in text  # one distribution per label
    assert "<script src=" not in text  # plotly.js is embedded: the page opens offline
    assert main(["top", "--scores", str(out), "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out must end in .html" in capsys.readouterr().err


def test_top_page_without_per_token_columns(tmp_path):
    frame = pd.DataFrame({"index": [0, 1, 2], "prompt": ["<b>a</b>", "b", "c"], "tuco": [0.2, 0.9, 0.5], "n_tokens": 1})
    page = write_top_page(frame, tmp_path / "top.html", k=1)
    text = page.read_text(encoding="utf-8")
    assert "#1 · prompt 1 — TuCo = 0.9000" in text and "#1 · prompt 0 — TuCo = 0.2000" in text
    assert "&lt;b&gt;a&lt;/b&gt;" in text and "<b>a</b>" not in text  # prompt text is escaped
    assert "score with <code>--per-token</code>" in text


# ---------------------------------------------------------------------- tuco-lens reproduce owt-hh
def test_paper_values_and_preprocessing():
    assert paper_auc("meta-llama/Llama-2-7b-chat-hf") == ("meta-llama/Llama-2-7b-chat-hf", 1.0)
    assert paper_auc("/models/zephyr-7b-gemma-v0.1/") == ("HuggingFaceH4/zephyr-7b-gemma-v0.1", 0.63)
    assert paper_auc("google/gemma-7b-it")[1] == 0.93
    assert paper_auc("mistralai/Mistral-7B-Instruct-v0.1")[1] == 0.98
    assert paper_auc("lmsys/vicuna-7b-v1.5")[1] == 0.99
    assert paper_auc("./my-llama-2-7b-chat-sft") is None
    conversation = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.\n\nHuman: And then?\n\nAssistant: Bake."
    assert first_human_turn(conversation) == "How do I bake bread?"
    with pytest.raises(InputError, match="no 'Human:' turn"):
        first_human_turn("\n\nAssistant: hello")


def _stand_ins(root: Path, n: int) -> tuple[Path, Path]:
    sets = demo.prompt_sets()
    web = [" ".join(sets["web"][(i + j) % 100] for j in range(5)) for i in range(n + 3)]  # ~130 tokens each
    web[2] = sets["web"][7]  # one record shorter than 97 tokens: kept whole
    owt = root / "owt.jsonl"
    owt.write_text("".join(json.dumps({"text": t, "meta": i}) + "\n" for i, t in enumerate(web)))
    questions = [p.removeprefix("<bos> <user> ").removesuffix(" <assistant>") for p in sets["chat"][: n + 3]]
    hh = root / "hh.parquet"
    pd.DataFrame({"chosen": [f"\n\nHuman: {q}\n\nAssistant: sure ." for q in questions],
                  "rejected": ["\n\nHuman: x\n\nAssistant: no"] * len(questions)}).to_parquet(hh)
    return owt, hh


def test_reproduce_owt_hh_offline_on_stand_ins(tmp_path, pair, capsys):
    n = 10
    owt, hh = _stand_ins(tmp_path, n)
    out = tmp_path / "owt-hh"
    args = ["reproduce", "owt-hh", "--demo", "--owt", str(owt), "--hh", str(hh), "--n", str(n), "--out", str(out),
            "--batch-size", "4", "--no-progress"]
    assert main([*args, "--shard", "1/2"]) == 0  # data-parallel like score: job 1 of 2 ...
    assert "ROC AUC" not in capsys.readouterr().out
    assert main([*args, "--shard", "0/2"]) == 0  # ... and the job that merges prints the AUC
    printed = capsys.readouterr().out
    scores = read_scores(out / "scores.jsonl")
    assert scores["set"].tolist() == ["web"] * n + ["chat"] * n
    tokenizer = AutoTokenizer.from_pretrained(demo.FT_DIR)
    web_texts = [json.loads(line)["text"] for line in owt.read_text().splitlines()][:n]
    for prompt, text in zip(scores["prompt"][:n], web_texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > 97:
            assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == 97
            assert text.startswith(prompt)
        else:
            assert prompt == text
        assert prompt == web_substring(tokenizer, text)
    hh_rows = pd.read_parquet(hh)["chosen"].tolist()[:n]
    assert scores["prompt"][n:].tolist() == [first_human_turn(c) for c in hh_rows]
    # each prompt scored in the fine-tuned chat template, as in the paper's appendix
    expected = pair.tuco(scores["prompt"].tolist(), chat_template=True).tolist()
    assert scores["tuco"].tolist() == pytest.approx(expected, abs=1e-6)
    auc = auc_by_pairs(expected[n:], expected[:n])
    assert f"ROC AUC of TuCo, HH-RLHF chat vs OpenWebText: {auc:.4f} (n = {n} / {n})" in printed
    assert "paper: not one of the paper's pairs" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["auc"] == pytest.approx(auc, abs=1e-12) and summary["paper_auc"] is None
    # the paper's value is printed beside the AUC for its pairs
    named = owt_hh_summary(scores, "lmsys/vicuna-7b-v1.5")
    assert named["paper_auc"] == 0.99 and named["auc"] == pytest.approx(auc)
    from tuco_lens.reproduce import describe

    assert describe(named).endswith("paper (Table 1, lmsys/vicuna-7b-v1.5): 0.99")
