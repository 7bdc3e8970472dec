"""HookedTransformer vs TransformerBridge: the cost of each tuco_lens verb, side by side.

Loads the shipped demo pair with both backends (offline) and times, interleaved in one run, a
plain fine-tuned forward pass and ``decompose`` / ``tuco`` / ``run_with_alpha`` on the same padded
batch, plus greedy ``pair.generate`` with α against the same generation loop without tuco_lens
hooks (the fine-tuned model's own cost). Prints medians and the ratios to each backend's own forward
(or plain generation); also checks that both backends give the same TuCo.

    OMP_NUM_THREADS=1 python benchmarks/bench_backends.py [--repeats 7] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tuco_lens import demo
from tuco_lens.backends import HAS_HOOKED_TRANSFORMER
from tuco_lens.generation import generate_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    backends = ["hooked", "bridge"] if HAS_HOOKED_TRANSFORMER else ["bridge"]
    pairs = {b: demo.load_pair(backend=b) for b in backends}
    web = demo.prompt_sets()["web"]
    # Longer rows than single demo prompts: four web-text prompts joined (about 60-100 tokens).
    prompts = [" ".join(web[(4 * i + k) % len(web)] for k in range(4)) for i in range(args.batch)]
    ops = {}
    gen = dict(max_new_tokens=args.new_tokens, stop_at_eos=False)
    for name, pair in pairs.items():
        batch = pair.tokenize(prompts)
        tokens, mask = batch.tokens, batch.attention_mask
        ops[name] = {
            "forward": lambda p=pair, t=tokens, m=mask: p.backend.forward(t, m),
            "decompose": lambda p=pair, t=tokens, m=mask: p.decompose(t, attention_mask=m),
            "tuco": lambda p=pair, t=tokens, m=mask: p.tuco(t, attention_mask=m),
            "run_with_alpha": lambda p=pair, t=tokens, m=mask: p.run_with_alpha(t, 0.5, attention_mask=m),
            "generate": lambda p=pair, b=batch: generate_tokens(p.ft, b, **gen),  # no tuco_lens hooks
            "generate_alpha": lambda p=pair, t=tokens, m=mask: p.generate(
                t, attention_mask=m, alpha=0.5, return_type="tokens", **gen
            ),
        }
    times: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, table in ops.items():
                for op, fn in table.items():
                    start = time.perf_counter()
                    fn()
                    if repeat:
                        times.setdefault((name, op), []).append(time.perf_counter() - start)

    print(f"demo pair, {args.batch} prompts (padded to {pairs[backends[0]].tokenize(prompts).tokens.shape[1]} tokens), "
          f"{args.repeats} interleaved repeats, torch threads {torch.get_num_threads()}")
    print(f"{'backend':<10} {'op':<15} {'median ms':>10} {'ratio':>8}")
    for name in ops:
        for op in ops[name]:
            t = statistics.median(times[(name, op)])
            base = "generate" if op == "generate_alpha" else "forward"
            ratio = t / statistics.median(times[(name, base)])
            print(f"{name:<10} {op:<15} {1000 * t:>10.1f} {ratio:>7.2f}x")
    if len(pairs) == 2:
        a, b = (pairs[n].tuco(prompts) for n in backends)
        print(f"max |TuCo hooked - TuCo bridge| = {float((a - b).abs().max()):.2e}")


if __name__ == "__main__":
    main()
