#!/usr/bin/env python
"""Speed and memory of tuco_lens, as ratios to one plain forward pass of the fine-tuned model.

Usage::

    python benchmarks/bench_tuco.py [--quick] [--out benchmarks/results/DATE.json]
                                    [--markdown hooked-grid.md] [--self-check]

Builds two benchmark pairs in place from ``HookedTransformerConfig`` (no download, no file):

* ``llama``: Llama-style, 6 layers, d_model 256, 8 query heads / 2 key-value heads (GQA),
  gated SiLU MLP (704), RMSNorm, rotary, vocabulary 8192 -- 8.44M parameters;
* ``gpt2``: GPT-2-style, 6 layers, d_model 256, 8 heads, MLP 1024, LayerNorm, learned
  positions, vocabulary 8192, context 1536 -- 9.33M parameters;

each as ``pt`` (seeded random init) and ``ft = pt + Gaussian noise on the blocks`` (seeded), in
float32 on CPU with ``torch.set_num_threads(2)``. Inputs are random token ids with an all-ones
attention mask (the mask tuco_lens itself builds for an unpadded tensor, and the one passed to
the plain forward).

Then, for every shape of the grid, **in one run and interleaved** (round-robin over the
operations inside each repeat, starting point rotated between repeats, one warm-up repeat
first), it times

* ``fwd``        ``pair.ft(tokens, attention_mask=mask)`` -> logits: the unit of every ratio;
* ``fwd_blocks`` the same with ``stop_at_layer=n_layers`` (no final norm / unembedding), for
                 context: what the unembedding weighs in ``fwd``;
* ``tuco``       ``pair.tuco`` (the paper's score at the last token);
* ``decompose``  ``pair.decompose`` (all positions, per-layer statistics);
* ``alpha_fwd``  ``pair.run_with_alpha(..., alpha=0.5)`` (logits of the alpha-scaled model);
* ``gen``        ``tuco_lens.generation.generate_tokens(pair.ft, batch, N)`` (plain, KV cache);
* ``gen_alpha``  ``pair.generate(..., alpha=0.5, return_type="tokens")`` (same N);
* ``gen1`` / ``gen1_alpha``  the same with one new token (prefill), to isolate decode steps;
* ``naive``      Algorithm 1 of the paper, literally (``run_with_cache`` on everything, then
                 the pre-trained blocks on the cached inputs, one prompt at a time).

Everything runs under ``torch.inference_mode()``; generation is greedy, ``stop_at_eos=False``.
Ratios are the median over repeats of the per-repeat ratio ``t_op / t_fwd`` (both measured in
the same repeat, seconds apart), which cancels most of the drift of a shared machine.

Peak memory added (CPU) is measured per operation with the PyTorch profiler's allocation events
(``profile_memory=True``): every allocation and free made by the CPU allocator inside the
operation, in time order, integrated into a running total whose maximum is the peak. This counts
exactly the tensors torch allocates (not Python objects or library scratch buffers); it does not
depend on what ran before, so all operations share one process. ``--self-check`` validates it on
known allocations, and an RSS cross-check (a child process with glibc's mmap threshold pinned,
Linux ``/proc/self/clear_refs`` to reset the high-water mark) measures the whole process.
"""

from __future__ import annotations

import argparse
import ctypes
import copy
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop lines
warnings.filterwarnings("ignore")

import torch  # noqa: E402

THREADS = 2
MB = 1e6

# ---------------------------------------------------------------------------- configuration
FULL = dict(
    grid=[(8, 128), (8, 256), (8, 512), (1, 1024)],
    repeats={(8, 128): 7},  # timed repeats per shape; default below
    default_repeats=5,
    warmup=1,
    new_tokens=16,
    growth_lengths=[128, 256, 512, 1024],  # at batch 1
    growth_batches=[1, 2, 4, 8, 16],  # at length growth_lengths[0]
    growth_repeats=5,
    rss_models=("llama", "gpt2"),
    rss_shapes=[(8, 256)],
    lowprec_batch=(16, 128),
    throughput=dict(n_prompts=64, length=97, batch_size=16, repeats=3),
    demo_prompts=256,
)
QUICK = dict(
    grid=[(2, 32)],
    repeats={},
    default_repeats=2,
    warmup=1,
    new_tokens=3,
    growth_lengths=[16, 32],
    growth_batches=[1, 2],
    growth_repeats=2,
    rss_models=("llama",),
    rss_shapes=[(2, 32)],
    lowprec_batch=(2, 16),
    throughput=dict(n_prompts=4, length=97, batch_size=2, repeats=1),
    demo_prompts=16,
)

MODEL_SPECS = {
    "llama": dict(
        n_layers=6, d_model=256, n_heads=8, d_head=32, n_key_value_heads=2, d_mlp=704,
        d_vocab=8192, n_ctx=1536, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", gated_mlp=True, final_rms=True,
    ),
    "gpt2": dict(
        n_layers=6, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=8192, n_ctx=1536,
        act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
    ),
}
NOISE = 0.2  # ft = pt + NOISE * std(param) * N(0, 1) on every block parameter
ALPHA = 0.5

# Goals from the issue: (operation, time ratio, memory ratio); generate is vs plain generate.
GOALS = {
    "decompose": (2.1, 1.3),
    "tuco": (1.4, 1.2),
    "alpha_fwd": (2.1, 1.3),
    "gen_alpha": (2.2, None),
}
TUCO_STRETCH = 1.25
LOWPREC_TOL = {"bfloat16": 2e-2, "float16": 5e-3}


