"""Data-parallel scaling of ``tuco_lens.score_prompts``: 1 process × 1 thread vs 2 processes × 1 thread.

For each pair (the shipped demo pair and a ~10M-parameter Llama-style pair built here from a
config), the same prompts are scored by one process and by two ``torchrun`` processes on the CPU
(gloo), alternating, side by side in one run. Throughput is prompts / wall time from the moment
every process has its pair loaded (a barrier) until the merged output is written (the merge
included). Scaling efficiency = (2-process throughput / 1-process throughput) / 2. The merged
outputs are also checked against the 1-process output (same rows once each, TuCo to 1e-6).

    python benchmarks/bench_scaling.py [--prompts demo=3800,10m=760] [--repeats 3] [--pairs demo,10m]

(3800 demo prompts and 760 prompts on the 10M pair take about 10 s each on one thread.)

Run it on an otherwise idle machine with at least two cores; it prints the load average before
and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tuco_lens


def build_10m_pair(root: Path) -> tuple[Path, Path]:
    """A Llama-style pair (6 layers, d_model 384, MLP 1024, GQA 8/4 heads; ~10.6M parameters) with the demo tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuco_lens import demo

    tokenizer = AutoTokenizer.from_pretrained(demo.FT_DIR)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    dirs = []
    for name, seed in (("pt", 0), ("ft", 1)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if seed:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if ".layers." in pname:
                        p.add_(0.2 * p.std() * torch.randn(p.shape, generator=generator))
        path = root / f"llama-10m-{name}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"built the 10M pair: {n / 1e6:.1f}M parameters per model", flush=True)
    return dirs[0], dirs[1]


def prompts(n: int) -> list[dict]:
    from tuco_lens import demo

    sets = demo.prompt_sets()
    pool = [(name, p) for name in ("web", "chat", "harmful") for p in sets[name]]
    return [{"prompt": pool[i % len(pool)][1], "set": pool[i % len(pool)][0], "copy": i // len(pool)} for i in range(n)]


def worker(args: argparse.Namespace) -> None:
    """One process of a run: load, barrier, score, record the wall times."""
    import torch

    from tuco_lens import demo, load_pair, score_prompts
    from tuco_lens.sharding import current_process

    torch.set_num_threads(1)
    process = current_process()
    pair = demo.load_pair() if args.pair == "demo" else load_pair(args.pt, args.ft)
    records = json.loads(Path(args.records).read_text())
    if process.distributed:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    start = time.time()
    result = score_prompts(records, args.out, pair=pair, batch_size=args.batch_size, threads=1,
                           settings={"pair": args.pair})
    end = time.time()
    Path(f"{args.timing}.{process.rank}.json").write_text(json.dumps(
        {"rank": process.rank, "start": start, "end": end, "scored": result.n_scored, "complete": result.complete}))


def run_once(pair: str, dirs: tuple[Path, Path] | None, processes: int, records: Path, work: Path, tag: str,
             batch_size: int) -> tuple[float, Path]:
    out = work / f"{tag}.jsonl"
    timing = work / f"{tag}.timing"
    command = [sys.executable, __file__, "--worker", "--pair", pair, "--records", str(records), "--out", str(out),
               "--timing", str(timing), "--batch-size", str(batch_size)]
    if dirs:
        command += ["--pt", str(dirs[0]), "--ft", str(dirs[1])]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={29700 + os.getpid() % 200}", "--max_restarts=0",
                   *command[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{done.stderr[-3000:]}")
    times = [json.loads(p.read_text()) for p in sorted(work.glob(f"{tag}.timing.*.json"))]
    assert len(times) == processes and sum(t["scored"] for t in times) > 0
    wall = max(t["end"] for t in times) - min(t["start"] for t in times)
    return wall, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default="demo=3800,10m=760", help="prompts per run, per pair")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", default="demo,10m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("pair", "records", "out", "timing", "pt", "ft"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import pandas as pd

    from tuco_lens.scoring import read_scores

    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"({os.cpu_count()} cores)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        work = Path(tmp)
        counts = {k: int(v) for k, v in (item.split("=") for item in args.prompts.split(","))}
        rows = []
        for pair in args.pairs.split(","):
            n = counts[pair]
            records = work / f"records-{pair}.json"
            records.write_text(json.dumps(prompts(n)))
            dirs = build_10m_pair(work) if pair == "10m" else None
            rates: dict[int, list[float]] = {1: [], 2: []}
            for repeat in range(args.repeats):
                outputs = {}
                for processes in ((1, 2) if repeat % 2 == 0 else (2, 1)):  # alternate the order
                    tag = f"{pair}-{processes}p-{repeat}"
                    wall, outputs[processes] = run_once(pair, dirs, processes, records, work, tag, args.batch_size)
                    rates[processes].append(n / wall)
                    print(f"  {pair:5s} repeat {repeat}: {processes} process(es) x 1 thread: "
                          f"{n / wall:7.1f} prompts/s ({n} prompts in {wall:.2f} s)", flush=True)
                one, two = read_scores(outputs[1]), read_scores(outputs[2])
                assert two["index"].tolist() == list(range(n)) == one["index"].tolist()
                assert (two["prompt"] == one["prompt"]).all()
                difference = float((two["tuco"] - one["tuco"]).abs().max())
                assert difference <= 1e-6, difference
            r1, r2 = statistics.median(rates[1]), statistics.median(rates[2])
            efficiency = r2 / r1 / 2
            per_repeat = [b / a / 2 for a, b in zip(rates[1], rates[2])]
            rows.append({"pair": pair, "prompts": n, "1 process (prompts/s)": round(r1, 1), "2 processes (prompts/s)": round(r2, 1),
                         "speed-up": round(r2 / r1, 3), "efficiency": round(efficiency, 3),
                         "efficiency per repeat": ", ".join(f"{e:.3f}" for e in per_repeat),
                         "max |TuCo diff|": "<= 1e-6"})
    print()
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"\nbatch size {args.batch_size}, {args.repeats} repeats (medians); command: python benchmarks/bench_scaling.py "
          f"--prompts {args.prompts} --repeats {args.repeats} --pairs {args.pairs}")
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
