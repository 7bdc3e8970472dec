"""``tuco-lens score`` outputs: what a resume checks, what it repairs, and fault injection.

Every test ends in one of two states, checked row by row: every prompt scored exactly once with
the settings of the run (its TuCo equals ``pair.tuco`` of its prompt), or a clear refusal
(exit status 2, a message naming the problem and the way out) that left the output as it was.
Faults are injected where they happen: short writes and ``ENOSPC`` in ``os.write`` (a full disk),
``KeyboardInterrupt`` and ``SIGKILL`` in the middle of a batch, torn and NUL-filled tails, a
changed prompts file, other settings, and two writers at once.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import tuco_lens
from tuco_lens.cli import main

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

# tuco_lens.scoring_io (issue 11) is imported inside the tests that use it, so that each test
# fails on its own assertion (not on an import) against the code before it.


def csv_cell(value: str) -> str:
    """A prompt as a CSV cell: a leading ' before what a spreadsheet would run as a formula."""
    return "'" + value if value.startswith(("=", "+", "-", "@", "\t", "\r")) else value

WORDS = "the a cat dog bird fish tree house car city sea sun moon day night water food".split()
# Equal lengths: the length-sorted batches are in input order, so each batch is one write of the
# output (rows are written in input order) and the fault-injection tests can count writes.
PROMPTS = [" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(4)) for i in range(12)]


@pytest.fixture(scope="module")
def dirs(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    return str(pt_dir), str(ft_dir)


@pytest.fixture(scope="module")
def pair(dirs):
    return tuco_lens.load_pair(*dirs)


@pytest.fixture(scope="module")
def expected(pair):
    """TuCo of every prompt, computed by the library, one prompt at a time."""
    return {p: float(pair.tuco(p)[0]) for p in PROMPTS}


def write_prompts(path: Path, prompts: list[str]) -> Path:
    if path.suffix == ".txt":
        path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"prompt": p, "n": i}) + "\n" for i, p in enumerate(prompts)), encoding="utf-8")
    return path


def score(dirs, prompts: Path, out: Path, *extra: str) -> int:
    return main(["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(prompts), "--out", str(out),
                 "--batch-size", "2", "--no-progress", *extra])


def read_rows(out: Path) -> list[dict]:
    """The rows of an output, read the way users read them (pandas must parse a CSV too)."""
    if out.suffix == ".csv":
        pd.read_csv(out)  # raises ParserError on a corrupt file
        with out.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]


def assert_complete(out: Path, prompts: list[str], expected: dict[str, float]) -> None:
    """Every prompt exactly once, at its index, with the TuCo the library gives it."""
    rows = read_rows(out)
    indices = sorted(int(r["index"]) for r in rows)
    assert indices == list(range(len(prompts))), indices
    for row in rows:
        index = int(row["index"])
        written = csv_cell(prompts[index]) if out.suffix == ".csv" else prompts[index]
        assert row["prompt"] == written
        assert float(row["tuco"]) == pytest.approx(expected[prompts[index]], abs=1e-6)


@pytest.fixture(params=[".csv", ".jsonl"])
def fmt(request):
    return request.param


