"""What ``bench_tuco.py`` measures and ``render_tuco.py`` reports, without torch.

The operation parameters shown in the page (α, the fine-tuning noise), the goals every ratio is
judged against, and the arithmetic on raw timings (``summarize_shape``, ``goal_verdicts``): the
benchmark writes their results into its JSON as it runs, and the renderer recomputes them from the
raw timings of that JSON, so an old run re-renders with today's arithmetic and nothing else.
"""

from __future__ import annotations

import statistics

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


def med(xs):
    """Median of ``xs``; nan when empty."""
    return statistics.median(xs) if xs else float("nan")


def summarize_shape(times: dict, new_tokens: int) -> dict:
    """Medians and per-repeat ratios of one grid shape from its raw timings ``{op: [seconds per repeat]}``."""
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



def goal_verdicts(results: dict) -> list[dict]:
    """Worst ratio of each goal's operation over every pair and shape, with where it occurred."""
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

