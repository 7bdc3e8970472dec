"""The ``tuco-lens`` command on tiny checkpoints written by the test (score, steer, errors, help)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tuco_lens
from tuco_lens.cli import main

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)


@pytest.fixture(scope="module")
def dirs(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    return str(pt_dir), str(ft_dir)


@pytest.fixture(scope="module")
def pair(dirs):
    return tuco_lens.load_pair(*dirs)


PROMPTS = ["the cat sat on the mat", "a dog", "hello , how are you ?", "the bird and the fish"]


def test_score_txt_to_csv_matches_library(dirs, pair, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n\n" + "\n".join(PROMPTS[1:]) + "\n")
    out = tmp_path / "scores.csv"
    code = main(["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(prompts), "--out", str(out),
                 "--batch-size", "2", "--no-progress"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3]  # input order, although batches run longest first
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [int(r["line"]) for r in rows] == [1, 3, 4, 5]  # the blank line is skipped
    expected = pair.tuco(PROMPTS)
    assert [float(r["tuco"]) for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)
    assert [int(r["n_tokens"]) for r in rows] == pair.tokenize(PROMPTS).n_tokens.tolist()


def test_score_jsonl_keeps_fields_uses_chat_template_and_resumes(dirs, pair, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "label": i % 2}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "scores.jsonl"
    expected = pair.tuco(PROMPTS, chat_template=True)
    args = ["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(prompts), "--out", str(out),
            "--chat-template", "--no-progress"]
    assert main(args) == 0
    # as if the run had been interrupted after two prompts (tuco marked to see it is not recomputed)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kept = [{**r, "tuco": 0.123} for r in rows if r["index"] in (0, 3)]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming: 2 of 4 prompts already" in capsys.readouterr().err
    rows = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == [0, 1, 2, 3]
    assert rows[0]["tuco"] == 0.123  # not recomputed
    assert rows[1]["tuco"] == pytest.approx(float(expected[1]), abs=1e-6)
    assert rows[2]["label"] == 0 and rows[1]["label"] == 1
    assert main(args) == 0  # nothing left to do
    assert len(out.read_text().splitlines()) == 4
    # the resumed rows follow the earlier ones, in input order among themselves
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 3, 1, 2]


def test_score_rows_come_in_input_order_whatever_the_lengths(dirs, pair, tmp_path):
    words = "the cat sat on a mat and then the dog ran far away to the hills".split()
    prompts = [" ".join(words[: 1 + (7 * i) % len(words)]) for i in range(11)]  # lengths out of order
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "id": f"q{i}"}) + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "s.csv"
    assert main(["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(path), "--out", str(out),
                 "--batch-size", "3", "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(11)]
    assert [float(r["tuco"]) for r in rows] == pytest.approx(pair.tuco(prompts).tolist(), abs=1e-6)


def test_input_order_releases_rows_once_every_earlier_row_is_done():
    from tuco_lens.scoring import InputOrder

    order = InputOrder([0, 2, 3, 5])
    assert order.release([{"index": 3}, {"index": 5}]) == []          # 0 and 2 not done yet
    assert order.release([{"index": 0}]) == [{"index": 0}]
    assert order.release([{"index": 2}]) == [{"index": 2}, {"index": 3}, {"index": 5}]


HEAVY = ("torch", "transformer_lens", "transformers", "numpy", "pandas", "plotly", "tqdm", "jaxtyping", "einops")
IMPORT_BUDGET_S = 0.3  # all imports of `tuco-lens --help`; the whole command must start in < 1 s


def _cli_imports(argv: list[str]) -> tuple[set[str], float, str]:
    """Modules loaded by ``main(argv)`` and the import time of the whole module graph (-X importtime)."""
    code = (
        f"import sys\nfrom tuco_lens.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=120)
    modules = set(result.stdout.split("MODULES", 1)[1].split())
    total_us = 0
    for line in result.stderr.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if found and not found.group(3):  # a module the command imported itself: its cumulative time
            total_us += int(found.group(2))
    return modules, total_us / 1e6, result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--version"], [], ["demo", "--help"], ["steer", "--help"]])
def test_cli_starts_without_torch_or_transformer_lens(argv):
    modules, seconds, out = _cli_imports(argv)
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == [], f"tuco-lens {' '.join(argv)} imports {heavy[:8]}"
    assert seconds < IMPORT_BUDGET_S, f"imports of tuco-lens {' '.join(argv)} took {seconds:.3f} s"
    assert ("tuco-lens" in out) or argv == ["--version"]
    print(f"tuco-lens {' '.join(argv)}: {len(modules)} modules, imports {1000 * seconds:.0f} ms")


@pytest.mark.slow  # starts Python and imports torch in a subprocess
def test_import_budget_measures_the_heavy_path():
    """The same measurement sees torch when a command really needs it (the budget is not vacuous):
    generating one token from the demo pair. (``score --help`` no longer does: it reads prompt files
    with tuco_lens.io, which needs no torch.)"""
    modules, seconds, _ = _cli_imports(["steer", "--demo", "--prompt", "the cat", "--alpha", "1", "--max-new-tokens", "1"])
    assert "torch" in modules and seconds > IMPORT_BUDGET_S


@pytest.mark.slow  # starts Python and imports torch in a subprocess
def test_top_level_package_is_lazy():
    result = subprocess.run(
        [sys.executable, "-c", "import sys, tuco_lens; assert 'torch' not in sys.modules; "
         "from tuco_lens import TuCoPair, InputError; assert 'torch' in sys.modules; print(TuCoPair.__module__)"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tuco_lens.pair"
    assert set(tuco_lens.__all__) <= set(dir(tuco_lens))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tuco_lens.nope  # noqa: B018


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".txt", "contains no prompt"),
        ('{"prompt": "a"}\n{oops\n', ".jsonl", ":2 is not valid JSON"),
        ('{"text": "a"}\n', ".jsonl", ":1 has no ['prompt'] field"),
        ('{"prompt": 3}\n', ".jsonl", 'record 1: the "prompt" field must be a string'),
        ("a\n", ".csv", "unknown extension '.csv'"),
        ('{"prompt": "a", "tuco": 1}\n', ".jsonl", r"clash with output columns"),
    ],
)
def test_score_bad_input_files(dirs, tmp_path, capsys, content, suffix, message):
    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_text(content)
    code = main(["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(prompts), "--no-progress"])
    assert code == 2
    assert message.replace("\\", "") in capsys.readouterr().err or pytest.fail(capsys.readouterr().err)


def test_score_other_errors(dirs, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\n")
    assert main(["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["score", "--pt", dirs[0], "--prompts", str(prompts)]) == 2
    assert "both --pt and --ft are required" in capsys.readouterr().err
    assert main(["score", "--pt", dirs[0], "--ft", str(tmp_path / "nowhere"), "--prompts", str(prompts)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(prompts), "--out", str(tmp_path / "x.xlsx")]) == 2
    assert "--out must end in .csv or .jsonl or .parquet" in capsys.readouterr().err
    assert main(["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(prompts), "--batch-size", "0"]) == 2
    assert "--batch-size must be a positive integer" in capsys.readouterr().err


def test_score_on_the_demo_pair(tmp_path):
    from tuco_lens import demo

    prompts = demo.prompt_sets()["harmful"][:3]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "s.csv"
    assert main(["score", "--demo", "--prompts", str(path), "--out", str(out), "--no-progress"]) == 0
    rows = sorted(csv.DictReader(out.open()), key=lambda r: int(r["index"]))
    assert [float(r["tuco"]) for r in rows] == pytest.approx(demo.load_pair().tuco(prompts).tolist(), abs=1e-6)
    assert main(["score", "--demo", "--pt", "x", "--prompts", str(path)]) == 2


def test_steer_prints_one_generation_per_alpha(dirs, pair, capsys):
    code = main(["steer", "--pt", dirs[0], "--ft", dirs[1], "--prompt", "the cat", "--alpha", "0", "1",
                 "--max-new-tokens", "5"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "prompt: 'the cat'"
    for line, alpha in zip(lines[1:], (0.0, 1.0)):
        expected = " ".join(pair.generate("the cat", alpha=alpha, max_new_tokens=5).split())
        assert line == f"alpha={alpha:g} | {expected}"
    assert main(["steer", "--pt", dirs[0], "--ft", dirs[1], "--prompt", "x", "--alpha", "nan"]) == 2
    assert "--alpha values must be finite" in capsys.readouterr().err


def test_steer_with_alpha_per_component(dirs, pair, capsys):
    code = main(["steer", "--pt", dirs[0], "--ft", dirs[1], "--prompt", "the cat", "--alpha-mlp", "0", "1",
                 "--alpha-attn", "0.5", "--max-new-tokens", "4"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    for line, mlp in zip(lines, (0.0, 1.0)):
        expected = " ".join(pair.generate("the cat", alpha={"attn": 0.5, "mlp": mlp}, max_new_tokens=4).split())
        assert line == f"attn=0.5 mlp={mlp:g} | {expected}"
    assert len(lines) == 2
    assert main(["steer", "--pt", dirs[0], "--ft", dirs[1], "--prompt", "x", "--alpha", "1", "--alpha-mlp", "0"]) == 2
    assert "replace --alpha" in capsys.readouterr().err
    assert main(["steer", "--pt", dirs[0], "--ft", dirs[1], "--prompt", "x", "--alpha-attn", "inf"]) == 2
    assert "--alpha-attn values must be finite" in capsys.readouterr().err


@pytest.mark.slow  # starts Python and imports torch in a subprocess
def test_help_of_every_command_has_examples():
    for command in ([], ["demo"], ["score"], ["steer"]):
        result = subprocess.run(
            [sys.executable, "-m", "tuco_lens.cli", *command, "--help"], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "example" in result.stdout and "tuco-lens" in result.stdout
    result = subprocess.run([sys.executable, "-m", "tuco_lens.cli"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "COMMAND" in result.stdout
    script = shutil.which("tuco-lens", path=str(Path(sys.executable).parent))
    assert script is not None, "the tuco-lens console script is not installed (pip install -e .)"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"tuco_lens {tuco_lens.__version__}"