# ---------------------------------------------------------------------- 1. torn or garbage tails
@pytest.mark.parametrize(
    "damage",
    ["torn row", "torn multibyte", "nul bytes", "torn row then nul bytes"],
)
def test_damaged_tail_is_cut_reported_and_rescored(dirs, pair, expected, tmp_path, capsys, fmt, damage):
    prompts = PROMPTS[:6] + ["the café"]  # a two-byte character to tear
    source = write_prompts(tmp_path / f"p{'.txt' if fmt == '.csv' else '.jsonl'}", prompts)
    out = tmp_path / f"s{fmt}"
    assert score(dirs, source, out) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    cafe = next(line for line in lines if "café".encode() in line)
    intact = b"".join(line for line in lines if line is not cafe)
    torn = cafe[: cafe.index("é".encode()) + 1] if damage == "torn multibyte" else cafe[: len(cafe) // 2]
    data = intact + (b"" if damage == "nul bytes" else torn) + (b"\0" * 4096 if "nul" in damage else b"")
    out.write_bytes(data)
    capsys.readouterr()
    assert score(dirs, source, out) == 0
    err = capsys.readouterr().err
    assert "note: cut" in err and "damaged bytes" in err and "scored again" in err, err
    assert "resuming: 6 of 7" in err, err
    assert_complete(out, prompts, {**expected, "the café": float(pair.tuco("the café")[0])})


def test_damage_before_intact_rows_is_refused_not_cut(dirs, tmp_path, capsys, fmt):
    source = write_prompts(tmp_path / "p.jsonl", PROMPTS[:6])
    out = tmp_path / f"s{fmt}"
    assert score(dirs, source, out) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    damaged = lines[:2] + [lines[2][:5] + b"\n"] + lines[3:]  # a line in the middle is mangled
    out.write_bytes(b"".join(damaged))
    before = out.read_bytes()
    capsys.readouterr()
    assert score(dirs, source, out) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "is damaged" in err and "is an intact row" in err and "--overwrite" in err, err
    assert out.read_bytes() == before  # nothing was cut


# ---------------------------------------------------------------------- 2. what a resume checks
def _interrupted(dirs, tmp_path, fmt, prompts=PROMPTS, keep=4, extra=()):
    """An output holding the first ``keep`` rows of a run, as an interrupted run leaves it."""
    source = write_prompts(tmp_path / "p.txt", prompts)
    out = tmp_path / f"s{fmt}"
    assert score(dirs, source, out, *extra) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[: keep + (fmt == ".csv")]))
    return source, out


@pytest.mark.parametrize(
    "change, message",
    [
        ("insert a line", "the row at line"),
        ("reorder", "the row at line"),
        ("fewer prompts", "past the last prompt"),
        ("edit an unscored prompt", "the prompts changed"),
    ],
)
def test_changed_prompts_file_is_refused(dirs, tmp_path, capsys, fmt, change, message):
    source, out = _interrupted(dirs, tmp_path, fmt)
    prompts = list(PROMPTS)
    if change == "insert a line":
        prompts.insert(1, "the sun")
    elif change == "reorder":
        prompts.reverse()
    elif change == "fewer prompts":
        prompts = prompts[:2]
    else:
        prompts[-1] = "the moon and the sea"
    write_prompts(source, prompts)
    before = out.read_bytes()
    capsys.readouterr()
    assert score(dirs, source, out) == 2
    err = capsys.readouterr().err
    assert "other prompts or settings" in err and message in err, err
    assert "new --out" in err and "--overwrite" in err
    assert "resuming" not in err and out.read_bytes() == before


@pytest.mark.parametrize(
    "first, second, message",
    [
        ((), ("--norm", "l2"), "--norm was 'l1', now 'l2'"),
        ((), ("--chat-template",), "--chat-template was False, now True"),
        ((), ("--dtype", "float64"), "--dtype was 'float32', now 'float64'"),
        (("--dtype", "fp32"), (), None),  # the same dtype spelled differently resumes
    ],
)
def test_changed_settings_are_refused(dirs, expected, tmp_path, capsys, first, second, message):
    source, out = _interrupted(dirs, tmp_path, ".jsonl", extra=first)
    capsys.readouterr()
    code = score(dirs, source, out, *second)
    err = capsys.readouterr().err
    if message is None:
        assert code == 0 and "resuming: 4 of 12" in err
        assert_complete(out, PROMPTS, expected)
        return
    assert code == 2 and message in err and "--overwrite" in err, err


