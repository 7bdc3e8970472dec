"""Cost of the split inside a block (docs/components.md), as ratios to one fine-tuned forward.

Side by side in one run, interleaved repeats (``bench_tuco.interleaved``), on the Llama-style
benchmark pair of ``bench_tuco.py`` (8.4M parameters, built from a config, offline):

* ``fwd``: one fine-tuned forward pass with logits (the denominator);
* ``decompose``: ``pair.decompose`` (whole blocks);
* ``components``: ``pair.decompose(components=True)`` (attention / MLP / MLP←attention at every
  position, heads at the last token). Goal ≤ 2.8× (arithmetic limit ≈ 2.7×: one extra
  pre-trained MLP per layer);
* ``last_token``: ``pair.logit_attribution(components=True)``: component sums and heads at the
  last token only (pre-trained blocks at the last position). Goal ≤ 1.5×;
* ``alpha_components``: ``pair.run_with_alpha(..., {"attn": 0.5, "mlp": 0.5})``.

Peak memory added (PyTorch profiler allocation events, ``bench_tuco.profiled_peak``): goal
≤ 1.3× the forward's.

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_components.py [--grid 8x128,8x256] [--repeats 7]``
(prints a table and, with ``--out FILE``, writes the raw timings as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tuco import build_pair, interleaved, loadavg, profiled_peak, random_tokens  # noqa: E402

GOALS = {"components": (2.8, 1.3), "last_token": (1.5, 1.3)}


def ops_for(pair, tokens, mask) -> dict:
    return {
        "fwd": lambda: pair.ft(tokens, attention_mask=mask),
        "decompose": lambda: pair.decompose(tokens, attention_mask=mask),
        "components": lambda: pair.decompose(tokens, attention_mask=mask, components=True),
        "last_token": lambda: pair.logit_attribution(tokens, attention_mask=mask, components=True),
        "alpha_components": lambda: pair.run_with_alpha(tokens, {"attn": 0.5, "mlp": 0.5}, attention_mask=mask),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="8x128,8x256", help="batch x length shapes (default 8x128,8x256)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write raw timings and memory as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pair = build_pair("llama")
    results = {"threads": args.threads, "loadavg_start": loadavg(), "torch": torch.__version__, "shapes": {}}
    print(f"pair: {pair}; threads {args.threads}; load average {loadavg()}")
    print("| shape | operation | time ratio (median) | goal | peak memory ratio | goal |")
    print("|---|---|---|---|---|---|")
    for shape in args.grid.split(","):
        batch, length = (int(v) for v in shape.split("x"))
        tokens, mask = random_tokens(pair, batch, length)
        ops = ops_for(pair, tokens, mask)
        times, _ = interleaved(ops, repeats=args.repeats, warmup=1)
        medians = {k: statistics.median(v) for k, v in times.items()}
        memory = {k: profiled_peak(fn)["peak_bytes"] for k, fn in ops.items()}
        results["shapes"][shape] = {"times_s": times, "peak_bytes": memory}
        for name in ops:
            if name == "fwd":
                continue
            t_goal, m_goal = GOALS.get(name, (None, None))
            ratio, mem = medians[name] / medians["fwd"], memory[name] / memory["fwd"]
            print(f"| {shape} | {name} | {ratio:.2f}x ({1e3 * medians[name]:.0f} ms) | "
                  f"{f'≤ {t_goal:.1f}x' if t_goal else '-'} | {mem:.2f}x | {f'≤ {m_goal:.1f}x' if m_goal else '-'} |")
    results["loadavg_end"] = loadavg()
    forwards = {s: 1e3 * statistics.median(r["times_s"]["fwd"]) for s, r in results["shapes"].items()}
    print("forward: " + ", ".join(f"{s}: {ms:.0f} ms" for s, ms in forwards.items())
          + f"; load average at the end {loadavg()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