# ---------------------------------------------------------------------------- models
def build_pair(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The benchmark pair ``kind`` ('llama' or 'gpt2'): pt random (seeded), ft = pt + noise."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    import tuco_lens

    cfg = HookedTransformerConfig(**MODEL_SPECS[kind], seed=seed, device="cpu", dtype=torch.float32)
    pt = HookedTransformer(cfg)
    ft = copy.deepcopy(pt)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ft.blocks.parameters():
            p.add_(NOISE * p.std().clamp_min(0.05) * torch.randn(p.shape, generator=gen))
    if dtype != torch.float32:
        pt, ft = cast_model(pt, dtype), cast_model(ft, dtype)
    pt.eval(), ft.eval()
    return tuco_lens.TuCoPair(pt, ft)


def cast_model(model, dtype: torch.dtype):
    """A copy of ``model`` built with ``cfg.dtype = dtype`` and the same (cast) weights."""
    from transformer_lens import HookedTransformer

    cfg = copy.deepcopy(model.cfg)
    cfg.dtype = dtype
    low = HookedTransformer(cfg)
    low.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    return low.eval()


def n_params(pair) -> int:
    return sum(p.numel() for p in pair.ft.parameters())


def random_tokens(pair, batch: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 1000 * batch + length)
    tokens = torch.randint(0, pair.ft.cfg.d_vocab, (batch, length), generator=gen)
    return tokens, torch.ones_like(tokens)


# ---------------------------------------------------------------------------- naive baseline
def naive_tuco(pair, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of the paper, literally, one prompt at a time.

    ``run_with_cache`` of the fine-tuned model with every activation cached (the full forward,
    logits included), then each pre-trained block called on the cached fine-tuned block input;
    ``PTC_l = f_PT(x_l)``, ``FTC_l = f_FT(x_l) - PTC_l`` with ``f_FT(x_l) = resid_post_l - x_l``,
    summed at the last token; TuCo = ||ΣFTC||_1 / (||ΣPTC||_1 + ||ΣFTC||_1).
    """
    pt, ft = pair.pt, pair.ft
    scores = []
    for row, row_mask in zip(tokens, mask):
        prompt = row[row_mask.bool()][None]  # one prompt, unpadded
        _, cache = ft.run_with_cache(prompt)
        i_ptc = torch.zeros(ft.cfg.d_model)
        i_ftc = torch.zeros(ft.cfg.d_model)
        for layer in range(ft.cfg.n_layers):
            x = cache[f"blocks.{layer}.hook_resid_pre"]
            ptc = pt.blocks[layer](x) - x
            ftc = (cache[f"blocks.{layer}.hook_resid_post"] - x) - ptc
            i_ptc += ptc[0, -1].float()
            i_ftc += ftc[0, -1].float()
        f, p = i_ftc.abs().sum(), i_ptc.abs().sum()
        scores.append(f / (p + f))
    return torch.stack(scores)


# ---------------------------------------------------------------------------- operations
def make_ops(pair, tokens, mask, new_tokens: int) -> dict:
    from tuco_lens.generation import generate_tokens

    batch = pair.tokenize(tokens, attention_mask=mask)
    gen_kw = dict(stop_at_eos=False)
    n_layers = pair.n_layers
    return {
        "fwd": lambda: pair.ft(tokens, attention_mask=mask),
        "fwd_blocks": lambda: pair.ft(tokens, attention_mask=mask, stop_at_layer=n_layers),
        "tuco": lambda: pair.tuco(tokens, attention_mask=mask),
        "decompose": lambda: pair.decompose(tokens, attention_mask=mask),
        "alpha_fwd": lambda: pair.run_with_alpha(tokens, ALPHA, attention_mask=mask),
        "gen": lambda: generate_tokens(pair.ft, batch, max_new_tokens=new_tokens, **gen_kw),
        "gen_alpha": lambda: pair.generate(
            tokens, attention_mask=mask, alpha=ALPHA, max_new_tokens=new_tokens,
            return_type="tokens", **gen_kw,
        ),
        "gen1": lambda: generate_tokens(pair.ft, batch, max_new_tokens=1, **gen_kw),
        "gen1_alpha": lambda: pair.generate(
            tokens, attention_mask=mask, alpha=ALPHA, max_new_tokens=1, return_type="tokens",
            **gen_kw,
        ),
        "naive": lambda: naive_tuco(pair, tokens, mask),
    }


def timed(fn) -> tuple[float, object]:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out
    finally:
        gc.enable()


def interleaved(ops: dict, repeats: int, warmup: int, log=None, budget_s: float | None = None,
                min_repeats: int = 3) -> tuple[dict, dict]:
    """Round-robin timing: each repeat runs every op once; the starting op rotates.

    With ``budget_s``, the number of timed repeats is lowered (never below ``min_repeats``) so
    that the estimated time of the timed repeats, from the warm-up repeat, fits the budget.
    """
    names = list(ops)
    times = {k: [] for k in names}
    first = {}
    total = warmup + repeats
    r = 0
    while r < total:
        round_start = time.perf_counter()
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            with torch.inference_mode():
                t, out = timed(ops[name])
            if r < warmup:
                first.setdefault(name, out)
            else:
                times[name].append(t)
            del out
        if budget_s is not None and r == warmup - 1:
            per_round = time.perf_counter() - round_start
            affordable = int((budget_s - per_round) // per_round)  # the warm-up counts too
            if affordable < repeats:
                total = warmup + max(min_repeats, affordable)
        if log:
            log(f"    repeat {r + 1}/{total} done" + (" (warm-up)" if r < warmup else ""))
        r += 1
    return times, first


# ---------------------------------------------------------------------------- memory
def profiled_peak(fn) -> dict:
    """Peak and retained bytes of CPU torch allocations made while ``fn`` runs.

    Uses ``torch.profiler.profile(profile_memory=True)``: the CPU allocator reports every
    allocation (+size) and free (-size) to the profiler; sorted by time, the running sum's
    maximum is the peak added by ``fn``. Frees of blocks allocated before profiling started are
    not reported, so the baseline is exactly "what existed before" and the result does not
    depend on history. The returned value is kept alive until the profile stops, so
    ``retained`` is the size of the result.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = []

    def walk(node):
        extra = node.extra_fields
        if type(extra).__name__ == "_ExtraFields_Allocation" and extra.device.type == "cpu":
            events.append((node.start_time_ns, extra.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort(key=lambda e: e[0])
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    del out
    return {"peak_bytes": int(peak), "retained_bytes": int(running), "n_events": len(events)}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def rss_peak(fn) -> dict:
    """Peak RSS added by ``fn`` (whole process: torch, Python, library scratch).

    Frees heap memory back to the OS (``malloc_trim``), resets the kernel's high-water mark
    (``/proc/self/clear_refs`` <- 5, Linux >= 4.0) to the current RSS, runs ``fn`` and reads
    ``VmHWM``. Meaningful when glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``), so
    freed large blocks return to the OS instead of being reused silently from the heap.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    with torch.inference_mode():
        out = fn()
    peak = _status_kb("VmHWM")
    del out
    return {"peak_bytes": (peak - base) * 1024}


def rss_child(kind: str, shapes: list[tuple[int, int]], new_tokens: int) -> dict:
    pair = build_pair(kind)
    gc.collect()
    gc.freeze()
    out = {}
    for b, p in shapes:
        tokens, mask = random_tokens(pair, b, p)
        ops = make_ops(pair, tokens, mask, new_tokens)
        res = {}
        for name, fn in ops.items():
            with torch.inference_mode():
                fn()  # warm-up
            res[name] = rss_peak(fn)
        out[f"{b}x{p}"] = res
    return out


def run_rss_child(kind: str, shapes, new_tokens: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    arg = json.dumps({"kind": kind, "shapes": shapes, "new_tokens": new_tokens})
    proc = subprocess.run(
        [sys.executable, __file__, "--_rss-child", arg, "--threads", str(torch.get_num_threads())],
        env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _verify(checks: dict, expected: dict, tol: float) -> None:
    """Print each check against its expected MB; stop the run at the first that is off by more than ``tol``."""
    for key, want in expected.items():
        got = checks[key]
        status = "ok" if abs(got - want) <= tol * want else "FAILED"
        print(f"  self-check {key}: {got:.2f} MB (expected {want}) {status}")
        if status != "ok":
            raise SystemExit(f"memory self-check failed: {key}")


def profiler_self_check() -> dict:
    """Validate :func:`profiled_peak` on known allocations: 100 MB; 100 and 50 in, 100 out, 20 in and
    out (peak 150 MB, 50 MB retained)."""
    n = int(100 * MB)

    def one_block():
        return torch.empty(n, dtype=torch.uint8)

    def sequence():  # peak 150 MB, retains 50 MB
        a = torch.empty(n, dtype=torch.uint8)
        b = torch.empty(n // 2, dtype=torch.uint8)
        del a
        c = torch.empty(n // 5, dtype=torch.uint8)
        del c
        return b

    prof_one = profiled_peak(one_block)
    prof_seq = profiled_peak(sequence)
    checks = {
        "profiler_empty_100MB": prof_one["peak_bytes"] / MB,
        "profiler_sequence_peak_150MB": prof_seq["peak_bytes"] / MB,
        "profiler_sequence_retained_50MB": prof_seq["retained_bytes"] / MB,
    }
    _verify(checks, {"profiler_empty_100MB": 100, "profiler_sequence_peak_150MB": 150,
                     "profiler_sequence_retained_50MB": 50}, tol=0.001)
    return checks


def self_check() -> dict:
    """Validate both memory methods on known allocations."""
    checks = profiler_self_check()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, __file__, "--_rss-self-check"], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    _verify(rss, {"rss_ones_100MB": 100, "rss_sequence_peak_150MB": 150}, tol=0.03)
    return {**checks, **rss}


def _rss_self_check() -> dict:
    n = int(100 * MB)

    def touched():
        return torch.ones(n, dtype=torch.uint8)

    def sequence():
        a = torch.ones(n, dtype=torch.uint8)
        b = torch.ones(n // 2, dtype=torch.uint8)
        del a
        c = torch.ones(n // 5, dtype=torch.uint8)
        del c
        return b

    return {
        "rss_ones_100MB": rss_peak(touched)["peak_bytes"] / MB,
        "rss_sequence_peak_150MB": rss_peak(sequence)["peak_bytes"] / MB,
    }


# ---------------------------------------------------------------------------- summaries
def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize_shape(times: dict, new_tokens: int) -> dict:
    n = len(times["fwd"])
    per_round = {k: [times[k][i] / times["fwd"][i] for i in range(n)] for k in times}
    s = {
        "median_s": {k: med(v) for k, v in times.items()},
        "ratio_to_fwd": {k: med(v) for k, v in per_round.items()},
        "ratio_of_medians_to_fwd": {k: med(v) / med(times["fwd"]) for k, v in times.items()},
        "ratio_to_fwd_iqr": {
            k: [statistics.quantiles(v, n=4)[0], statistics.quantiles(v, n=4)[2]] if len(v) >= 2 else None
            for k, v in per_round.items()
        },
    }
    gen_ratio = [times["gen_alpha"][i] / times["gen"][i] for i in range(n)]
    decode = []
    for i in range(n):
        plain = times["gen"][i] - times["gen1"][i]
        alpha = times["gen_alpha"][i] - times["gen1_alpha"][i]
        if plain > 0 and alpha > 0:
            decode.append(alpha / plain)
    s["gen_alpha_vs_gen"] = med(gen_ratio)
    s["gen_per_token_s"] = med(times["gen"]) / new_tokens
    s["gen_alpha_per_token_s"] = med(times["gen_alpha"]) / new_tokens
    s["decode_only_alpha_vs_plain"] = med(decode)
    s["decode_only_per_token_s"] = {
        "gen": (med(times["gen"]) - med(times["gen1"])) / max(new_tokens - 1, 1),
        "gen_alpha": (med(times["gen_alpha"]) - med(times["gen1_alpha"])) / max(new_tokens - 1, 1),
    }
    s["naive_vs_tuco"] = med([times["naive"][i] / times["tuco"][i] for i in range(n)])
    # Against the forward pass without unembedding. run_with_alpha computes logits too, so the
    # unembedding's time (fwd - fwd_blocks, same repeat) is taken out of it first.
    def vs_blocks(k, t, i=None):
        get = (lambda name: t[name][i]) if i is not None else (lambda name: t[name])
        unembed = get("fwd") - get("fwd_blocks") if k == "alpha_fwd" else 0.0
        return (get(k) - unembed) / get("fwd_blocks")

    s["ratio_to_fwd_blocks"] = {
        k: med([vs_blocks(k, times, i) for i in range(n)]) for k in ("tuco", "decompose", "alpha_fwd")
    }
    # Load from other processes only ever slows an operation down, so the fastest repeat of each
    # operation is a second, burst-insensitive estimate (ratios of minimums).
    fast = {k: min(v) for k, v in times.items()}
    decode_plain = fast["gen"] - fast["gen1"]
    decode_alpha = fast["gen_alpha"] - fast["gen1_alpha"]
    s["fastest"] = {
        "ratio_to_fwd": {k: v / fast["fwd"] for k, v in fast.items()},
        "ratio_to_fwd_blocks": {k: vs_blocks(k, fast) for k in ("tuco", "decompose", "alpha_fwd")},
        "gen_alpha_vs_gen": fast["gen_alpha"] / fast["gen"],
        "decode_only_alpha_vs_plain": decode_alpha / decode_plain if decode_plain > 0 and decode_alpha > 0 else float("nan"),
        "naive_vs_tuco": fast["naive"] / fast["tuco"],
    }
    return s


# ---------------------------------------------------------------------------- benchmark parts
def bench_grid(pair, kind: str, cfg: dict, log) -> dict:
    results = {}
    for b, p in cfg["grid"]:
        key = f"{b}x{p}"
        tokens, mask = random_tokens(pair, b, p)
        ops = make_ops(pair, tokens, mask, cfg["new_tokens"])
        repeats = cfg["repeats"].get((b, p), cfg["default_repeats"])
        log(f"  [{kind} {key}] timing {len(ops)} ops x {repeats} repeats (+{cfg['warmup']} warm-up)")
        budget = cfg.get("budget")
        budget_s = None if budget is None else budget["remaining_s"] / budget["runs_left"]
        t_start = time.perf_counter()
        times, first = interleaved(ops, repeats, cfg["warmup"], log, budget_s=budget_s)
        if budget is not None:
            budget["remaining_s"] -= time.perf_counter() - t_start
            budget["runs_left"] -= 1
        repeats = len(times["fwd"])
        # correctness before speed: the naive baseline must agree with pair.tuco
        diff = float((first["naive"].double() - first["tuco"].double()).abs().max())
        assert diff <= 1e-5, f"naive baseline differs from pair.tuco by {diff} at {key}"
        dec_diff = float((first["decompose"].tuco.double() - first["tuco"].double()).abs().max())
        assert dec_diff <= 1e-5, f"decompose().tuco differs from pair.tuco by {dec_diff}"
        gen_same = bool(torch.equal(first["gen"][:, :p], first["gen_alpha"][:, :p]))
        summary = summarize_shape(times, cfg["new_tokens"])
        log(f"  [{kind} {key}] memory (profiler)")
        memory = {name: profiled_peak(fn) for name, fn in ops.items()}
        base = memory["fwd"]["peak_bytes"]
        mem_ratio = {k: v["peak_bytes"] / base for k, v in memory.items()}
        mem_ratio["gen_alpha_vs_gen"] = memory["gen_alpha"]["peak_bytes"] / memory["gen"]["peak_bytes"]
        results[key] = dict(
            batch=b, length=p, repeats=repeats, warmup=cfg["warmup"], new_tokens=cfg["new_tokens"],
            times_s=times, summary=summary, memory=memory, memory_ratio_to_fwd=mem_ratio,
            naive_max_abs_diff=diff, decompose_max_abs_diff=dec_diff, prompt_kept_in_generate=gen_same,
            prompts_per_s_tuco=b / summary["median_s"]["tuco"],
            prompts_per_s_decompose=b / summary["median_s"]["decompose"],
            prompts_per_s_naive=b / summary["median_s"]["naive"],
        )
        r = summary["ratio_to_fwd"]
        log(
            f"  [{kind} {key}] fwd {summary['median_s']['fwd'] * 1e3:.0f} ms | tuco {r['tuco']:.2f}x "
            f"decompose {r['decompose']:.2f}x alpha_fwd {r['alpha_fwd']:.2f}x naive {r['naive']:.2f}x "
            f"| gen_alpha/gen {summary['gen_alpha_vs_gen']:.2f} (decode {summary['decode_only_alpha_vs_plain']:.2f})"
            f" | mem tuco {mem_ratio['tuco']:.2f} dec {mem_ratio['decompose']:.2f} "
            f"alpha {mem_ratio['alpha_fwd']:.2f}"
        )
    return results


def bench_growth(pair, kind: str, cfg: dict, log) -> dict:
    """Time of pair.tuco and the plain forward vs length (batch 1) and vs batch (length 128)."""
    out = {"length": {}, "batch": {}}
    sweeps = [("length", [(1, p) for p in cfg["growth_lengths"]]),
              ("batch", [(b, cfg["growth_lengths"][0]) for b in cfg["growth_batches"]])]
    for axis, shapes in sweeps:
        for b, p in shapes:
            tokens, mask = random_tokens(pair, b, p, seed=7)
            ops = {
                "fwd": lambda t=tokens, m=mask: pair.ft(t, attention_mask=m),
                "tuco": lambda t=tokens, m=mask: pair.tuco(t, attention_mask=m),
            }
            times, _ = interleaved(ops, cfg["growth_repeats"], 1)
            n = len(times["fwd"])
            out[axis][f"{b}x{p}"] = dict(
                batch=b, length=p, times_s=times,
                fwd_s=med(times["fwd"]), tuco_s=med(times["tuco"]),
                ratio=med([times["tuco"][i] / times["fwd"][i] for i in range(n)]),
            )
        log(f"  [{kind}] growth vs {axis}: " + ", ".join(
            f"{k} {v['fwd_s'] * 1e3:.0f}/{v['tuco_s'] * 1e3:.0f} ms" for k, v in out[axis].items()))
    return out


def bench_lowprec(kind: str, cfg: dict, log) -> dict:
    pair = build_pair(kind)
    b, p = cfg["lowprec_batch"]
    tokens, mask = random_tokens(pair, b, p, seed=3)
    with torch.inference_mode():
        ref = pair.tuco(tokens, attention_mask=mask).double()
        ref_dec = pair.decompose(tokens, attention_mask=mask)
    out = {"batch": b, "length": p, "tuco_fp32_range": [float(ref.min()), float(ref.max())]}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        low = build_pair(kind, dtype=dtype)
        with torch.inference_mode():
            t0 = time.perf_counter()
            got = low.tuco(tokens, attention_mask=mask).double()
            t_low = time.perf_counter() - t0
            dec = low.decompose(tokens, attention_mask=mask)
        real = mask.bool()
        per_token = (dec.tuco_per_token.double() - ref_dec.tuco_per_token.double()).abs()[real]
        out[name] = {
            "max_abs_diff_tuco": float((got - ref).abs().max()),
            "mean_abs_diff_tuco": float((got - ref).abs().mean()),
            "max_abs_diff_tuco_per_token": float(per_token.max()),
            "tolerance": LOWPREC_TOL[name],
            "within_tolerance": bool((got - ref).abs().max() <= LOWPREC_TOL[name]),
            "tuco_time_s_single_run": t_low,
        }
        log(f"  [{kind}] {name}: max |TuCo - TuCo_fp32| = {out[name]['max_abs_diff_tuco']:.2e} "
            f"(all positions {out[name]['max_abs_diff_tuco_per_token']:.2e})")
    return out


def bench_throughput(pair, kind: str, cfg: dict, log) -> dict:
    """Prompts per second of pair.tuco on many prompts of the paper's web-text length (97)."""
    spec = cfg["throughput"]
    tokens, mask = random_tokens(pair, spec["n_prompts"], spec["length"], seed=11)
    ops = {
        "tuco": lambda: pair.tuco(tokens, attention_mask=mask, batch_size=spec["batch_size"]),
        "decompose": lambda: pair.decompose(tokens, attention_mask=mask, batch_size=spec["batch_size"]),
    }
    times, _ = interleaved(ops, spec["repeats"], 1)
    out = dict(spec, times_s=times, prompts_per_s={k: spec["n_prompts"] / med(v) for k, v in times.items()})
    log(f"  [{kind}] throughput: " + ", ".join(f"{k} {v:.1f} prompts/s" for k, v in out["prompts_per_s"].items()))
    return out


def bench_demo(quick: bool, log) -> dict:
    try:
        import tuco_lens.demo as demo

        pair = demo.load_pair()
    except Exception as exc:  # noqa: BLE001 - report why the demo pair was skipped
        log(f"  demo pair skipped: {type(exc).__name__}: {str(exc)[:200]}")
        return {"available": False, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    sets = demo.prompt_sets()
    prompts = [p for name in sorted(sets) for p in sets[name]]
    n = min(len(prompts), (QUICK if quick else FULL)["demo_prompts"])
    prompts = prompts[:n]
    batch = pair.tokenize(prompts, prepend_bos=False)
    lengths = batch.attention_mask.sum(-1).float()
    ops = {
        "tuco": lambda: pair.tuco(prompts, prepend_bos=False, batch_size=32),
        "decompose": lambda: pair.decompose(prompts, prepend_bos=False, batch_size=32),
    }
    times, _ = interleaved(ops, 1 if quick else 3, 1)
    out = {
        "available": True, "n_prompts": n, "n_params": n_params(pair), "n_layers": pair.n_layers,
        "d_model": pair.ft.cfg.d_model, "mean_tokens": float(lengths.mean()),
        "max_tokens": int(lengths.max()), "times_s": times,
        "prompts_per_s": {k: n / med(v) for k, v in times.items()},
    }
    log("  demo pair: " + ", ".join(f"{k} {v:.1f} prompts/s" for k, v in out["prompts_per_s"].items()))
    return out


# ---------------------------------------------------------------------------- environment
def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib.metadata import version

    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformer_lens": version("transformer-lens"),
        "transformers": version("transformers"),
        "tuco_lens": version("tuco_lens"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------------------- markdown
def fmt_ratio(x: float, goal: float | None = None) -> str:
    if x != x:  # nan
        return "–"
    s = f"{x:.2f}×"
    if goal is not None and x > goal:
        s = f"**{s}**"
    return s


def fr_join(ratios: dict) -> str:
    return " / ".join(fmt_ratio(ratios[k]) for k in ("tuco", "decompose", "alpha_fwd"))


def goal_verdicts(results: dict) -> list[dict]:
    rows = []
    for op, (tgoal, mgoal) in GOALS.items():
        worst_t, worst_t_at, worst_m, worst_m_at, worst_f, worst_f_at = 0.0, "", 0.0, "", 0.0, ""
        worst_b, worst_b_at = float("nan"), ""
        for kind, res in results["models"].items():
            for key, r in res["grid"].items():
                if op == "gen_alpha":
                    t = r["summary"]["gen_alpha_vs_gen"]
                    f = r["summary"]["fastest"]["gen_alpha_vs_gen"]
                    m = r["memory_ratio_to_fwd"]["gen_alpha_vs_gen"]
                else:
                    t = r["summary"]["ratio_to_fwd"][op]
                    f = r["summary"]["fastest"]["ratio_to_fwd"][op]
                    m = r["memory_ratio_to_fwd"][op]
                    tb = r["summary"]["ratio_to_fwd_blocks"][op]
                    if not tb <= worst_b:  # also replaces the initial nan
                        worst_b, worst_b_at = tb, f"{kind} {key}"
                if t > worst_t:
                    worst_t, worst_t_at = t, f"{kind} {key}"
                if f > worst_f:
                    worst_f, worst_f_at = f, f"{kind} {key}"
                if m > worst_m:
                    worst_m, worst_m_at = m, f"{kind} {key}"
        rows.append(dict(op=op, time_goal=tgoal, worst_time=worst_t, worst_time_at=worst_t_at,
                         worst_fastest=worst_f, worst_fastest_at=worst_f_at,
                         worst_vs_blocks=worst_b, worst_vs_blocks_at=worst_b_at,
                         mem_goal=mgoal, worst_mem=worst_m, worst_mem_at=worst_m_at))
    return rows


OP_LABELS = {
    "tuco": "`pair.tuco`",
    "decompose": "`pair.decompose`",
    "alpha_fwd": "`pair.run_with_alpha`",
    "gen_alpha": "`pair.generate` (α) per token vs plain `generate`",
}


def write_markdown(results: dict, path: Path) -> None:
    meta, m = results["meta"], results["meta"]["machine"]
    L = []
    add = L.append
    add("# Performance of tuco_lens")
    add("")
    add("*Generated by `benchmarks/bench_tuco.py`; do not edit by hand — re-run the command below.*")
    add("")
    add("```bash")
    add(meta["command"])
    add("```")
    add("")
    add(f"- **Date**: {meta['date']} (run took {meta['duration_s'] / 60:.1f} min)")
    add(f"- **Machine**: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, "
        f"`torch.set_num_threads({m['torch_threads']})`, {m['platform']}")
    add(f"- **Software**: Python {m['python']}, torch {m['torch']}, transformer-lens "
        f"{m['transformer_lens']}, transformers {m['transformers']}, tuco_lens {m['tuco_lens']}")
    add(f"- **Load average** (1/5/15 min) at start {meta['loadavg_start']}, at end "
        f"{meta['loadavg_end']}. {meta.get('note', '')}")
    add(f"- **Mode**: {'`--quick` smoke run (small shapes; not representative)' if meta['quick'] else 'full grid'}; "
        f"float32 on CPU; everything under `torch.inference_mode()`; α = {ALPHA}; greedy generation "
        f"of {results['config']['new_tokens']} new tokens, `stop_at_eos=False`.")
    add("")
    add("## Benchmark pairs")
    add("")
    add("Built in place from `HookedTransformerConfig` (no download): `pt` with a seeded random init, "
        f"`ft = pt + {NOISE}·std(param)·N(0,1)` on every block parameter (embedding, final norm and "
        "unembedding shared). Inputs: random token ids, all-ones attention mask.")
    add("")
    add("| pair | layers | d_model | heads (kv) | d_mlp | norm / positions | vocab | parameters |")
    add("|---|---|---|---|---|---|---|---|")
    for kind, res in results["models"].items():
        s = MODEL_SPECS[kind]
        heads = f"{s['n_heads']} ({s.get('n_key_value_heads') or s['n_heads']})"
        mlp = f"{s['d_mlp']}{' gated' if s.get('gated_mlp') else ''}"
        add(f"| {kind} | {s['n_layers']} | {s['d_model']} | {heads} | {mlp} | "
            f"{s['normalization_type']} / {s['positional_embedding_type']} | {s['d_vocab']} | "
            f"{res['n_params'] / 1e6:.2f}M |")
    add("")
    add("## How to read")
    add("")
    add("- Every ratio is **time (or peak memory added) of the operation ÷ that of one plain forward "
        "pass of the fine-tuned model** (`pair.ft(tokens, attention_mask=mask)`, logits returned) on "
        "the same batch, measured in the same run. Time ratios are the median over repeats of the "
        "per-repeat ratio (operations interleaved round-robin within each repeat, one warm-up repeat "
        "first), so slow drift of a shared machine cancels. A ratio below its goal meets the goal; "
        "**bold** marks a ratio above its goal.")
    add("- `generate` columns compare `pair.generate(..., alpha)` with plain `generate_tokens(pair.ft, …)` "
        "for the same number of new tokens: *per token* is total time ÷ new tokens (prefill "
        "included, as a user experiences it); *decode only* is (time with N tokens − time with 1 "
        "token) of α ÷ the same for plain, i.e. the steady-state cost per step with the KV cache.")
    add("- `naive` is Algorithm 1 of the paper taken literally: `run_with_cache` of the fine-tuned "
        "model caching everything (logits included), then each pre-trained block called on the "
        "cached block inputs, one prompt at a time. It agrees with `pair.tuco` within 1e-5 "
        "(asserted at every shape before timing counts). *Speed-up* = naive time ÷ `pair.tuco` time.")
    add("- Peak memory added is the maximum, over the operation, of CPU bytes allocated by torch minus "
        "bytes freed (see *Memory method* below). At 8 × 128 the plain forward's peak is set by its "
        "logits (`batch × length × vocab × 4` bytes), which `pair.tuco` and `pair.decompose` never "
        "compute; from 8 × 256 on it is set by TransformerLens's attention temporaries (several "
        "`batch × heads × length²` float32 tensors inside one layer), which every operation shares.")
    add("")
    add("## Goals")
    add("")
    add("Worst case over both pairs and all shapes of the grid. The goals are defined against the plain "
        "forward pass with logits; the column *worst vs forward w/o unembed* is the same median ratio "
        "against the forward pass without the unembedding (see below), the closer guide for a large "
        "model, whose unembedding is a small part of the forward pass.")
    add("")
    add("| operation | time goal | worst time ratio (median of repeats) | time | worst, fastest repeats | worst vs forward w/o unembed | memory goal | worst memory ratio | memory |")
    add("|---|---|---|---|---|---|---|---|---|")
    for g in results["goals"]:
        t_ok = g["worst_time"] <= g["time_goal"]
        t_txt = "met" if t_ok else f"not met (+{(g['worst_time'] / g['time_goal'] - 1) * 100:.0f}%)"
        if g["op"] == "tuco":
            t_txt += "; stretch " + ("met" if g["worst_time"] <= TUCO_STRETCH else "not met") + f" (≤ {TUCO_STRETCH}×)"
        if g["mem_goal"] is None:
            m_txt, m_goal = "–", "–"
        else:
            m_ok = g["worst_mem"] <= g["mem_goal"]
            m_goal = f"≤ {g['mem_goal']}×"
            m_txt = "met" if m_ok else f"not met (+{(g['worst_mem'] / g['mem_goal'] - 1) * 100:.0f}%)"
        f_txt = f"{g['worst_fastest']:.2f}× ({g['worst_fastest_at']})"
        if g["worst_vs_blocks"] == g["worst_vs_blocks"]:
            f_txt += f" | {g['worst_vs_blocks']:.2f}× ({g['worst_vs_blocks_at']})"
        else:
            f_txt += " | –"
        add(f"| {OP_LABELS[g['op']]} | ≤ {g['time_goal']}× | {g['worst_time']:.2f}× ({g['worst_time_at']}) | "
            f"{t_txt} | {f_txt} | {m_goal} | {g['worst_mem']:.2f}× ({g['worst_mem_at']}) | {m_txt} |")
    add("")
    over = []
    for g in results["goals"]:
        if g["op"] == "gen_alpha" or g["worst_vs_blocks"] != g["worst_vs_blocks"]:
            continue
        goal = TUCO_STRETCH if g["op"] == "tuco" else g["time_goal"]
        if g["worst_vs_blocks"] > goal:
            name = "the stretch goal of " if g["op"] == "tuco" else ""
            over.append(f"{OP_LABELS[g['op']]} exceeds {name}{goal}× by "
                        f"{(g['worst_vs_blocks'] / goal - 1) * 100:.0f}% ({g['worst_vs_blocks']:.2f}× at "
                        f"{g['worst_vs_blocks_at']})")
    not_met = [g for g in results["goals"] if g["worst_time"] > g["time_goal"]
               or (g["mem_goal"] is not None and g["worst_mem"] > g["mem_goal"])]
    add(("Every goal is met against the forward pass with logits. " if not not_met else
         "Goals not met: " + ", ".join(OP_LABELS[g["op"]] for g in not_met) + ". ")
        + ("Against the forward pass without the unembedding, " + "; ".join(over) + "." if over else
           "Against the forward pass without the unembedding every time goal is met too."))
    add("")
    add("## Time (ratio to one fine-tuned forward)")
    add("")
    add("| pair | batch × length | forward | forward w/o unembed | `tuco` | `decompose` | `run_with_alpha` | generate α ÷ plain, per token | decode only | naive | speed-up naive → `tuco` | repeats |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, res in results["models"].items():
        for key, r in res["grid"].items():
            s = r["summary"]
            rt = s["ratio_to_fwd"]
            add(f"| {kind} | {r['batch']} × {r['length']} | {s['median_s']['fwd'] * 1e3:.0f} ms | "
                f"{fmt_ratio(rt['fwd_blocks'])} | {fmt_ratio(rt['tuco'], GOALS['tuco'][0])} | {fmt_ratio(rt['decompose'], GOALS['decompose'][0])} | "
                f"{fmt_ratio(rt['alpha_fwd'], GOALS['alpha_fwd'][0])} | "
                f"{fmt_ratio(s['gen_alpha_vs_gen'], GOALS['gen_alpha'][0])} "
                f"({s['gen_per_token_s'] * 1e3:.0f} → {s['gen_alpha_per_token_s'] * 1e3:.0f} ms) | "
                f"{fmt_ratio(s['decode_only_alpha_vs_plain'])} | {fmt_ratio(rt['naive'])} | "
                f"{s['naive_vs_tuco']:.2f}× | {r['repeats']} |")
    add("")
    add("The same ratios from the **fastest repeat** of each operation (ratio of minimums). Load from "
        "other processes only slows operations down, so on a shared machine this is the less "
        "burst-sensitive estimate; on an idle machine both agree:")
    add("")
    add("| pair | batch × length | `tuco` | `decompose` | `run_with_alpha` | generate α ÷ plain | decode only | naive |")
    add("|---|---|---|---|---|---|---|---|")
    for kind, res in results["models"].items():
        for key, r in res["grid"].items():
            fs = r["summary"]["fastest"]
            fr = fs["ratio_to_fwd"]
            add(f"| {kind} | {r['batch']} × {r['length']} | {fmt_ratio(fr['tuco'], GOALS['tuco'][0])} | "
                f"{fmt_ratio(fr['decompose'], GOALS['decompose'][0])} | "
                f"{fmt_ratio(fr['alpha_fwd'], GOALS['alpha_fwd'][0])} | "
                f"{fmt_ratio(fs['gen_alpha_vs_gen'], GOALS['gen_alpha'][0])} | "
                f"{fmt_ratio(fs['decode_only_alpha_vs_plain'])} | {fmt_ratio(fr['naive'])} |")
    add("")
    add("The benchmark pairs have a large vocabulary for their width (8192 × 256), so the unembedding "
        "is a sizeable part of one forward pass (column *forward w/o unembed*); in a 7B model it is a "
        "few per cent. The same ratios against the forward pass **without** the unembedding "
        "(`stop_at_layer=n_layers`) are closer to what a large model shows (`run_with_alpha` returns "
        "logits, so the unembedding's time, forward − forward w/o unembed in the same repeat, is "
        "subtracted from it first):")
    add("")
    add("| pair | batch × length | `tuco` | `decompose` | `run_with_alpha` | same, fastest repeats |")
    add("|---|---|---|---|---|---|")
    for kind, res in results["models"].items():
        for key, r in res["grid"].items():
            rb = r["summary"]["ratio_to_fwd_blocks"]
            fb = r["summary"]["fastest"]["ratio_to_fwd_blocks"]
            add(f"| {kind} | {r['batch']} × {r['length']} | {fmt_ratio(rb['tuco'])} | "
                f"{fmt_ratio(rb['decompose'])} | {fmt_ratio(rb['alpha_fwd'])} | "
                f"{fr_join(fb)} |")
    add("")
    add("## Peak memory added (ratio to the plain forward's)")
    add("")
    add("| pair | batch × length | forward | forward w/o unembed | `tuco` | `decompose` | `run_with_alpha` | generate α ÷ plain generate | naive |")
    add("|---|---|---|---|---|---|---|---|---|")
    for kind, res in results["models"].items():
        for key, r in res["grid"].items():
            mr, mem = r["memory_ratio_to_fwd"], r["memory"]
            add(f"| {kind} | {r['batch']} × {r['length']} | {mem['fwd']['peak_bytes'] / MB:.1f} MB | "
                f"{fmt_ratio(mr['fwd_blocks'])} | {fmt_ratio(mr['tuco'], GOALS['tuco'][1])} | {fmt_ratio(mr['decompose'], GOALS['decompose'][1])} | "
                f"{fmt_ratio(mr['alpha_fwd'], GOALS['alpha_fwd'][1])} | {fmt_ratio(mr['gen_alpha_vs_gen'])} "
                f"({mem['gen']['peak_bytes'] / MB:.1f} → {mem['gen_alpha']['peak_bytes'] / MB:.1f} MB) | "
                f"{fmt_ratio(mr['naive'])} |")
    add("")
    rss = {k: v.get("rss") for k, v in results["models"].items() if v.get("rss")}
    if rss:
        add("RSS cross-check (whole process, see *Memory method*), peak added in MB, torch-profiler "
            "value in parentheses:")
        add("")
        names = ["fwd", "tuco", "decompose", "alpha_fwd", "gen", "gen_alpha", "naive"]
        add("| pair | batch × length | " + " | ".join(f"`{n}`" for n in names) + " |")
        add("|---|---|" + "---|" * len(names))
        for kind, per_shape in rss.items():
            for key, vals in per_shape.items():
                prof = results["models"][kind]["grid"].get(key, {}).get("memory", {})
                cells = []
                for n in names:
                    p = prof.get(n, {}).get("peak_bytes")
                    cells.append(f"{vals[n]['peak_bytes'] / MB:.1f}" + (f" ({p / MB:.1f})" if p is not None else ""))
                add(f"| {kind} | {key.replace('x', ' × ')} | " + " | ".join(cells) + " |")
        add("")
    add("## Growth with length and batch (`pair.tuco` vs plain forward)")
    add("")
    for axis, title in (("length", "batch 1"), ("batch", f"length {results['config']['growth_lengths'][0]}")):
        add(f"Vs {axis} ({title}):")
        add("")
        add(f"| pair | batch × length | forward | × previous row | `pair.tuco` | × previous row | `tuco` ÷ forward | forward per token | `tuco` per token |")
        add("|---|---|---|---|---|---|---|---|---|")
        for kind, res in results["models"].items():
            prev = None
            for key, g in res["growth"][axis].items():
                ntok = g["batch"] * g["length"]
                grow_f = "–" if prev is None else f"{g['fwd_s'] / prev['fwd_s']:.2f}×"
                grow_t = "–" if prev is None else f"{g['tuco_s'] / prev['tuco_s']:.2f}×"
                add(f"| {kind} | {g['batch']} × {g['length']} | {g['fwd_s'] * 1e3:.0f} ms | {grow_f} | "
                    f"{g['tuco_s'] * 1e3:.0f} ms | {grow_t} | {g['ratio']:.2f}× | "
                    f"{g['fwd_s'] / ntok * 1e6:.0f} µs | {g['tuco_s'] / ntok * 1e6:.0f} µs |")
                prev = g
        add("")
    add("## Prompts per second")
    add("")
    add("| pair | workload | `pair.tuco` | `pair.decompose` | naive |")
    add("|---|---|---|---|---|")
    for kind, res in results["models"].items():
        tp = res["throughput"]
        add(f"| {kind} | {tp['n_prompts']} prompts × {tp['length']} tokens, `batch_size={tp['batch_size']}` | "
            f"{tp['prompts_per_s']['tuco']:.1f} | {tp['prompts_per_s']['decompose']:.1f} | – |")
        for key, r in res["grid"].items():
            add(f"| {kind} | one batch {r['batch']} × {r['length']} | {r['prompts_per_s_tuco']:.1f} | "
                f"{r['prompts_per_s_decompose']:.1f} | {r['prompts_per_s_naive']:.1f} |")
    demo = results.get("demo", {})
    if demo.get("available"):
        add(f"| demo (`tuco_lens.demo.load_pair()`, {demo['n_params'] / 1e6:.2f}M params) | "
            f"{demo['n_prompts']} prompt-set prompts, mean {demo['mean_tokens']:.0f} tokens, `batch_size=32` | "
            f"{demo['prompts_per_s']['tuco']:.1f} | {demo['prompts_per_s']['decompose']:.1f} | – |")
    add("")
    if not demo.get("available"):
        add(f"The demo pair was not measured: {demo.get('reason', 'not run')}.")
        add("")
    add("## Low precision")
    add("")
    add("The same pairs cast to bfloat16 and float16 (sums accumulated in float32, tuco_lens's "
        "default), scored on the same prompts as float32:")
    add("")
    add("| pair | prompts | dtype | max \\|TuCo − TuCo_fp32\\| | mean | max over all positions (`tuco_per_token`) | stated tolerance | within |")
    add("|---|---|---|---|---|---|---|---|")
    for kind, res in results["models"].items():
        lp = res["lowprec"]
        for name in ("bfloat16", "float16"):
            v = lp[name]
            add(f"| {kind} | {lp['batch']} × {lp['length']} | {name} | {v['max_abs_diff_tuco']:.1e} | "
                f"{v['mean_abs_diff_tuco']:.1e} | {v['max_abs_diff_tuco_per_token']:.1e} | "
                f"{v['tolerance']:.0e} | {'yes' if v['within_tolerance'] else '**no**'} |")
    add("")
    add("## Memory method")
    add("")
    add("Peak memory added is measured with `torch.profiler.profile(profile_memory=True)`: while "
        "profiling, PyTorch's CPU allocator reports every allocation (+bytes) and free (−bytes) with a "
        "timestamp. The benchmark walks the profiler's event tree, sorts the CPU allocation events by "
        "time and integrates them; the running sum's maximum is the peak added by the operation "
        "(the result stays alive until profiling stops, so it is included). Frees of blocks allocated "
        "before profiling began are not reported, so the baseline is exactly what existed before and "
        "nothing depends on what ran earlier in the process; every operation therefore runs in the "
        "benchmark process itself, once, after its timing warm-up. This counts exactly the tensors "
        "torch allocates; it does not see Python objects or scratch memory of libraries such as "
        "oneDNN. `--self-check` validates it: `torch.empty(100 MB)` reads "
        f"{results.get('self_check', {}).get('profiler_empty_100MB', float('nan')):.2f} MB, and a "
        "sequence alloc 100 MB, alloc 50 MB, free 100 MB, alloc/free 20 MB reads a peak of "
        f"{results.get('self_check', {}).get('profiler_sequence_peak_150MB', float('nan')):.2f} MB.")
    add("")
    add("Cross-check (whole process): a child process started with glibc's mmap threshold pinned at "
        "128 KiB (`MALLOC_MMAP_THRESHOLD_`, so freed large blocks go back to the OS instead of being "
        "silently reused from the heap) warms each operation up, calls `malloc_trim(0)`, resets the "
        "kernel's RSS high-water mark (`echo 5 > /proc/self/clear_refs`, Linux ≥ 4.0), runs the "
        "operation and reads `VmHWM − VmRSS(before)`. Validated on `torch.ones(100 MB)`: "
        f"{results.get('self_check', {}).get('rss_ones_100MB', float('nan')):.2f} MB.")
    add("")
    add("## Notes")
    add("")
    for note in results["notes"]:
        add(f"- {note}")
    add("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))


def make_notes(results: dict) -> list[str]:
    cfg, budget_min = results["config"], results["meta"].get("budget_min")
    notes = [
        "Timed repeats per shape are in the *repeats* column (+" + str(cfg["warmup"]) + " warm-up "
        "repeat); planned: " + "; ".join(
            [f"{k.replace('x', ' × ')}: {r}" for k, r in cfg["repeats"].items()]
            + [f"other shapes: {cfg['default_repeats']}"]) + ". "
        + (f"With `--budget-min {budget_min:g}`, a shape whose warm-up repeat showed that its "
           "planned repeats would overrun its share of the time budget (70% of the budget for the "
           "timed grid; each shape gets what is left divided by the shapes left) got fewer, at least 3. "
           if budget_min else "")
        + f"Growth tables {cfg['growth_repeats']}, prompts/s {cfg['throughput']['repeats']}. The "
        "naive baseline is timed with the same repeats as everything else.",
        "Timings on a shared 2-core machine are noisy; the per-repeat ratios cancel slow drift but "
        "not bursts. Raw timings of every repeat are in the JSON file.",
        "Generation prompts are the grid batches themselves, so at long prompts the prefill "
        "dominates the per-token figure; the decode-only column isolates the steady state, but at "
        "8 × 512 it is a small difference of two large times and the noisiest number of the tables.",
        "TransformerLens 3.9 copies transposed weights on every call (`W.T.contiguous()` in the "
        "gated MLP of the Llama-style pair, and the unembedding of both). Plain and tuco_lens "
        "operations alike pay it (the pre-trained gated MLPs once more); it weighs most in "
        "generation with the KV cache, where each step touches few tokens, and the unembedding "
        "copy (`d_vocab × d_model` floats) is part of every logits-producing forward's peak memory.",
        "Inputs are unpadded; with padding, `pair.tuco` / `pair.decompose` (given `batch_size` or "
        "`token_budget`) sort prompts by length and trim padding per sub-batch, which the plain "
        "forward does not.",
    ]
    for kind, res in results["models"].items():
        for key, r in res["grid"].items():
            if not r["prompt_kept_in_generate"]:
                notes.append(f"{kind} {key}: generate outputs did not start with the prompt?")
    return notes


# ---------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid, smoke run (< 1 min)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for all raw timings")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables to this file")
    parser.add_argument("--self-check", action="store_true", help="validate the memory methods and exit")
    parser.add_argument("--models", default="llama,gpt2", help="comma-separated: llama,gpt2")
    parser.add_argument("--repeats", type=int, default=None, help="override repeats for every shape")
    parser.add_argument("--grid", default=None, help="override the grid, e.g. 8x128,1x1024")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (default 2)")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS cross-check")
    parser.add_argument(
        "--budget-min", type=float, default=25.0,
        help="target duration of a full run in minutes: the timed repeats of a shape are lowered "
        "(not below 3) when its warm-up repeat shows they would not fit (0 = no limit)",
    )
    parser.add_argument("--note", default="", help="free text recorded in the JSON and markdown")
    parser.add_argument(
        "--from-json", type=Path, default=None,
        help="re-write --markdown from a saved JSON file (summaries recomputed from raw timings)",
    )
    parser.add_argument("--_rss-child", dest="rss_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_rss-self-check", dest="rss_self_check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.rss_child:
        spec = json.loads(args.rss_child)
        print(json.dumps(rss_child(spec["kind"], [tuple(s) for s in spec["shapes"]], spec["new_tokens"])))
        return
    if args.rss_self_check:
        print(json.dumps(_rss_self_check()))
        return

    if args.from_json:
        results = json.loads(args.from_json.read_text())
        for res in results["models"].values():
            for r in res["grid"].values():
                r["summary"] = summarize_shape(r["times_s"], r["new_tokens"])
        results["goals"] = goal_verdicts(results)
        results["meta"].setdefault("budget_min", 25.0 if not results["meta"]["quick"] else None)
        results["notes"] = make_notes(results)
        write_markdown(results, args.markdown or Path("hooked-grid.md"))
        return

    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    checks = self_check()
    if args.self_check:
        return
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg["repeats"], cfg["default_repeats"] = {}, args.repeats
    if args.grid:
        cfg["grid"] = [tuple(int(v) for v in shape.split("x")) for shape in args.grid.split(",")]
    n_runs = len(args.models.split(",")) * len(cfg["grid"])
    if args.budget_min and not args.quick:
        # about 70% of the run is the timed grid (the rest: memory, growth, RSS, low precision);
        # each shape may use the grid budget left divided by the shapes left
        cfg["budget"] = {"remaining_s": 0.7 * args.budget_min * 60, "runs_left": n_runs}
    results = {
        "meta": {
            "command": "python " + shlex.join(
                [os.path.relpath(__file__, Path.cwd())] + (argv if argv is not None else sys.argv[1:])
            ),
            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "quick": args.quick,
            "machine": machine_info(),
            "loadavg_start": loadavg(),
            "note": args.note,
        },
        "config": {k: (v if k != "repeats" else {f"{b}x{p}": r for (b, p), r in v.items()})
                   for k, v in cfg.items() if k != "budget"},
        "self_check": checks,
        "models": {},
        "notes": [],
    }
    for kind in args.models.split(","):
        log(f"building pair {kind}")
        torch.manual_seed(0)
        pair = build_pair(kind)
        gc.collect()
        gc.freeze()  # the models' objects: later gc.collect() calls stay fast
        res = {"n_params": n_params(pair), "spec": MODEL_SPECS[kind]}
        res["grid"] = bench_grid(pair, kind, cfg, log)
        res["growth"] = bench_growth(pair, kind, cfg, log)
        res["throughput"] = bench_throughput(pair, kind, cfg, log)
        res["lowprec"] = bench_lowprec(kind, cfg, log)
        if not args.no_rss and kind in cfg["rss_models"]:
            log(f"  [{kind}] RSS cross-check {cfg['rss_shapes']} (child process)")
            res["rss"] = run_rss_child(kind, cfg["rss_shapes"], cfg["new_tokens"])
        results["models"][kind] = res
        del pair
        gc.unfreeze()
        gc.collect()
    log("demo pair")
    results["demo"] = bench_demo(args.quick, log)
    results["goals"] = goal_verdicts(results)
    results["meta"]["loadavg_end"] = loadavg()
    results["meta"]["duration_s"] = time.time() - start
    results["meta"]["budget_min"] = args.budget_min if cfg.get("budget") else None
    results["notes"] = make_notes(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        log(f"wrote {args.out}")
    if args.markdown:
        write_markdown(results, args.markdown)
        log(f"wrote {args.markdown}")
    for g in results["goals"]:
        log(f"goal {g['op']}: worst time {g['worst_time']:.2f}x (goal {g['time_goal']}) at {g['worst_time_at']}; "
            f"worst memory {g['worst_mem']:.2f}x (goal {g['mem_goal']}) at {g['worst_mem_at']}")


if __name__ == "__main__":
    main()