def test_other_models_are_refused(dirs, checkpoint_pair, tmp_path, capsys):
    source, out = _interrupted(dirs, tmp_path, ".jsonl")
    other_ft = str(checkpoint_pair("llama", noise=0.3)[1])
    capsys.readouterr()
    assert main(["score", "--pt", dirs[0], "--ft", other_ft, "--prompts", str(source), "--out", str(out)]) == 2
    assert f"--ft was {str(Path(dirs[1]).resolve())!r}, now {str(Path(other_ft).resolve())!r}" in capsys.readouterr().err
    # the same directory with rewritten files is another model too
    weights = next(Path(dirs[1]).glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert score(dirs, source, out) == 2
        assert f"--ft: the files of {str(Path(dirs[1]).resolve())} changed" in capsys.readouterr().err
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_output_without_run_record_is_refused_and_overwrite_starts_again(dirs, expected, tmp_path, capsys):
    source, out = _interrupted(dirs, tmp_path, ".csv")
    Path(str(out) + ".run.json").unlink()
    capsys.readouterr()
    assert score(dirs, source, out) == 2
    assert "no record of what they were computed with" in capsys.readouterr().err
    assert score(dirs, source, out, "--overwrite", "--norm", "l2") == 0
    rows = read_rows(out)
    assert len(rows) == len(PROMPTS)
    pair = tuco_lens.load_pair(*dirs)
    l2 = {p: float(v) for p, v in zip(PROMPTS, pair.tuco(PROMPTS, norm="l2"))}
    assert_complete(out, PROMPTS, l2)
    from tuco_lens.scoring_io import RunRecord

    record = RunRecord.read(Path(str(out) + ".run.json"))
    assert record.settings["norm"] == "l2" and record.n_prompts == len(PROMPTS)
    assert record.tuco_lens_version == tuco_lens.__version__


def test_duplicate_rows_are_refused(dirs, tmp_path, capsys, fmt):
    source, out = _interrupted(dirs, tmp_path, fmt)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines + [lines[-1]]))
    capsys.readouterr()
    assert score(dirs, source, out) == 2
    assert "twice" in capsys.readouterr().err


