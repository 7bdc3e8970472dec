"""Data-parallel scoring: contiguous shards, part files, the merge, Parquet, datasets input, per-token rows.

Every merged output is compared with the one-process output of the same prompts (same rows once
each, in input order, values equal to 1e-6) and with ``pair.tuco`` / ``pair.decompose`` of each
prompt alone. The ``torchrun`` tests launch two real processes on the CPU (gloo) on the demo pair.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import tuco_lens
from tuco_lens import demo
from tuco_lens.cli import main
from tuco_lens.errors import InputError, OutputError, ResumeMismatchError
from tuco_lens.scoring import parts_dir, read_scores, score_prompts
from tuco_lens.sharding import Shard, layout, parse_shard, part_of, split_range

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair():
    return demo.load_pair()


@pytest.fixture(scope="module")
def prompts():
    """Prompts of several lengths and sets (web text, chat, harmful), with a label field."""
    sets = demo.prompt_sets()
    records = []
    for name, count in (("web", 6), ("chat", 8), ("harmful", 6)):
        records += [{"prompt": p, "set": name} for p in sets[name][:count]]
    return records


@pytest.fixture(scope="module")
def expected(pair, prompts):
    """TuCo of every prompt, one at a time (no padding, no batching)."""
    return [float(pair.tuco(r["prompt"])[0]) for r in prompts]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def score_cli(prompts_file: Path, out: Path, *extra: str) -> int:
    return main(["score", "--demo", "--prompts", str(prompts_file), "--out", str(out), "--batch-size", "3",
                 "--no-progress", *extra])


def assert_same_scores(frame: pd.DataFrame, prompts: list[dict], expected: list[float]) -> None:
    """One row per prompt, in input order, with its own prompt, label and TuCo (to 1e-6)."""
    assert frame["index"].tolist() == list(range(len(prompts)))
    assert frame["prompt"].tolist() == [r["prompt"] for r in prompts]
    assert frame["set"].tolist() == [r["set"] for r in prompts]
    assert frame["tuco"].tolist() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------- shards
def test_contiguous_shards_cover_every_prompt_once_without_padding():
    for n in (0, 1, 2, 5, 7, 24, 101):
        for jobs in (1, 2, 3, 8):
            for world in (1, 2, 3):
                parts = layout(n, Shard(0, jobs), world)
                assert len(parts) == jobs * world
                flat = [i for rows in parts for i in rows]
                assert flat == list(range(n))  # contiguous, in order, each once, nothing padded
                for job in range(jobs):
                    pieces = [part_of(n, Shard(job, jobs), rank, world) for rank in range(world)]
                    assert pieces == parts[job * world : (job + 1) * world]
                    sizes = [len(p) for p in pieces]
                    assert max(sizes) - min(sizes) <= 1
    assert split_range(range(10), 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]


def test_shard_syntax():
    assert parse_shard("3/8") == Shard(3, 8)
    assert parse_shard(None) == Shard(0, 1)
    for bad, message in (("8/8", "outside 0..7"), ("1-4", "INDEX/COUNT"), ("0/0", "positive integer"), ("a/b", "INDEX/COUNT")):
        with pytest.raises(InputError, match=message):
            parse_shard(bad)


# ---------------------------------------------------------------------- --shard i/N (a SLURM array)
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_array_shards_merge_into_the_one_process_output(tmp_path, prompts, expected, suffix, capsys):
    source = write_jsonl(tmp_path / "p.jsonl", prompts)
    alone = tmp_path / f"alone{suffix}"
    assert score_cli(source, alone) == 0
    out = tmp_path / f"sharded{suffix}"
    assert score_cli(source, out, "--shard", "1/3") == 0
    assert not out.exists() and "1 of 3 parts are" in capsys.readouterr().err
    assert score_cli(source, out, "--shard", "0/3") == 0
    assert not out.exists()
    assert score_cli(source, out, "--shard", "2/3") == 0  # the last job merges
    assert "merged 3 parts" in capsys.readouterr().err
    assert not parts_dir(out).exists()
    merged, one = read_scores(out), read_scores(alone)
    assert_same_scores(merged, prompts, expected)
    assert merged["tuco"].tolist() == pytest.approx(one["tuco"].tolist(), abs=1e-6)
    assert merged["n_tokens"].tolist() == one["n_tokens"].tolist()
    if suffix != ".parquet":  # the merged file is in input order; the one-process file in scoring order
        rows = out.read_text(encoding="utf-8")
        assert rows.index(prompts[0]["prompt"][:20]) < rows.index(prompts[-1]["prompt"][:20])
    # a rerun of any job finds the output complete; the one-process command resumes it as complete
    assert score_cli(source, out, "--shard", "0/3") == 0
    assert "nothing to do" in capsys.readouterr().err
    if suffix != ".parquet":
        assert score_cli(source, out) == 0
        assert f"{len(prompts)} of {len(prompts)} prompts already" in capsys.readouterr().err


def test_parts_refuse_another_split_and_other_settings(tmp_path, prompts, capsys):
    source = write_jsonl(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "s.jsonl"
    assert score_cli(source, out, "--shard", "0/2") == 0
    assert score_cli(source, out, "--shard", "0/3") == 2
    assert "split differently" in capsys.readouterr().err
    assert score_cli(source, out) == 2  # one process over an unfinished split run
    assert "holds the parts of an unfinished run" in capsys.readouterr().err
    assert score_cli(source, out, "--shard", "1/2", "--norm", "l2") == 2  # part 0 holds l1 rows
    assert "the part 'part-0000000000-0000000010.jsonl'" in (err := capsys.readouterr().err)
    assert "--norm was 'l1', now 'l2'" in err
    assert not (parts_dir(out) / "part-0000000010-0000000020.jsonl").exists()  # refused before scoring
    assert score_cli(source, out, "--shard", "0/3", "--overwrite") == 0
    assert sorted(p.name for p in parts_dir(out).glob("*.jsonl")) == ["part-0000000000-0000000007.jsonl"]
    # a partial one-process output is not taken over by a split run
    single = tmp_path / "single.jsonl"
    assert score_cli(source, single) == 0
    lines = single.read_text(encoding="utf-8").splitlines(keepends=True)
    single.write_text("".join(lines[:-3]), encoding="utf-8")  # as if stopped three prompts early
    assert score_cli(source, single, "--shard", "0/2") == 2
    assert f"holds {len(prompts) - 3} of {len(prompts)} prompts from an unfinished one-process run" in capsys.readouterr().err
    assert score_cli(source, single) == 0  # the one-process command resumes it
    assert len(read_scores(single)) == len(prompts)


def test_rank_zero_refuses_a_part_whose_process_died(tmp_path, prompts):
    from tuco_lens.scoring import _part_path, _TotalProgress

    out = tmp_path / "s.jsonl"
    parts = layout(len(prompts), Shard(0, 1), 2)
    parts_dir(out).mkdir()
    _part_path(out, parts[1]).write_text('{"index": 10}\n')  # one row of ten, and no writer holds the lock
    waiting = _TotalProgress(out, parts[1:], show=False)
    with pytest.raises(OutputError, match=r"ended after 1 of 10 .*rerun the same command"):
        waiting.wait_for_parts()


# ---------------------------------------------------------------------- Parquet, per-token
def test_parquet_is_written_in_row_groups(tmp_path, prompts, expected, pair):
    import pyarrow.parquet as pq

    out = tmp_path / "s.parquet"
    result = score_prompts(prompts, out, pair=pair, batch_size=4, row_group_size=6, settings={"models": "demo"})
    assert result.complete and result.n_scored == len(prompts)
    file = pq.ParquetFile(out)
    assert file.num_row_groups == math.ceil(len(prompts) / 6)
    assert [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)] == [6, 6, 6, 2]
    assert str(file.schema_arrow.field("tuco").type) == "double"
    assert_same_scores(result.to_dataframe(), prompts, expected)
    assert json.loads(out.with_name("s.parquet.run.json").read_text())["n_prompts"] == len(prompts)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_per_token_rows_hold_the_decomposition(tmp_path, prompts, pair, suffix):
    out = tmp_path / f"t{suffix}"
    some = prompts[::4]
    score_prompts(some, out, pair=pair, batch_size=2, per_token=True, settings={"models": "demo"})
    frame = read_scores(out)
    for row, record in zip(frame.itertuples(), some):
        dec = pair.decompose([record["prompt"]])
        real = dec.attention_mask[0].bool()
        assert row.tokens == [t for t, keep in zip(dec.str_tokens[0], real.tolist()) if keep]
        assert row.tuco_per_token == pytest.approx(dec.tuco_per_token[0][real].tolist(), abs=1e-6)
        assert row.tuco_per_token[-1] == pytest.approx(row.tuco, abs=1e-7)  # the paper's TuCo is the last token's
        assert row.tuco == pytest.approx(float(pair.tuco(record["prompt"])[0]), abs=1e-6)
        assert len(row.tokens) == row.n_tokens


def test_per_token_is_part_of_the_run_record(tmp_path, prompts, capsys):
    source = write_jsonl(tmp_path / "p.jsonl", prompts[:4])
    out = tmp_path / "t.jsonl"
    assert score_cli(source, out) == 0
    assert score_cli(source, out, "--per-token") == 2
    assert "--per-token was None, now True" in capsys.readouterr().err


def test_in_memory_and_python_api_errors(prompts, expected, pair, tmp_path):
    result = score_prompts([r["prompt"] for r in prompts], pair=pair, batch_size=5)
    assert result.to_dataframe()["tuco"].tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(InputError, match="needs out="):
        score_prompts(["a"], pair=pair, shard="0/2")
    with pytest.raises(InputError, match="give the models"):
        score_prompts(["a"], tmp_path / "x.csv")
    with pytest.raises(InputError, match="clash with output columns"):
        score_prompts([{"prompt": "a", "tokens": 1}], pair=pair)


# ---------------------------------------------------------------------- --dataset
def test_dataset_inputs(tmp_path, prompts, expected, capsys):
    import datasets

    table = datasets.Dataset.from_list([{"text": r["prompt"], "set": r["set"]} for r in prompts])
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": table.select(range(2)), "test": table}).save_to_disk(str(saved))
    parquet = tmp_path / "d.parquet"
    table.to_parquet(str(parquet))
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": r["prompt"], "set": r["set"]} for r in prompts])
    for source, extra in ((saved, ["--split", "test"]), (parquet, []), (jsonl, [])):
        out = tmp_path / f"{Path(source).stem}-out.jsonl"
        args = ["score", "--demo", "--dataset", str(source), "--field", "text", "--out", str(out), "--no-progress", *extra]
        assert main(args) == 0, capsys.readouterr().err
        assert_same_scores(read_scores(out), prompts, expected)
    assert main(["score", "--demo", "--dataset", str(parquet), "--out", str(tmp_path / "x.csv")]) == 2
    assert "has no column 'prompt'; its columns are ['text', 'set']" in capsys.readouterr().err
    assert main(["score", "--demo", "--dataset", str(saved), "--field", "text", "--split", "dev",
                 "--out", str(tmp_path / "x.csv")]) == 2
    assert "no split 'dev'; its splits are ['train', 'test']" in capsys.readouterr().err
    assert main(["score", "--demo", "--dataset", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["score", "--demo", "--out", str(tmp_path / "x.csv")]) == 2
    assert "--prompts FILE or --dataset NAME" in capsys.readouterr().err


# ---------------------------------------------------------------------- torchrun, 2 processes on CPU (gloo)
def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(*args: str, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            "--max_restarts=0", *args]


def _tuco_lens_command() -> list[str]:
    script = Path(sys.executable).with_name("tuco-lens")
    return ["--no-python", str(script)] if script.exists() else ["-m", "tuco_lens.cli"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_merge_into_the_one_process_output(tmp_path, prompts, expected):
    source = write_jsonl(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "scores.csv"
    command = _torchrun(*_tuco_lens_command(), "score", "--demo", "--prompts", str(source), "--out", str(out),
                        "--batch-size", "3", "--threads", "1", port=_free_port())
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merged 2 parts" in done.stderr
    assert "TuCo total" in done.stderr and "TuCo part 2/2" in done.stderr  # progress on every rank, total on rank 0
    assert_same_scores(read_scores(out), prompts, expected)
    assert not parts_dir(out).exists()


_SLOW_WORKER = """
import os, sys, time
import tuco_lens.scoring as scoring
original = scoring.score_batches
def slow(*args, **kwargs):
    for rows in original(*args, **kwargs):
        yield rows
        if os.environ.get("RANK") == "1":
            time.sleep(0.4)   # rank 1 is slow, so the test can kill it in the middle of its part
