#!/usr/bin/env python
"""Speed and memory of tuco_lens, as ratios to one plain forward pass of the fine-tuned model.

Usage::

    python benchmarks/bench_tuco.py [--quick] [--out benchmarks/results/DATE.json] [--self-check]
    python benchmarks/render_tuco.py benchmarks/results/DATE.json --out hooked-grid.md

This script measures and writes raw timings and peak-memory bytes to the JSON file; the page of
tables is rendered from that JSON (and nothing else) by ``render_tuco.py``.

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
import copy
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop lines
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from tuco_grid import ALPHA, NOISE, goal_verdicts, med, summarize_shape  # noqa: E402

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


# ---------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid, smoke run (< 1 min)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for all raw timings")
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
    parser.add_argument("--note", default="", help="free text recorded in the JSON (render_tuco.py shows it)")
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
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        log(f"wrote {args.out}")
    for g in results["goals"]:
        log(f"goal {g['op']}: worst time {g['worst_time']:.2f}x (goal {g['time_goal']}) at {g['worst_time_at']}; "
            f"worst memory {g['worst_mem']:.2f}x (goal {g['mem_goal']}) at {g['worst_mem_at']}")


if __name__ == "__main__":
    main()