# ---------------------------------------------------------------------- 3. two writers
def test_a_second_writer_is_refused_while_the_first_holds_the_lock(dirs, tmp_path, capsys):
    from tuco_lens.scoring_io import OutputLock

    source = write_prompts(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "s.csv"
    with OutputLock(out):
        assert score(dirs, source, out) == 2
    err = capsys.readouterr().err
    assert f"being written by another process (pid {os.getpid()}" in err and "two writers" in err, err
    assert not out.exists()


def test_a_stale_lock_is_taken_over(dirs, expected, tmp_path, capsys):
    source = write_prompts(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "s.csv"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = Path(str(out) + ".lock")
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": "somewhere", "started": "yesterday"}))
    assert score(dirs, source, out) == 0
    err = capsys.readouterr().err
    assert f"took over a stale lock left by a process that is gone (pid {int(dead.stdout)} on somewhere" in err
    assert not lock.exists()
    assert_complete(out, PROMPTS, expected)


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(tuco_lens.__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "tuco_lens.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_two_processes_writing_one_output_score_every_prompt_once(dirs, expected, tmp_path):
    prompts = PROMPTS * 3
    source = write_prompts(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "s.csv"
    args = ["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(source), "--out", str(out),
            "--batch-size", "1", "--no-progress"]
    runs = [_cli(*args), _cli(*args)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for code, err in results:
        assert code == 0 or (code == 2 and "being written by another process" in err), err
    assert_complete(out, prompts, expected)


# ---------------------------------------------------------------------- 4. output paths, early
def test_output_paths_are_checked_before_the_model_loads(dirs, tmp_path, capsys, monkeypatch):
    from tuco_lens.cli import score as score_cli

    def refuse(args):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(score_cli, "load_pair_from_args", refuse)
    source = write_prompts(tmp_path / "p.txt", PROMPTS)
    (tmp_path / "adir.csv").mkdir()
    cases = [
        (tmp_path / "missing" / "s.csv", "does not exist: create it first"),
        (tmp_path / "adir.csv", "is a directory"),
        (source, "must end in .csv or .jsonl"),
    ]
    for out, message in cases:
        assert score(dirs, source, out) == 2
        assert message in capsys.readouterr().err
    same = tmp_path / "same.jsonl"
    write_prompts(same, PROMPTS)
    assert score(dirs, same, same) == 2
    assert "is the input file itself" in capsys.readouterr().err
    assert main(["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(source), "--device", "nonsense"]) == 2
    assert "unknown device 'nonsense'" in capsys.readouterr().err


def test_demo_refuses_an_output_that_is_a_file_before_running(tmp_path, capsys, monkeypatch):
    from tuco_lens import demo

    monkeypatch.setattr(demo, "load_pair", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    target = tmp_path / "report"
    target.write_text("not a directory")
    assert main(["demo", "--out", str(target), "--no-progress"]) == 2
    assert "exists and is a file" in capsys.readouterr().err
    assert target.read_text() == "not a directory"


# ---------------------------------------------------------------------- 9. reading .txt prompts
def test_txt_reader_drops_the_byte_order_mark_and_splits_on_newlines_only(dirs, expected, pair, tmp_path):
    source = tmp_path / "p.txt"
    odd = "the cat\u2028the dog"
    source.write_bytes("\ufeff".encode() + f"{PROMPTS[0]}\r\n{odd}\n\n{PROMPTS[1]}\n".encode())
    out = tmp_path / "s.jsonl"
    assert score(dirs, source, out) == 0
    rows = sorted(read_rows(out), key=lambda r: r["index"])
    assert [r["prompt"] for r in rows] == [PROMPTS[0], odd, PROMPTS[1]]
    assert [r["line"] for r in rows] == [1, 2, 4]
    assert rows[0]["tuco"] == pytest.approx(expected[PROMPTS[0]], abs=1e-6)
    assert rows[1]["tuco"] == pytest.approx(float(pair.tuco(odd)[0]), abs=1e-6)


def test_jsonl_reader_accepts_a_byte_order_mark(dirs, expected, tmp_path):
    source = tmp_path / "p.jsonl"
    source.write_bytes("\ufeff".encode() + json.dumps({"prompt": PROMPTS[0]}).encode() + b"\n")
    out = tmp_path / "s.csv"
    assert score(dirs, source, out) == 0
    assert float(read_rows(out)[0]["tuco"]) == pytest.approx(expected[PROMPTS[0]], abs=1e-6)


# ---------------------------------------------------------------------- 5. prompts with no token
def test_a_jsonl_prompt_with_no_token_stops_the_run_before_any_row(dirs, tmp_path, capsys):
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [PROMPTS[0], "   ", PROMPTS[1]]))
    out = tmp_path / "s.csv"
    assert score(dirs, source, out) == 2
    err = capsys.readouterr().err
    assert "record 2: Prompt '   ' has no token of its own" in err, err
    assert out.read_bytes() == b""


# ---------------------------------------------------------------------- CSV formula injection
def test_csv_cells_that_spreadsheets_would_run_are_written_as_text(dirs, tmp_path, pair, capsys):
    risky = ["=1+1 the cat", "+the dog", "-the bird", "@the fish", "\tthe sea"]
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps({"prompt": p, "note": "=cmd|' /C calc'!A0"}) + "\n" for p in risky))
    out = tmp_path / "s.csv"
    assert score(dirs, source, out) == 0
    rows = sorted(read_rows(out), key=lambda r: int(r["index"]))
    assert [r["prompt"] for r in rows] == ["'" + p for p in risky]
    assert all(r["note"] == "'=cmd|' /C calc'!A0" for r in rows)
    values = pair.tuco(risky)
    assert [float(r["tuco"]) for r in rows] == pytest.approx(values.tolist(), abs=1e-6)
    # a resume compares the escaped cells, and stdout gets the same protection
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:3]))
    capsys.readouterr()
    assert score(dirs, source, out) == 0
    assert "resuming: 2 of 5" in capsys.readouterr().err
    assert len(read_rows(out)) == 5
    assert main(["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(source), "--no-progress"]) == 0
    printed = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert sorted(r["prompt"] for r in printed) == sorted("'" + p for p in risky)
    jsonl = tmp_path / "s.jsonl"
    assert score(dirs, source, jsonl) == 0
    assert sorted(r["prompt"] for r in read_rows(jsonl)) == sorted(risky)  # JSONL is not escaped


# ---------------------------------------------------------------------- fault injection
def _failing_write(monkeypatch, out: Path, *, batch: int, failure: BaseException, truncate_fails: bool = False):
    """Make the ``batch``-th write to ``out`` store all but its last 3 bytes (so its last row is
    torn), then raise ``failure`` (as a full disk does: a short write, then ENOSPC)."""
    real_write, real_truncate, calls = os.write, os.ftruncate, [0]

    def is_out(fd: int) -> bool:
        return os.readlink(f"/proc/self/fd/{fd}") == str(out)

    def write(fd, data):
        if is_out(fd):
            calls[0] += 1
            if calls[0] == batch:
                real_write(fd, bytes(data[:-3]))
                raise failure
        return real_write(fd, data)

    def ftruncate(fd, size):
        if truncate_fails and is_out(fd):
            raise OSError(errno.EIO, "Input/output error")
        return real_truncate(fd, size)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "ftruncate", ftruncate)


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")


@needs_proc
@pytest.mark.parametrize("rollback", [True, False], ids=["rolled back", "truncate fails too"])
def test_a_full_disk_mid_batch_loses_nothing(dirs, expected, tmp_path, capsys, monkeypatch, fmt, rollback):
    source = write_prompts(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / f"s{fmt}"
    full = OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as patch:
        _failing_write(patch, out, batch=3, failure=full, truncate_fails=not rollback)
        assert score(dirs, source, out) == 2
    err = capsys.readouterr().err
    state = "the partial batch was removed" if rollback else "could not be removed and will be cut on the next run"
    assert "No space left on device" in err and state in err and "rerun" in err, err
    if rollback:
        assert len(read_rows(out)) == 4  # two complete batches of two, nothing of the third
    assert score(dirs, source, out) == 0
    err = capsys.readouterr().err
    assert ("note: cut" in err) == (not rollback) and "resuming: " in err, err
    assert_complete(out, PROMPTS, expected)


@needs_proc
def test_ctrl_c_mid_batch_leaves_only_complete_rows(dirs, expected, tmp_path, capsys, monkeypatch, fmt):
    source = write_prompts(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / f"s{fmt}"
    with monkeypatch.context() as patch:
        _failing_write(patch, out, batch=4, failure=KeyboardInterrupt())
        assert score(dirs, source, out) == 130
    assert len(read_rows(out)) == 6
    assert score(dirs, source, out) == 0
    assert_complete(out, PROMPTS, expected)


KILL_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from tuco_lens.cli import main
    real_write, calls, out = os.write, [0], {out!r}
    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{{fd}}") == out:
            calls[0] += 1
            if calls[0] == {batch}:
                real_write(fd, bytes(data[: len(data) // 2 + 3]))  # mid-row, even for equal rows
                os.kill(os.getpid(), signal.{signal})
        return real_write(fd, data)
    os.write = write
    sys.exit(main(sys.argv[1:]))
    """
)


@needs_proc
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_kill_in_the_middle_of_a_batch_write_loses_no_prompt(dirs, expected, tmp_path, capsys, sig):
    prompts = [p + " and the " + w for p in PROMPTS for w in WORDS[:3]]
    source = write_prompts(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "s.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(tuco_lens.__file__).parents[1])}
    code = KILL_MID_WRITE.format(batch=3, signal=sig, out=str(out))
    args = ["score", "--pt", dirs[0], "--ft", dirs[1], "--prompts", str(source), "--out", str(out),
            "--batch-size", "4", "--no-progress"]
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == -getattr(signal, sig), run.stderr
    assert Path(str(out) + ".lock").exists()  # left behind by the killed process
    assert not out.read_bytes().endswith(b"\n")  # the batch was torn
    pair = tuco_lens.load_pair(*dirs)
    reference = {p: float(v) for p, v in zip(prompts, pair.tuco(prompts))}
    assert score(dirs, source, out) == 0
    err = capsys.readouterr().err
    assert "took over a stale lock" in err and "note: cut" in err, err
    resumed = int(err.split("resuming: ")[1].split(" ")[0])
    assert 8 <= resumed < 12  # two whole batches, and the complete rows of the torn one
    assert_complete(out, prompts, reference)