scoring.score_batches = slow
from tuco_lens.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_killed_mid_run_resumes_to_the_same_output(tmp_path, prompts, expected):
    source = write_jsonl(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "scores.jsonl"
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(_SLOW_WORKER))
    args = ["score", "--demo", "--prompts", str(source), "--out", str(out), "--batch-size", "2", "--threads", "1",
            "--no-progress"]
    run = subprocess.Popen(_torchrun(str(worker), *args, port=_free_port()), env=_env(), stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    part = parts_dir(out) / "part-0000000010-0000000020.jsonl"
    lock = part.with_name(part.name + ".lock")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (part.exists() and part.read_text().count("\n") >= 2):
        time.sleep(0.05)
    rows_before = part.read_text().count("\n")
    assert 2 <= rows_before < 10, rows_before
    os.kill(json.loads(lock.read_text())["pid"], signal.SIGKILL)
    run.wait(timeout=120)
    stderr = run.stderr.read()
    assert run.returncode != 0, stderr[-2000:]
    assert not out.exists()
    done = subprocess.run(_torchrun(str(worker), *args, port=_free_port()), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming:" in done.stderr and "merged 2 parts" in done.stderr
    frame = read_scores(out)
    assert_same_scores(frame, prompts, expected)  # every prompt once, in order, the right values
