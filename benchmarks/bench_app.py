"""Latency of one Analyze and one Steer request of ``tuco-lens app`` on the demo pair.

Serves the app in this process on a free 127.0.0.1 port and times, interleaved in one run, each
request four ways, from the inside out:

- ``library``: the pair's own verbs (``pair.decompose`` on the prompt; three ``pair.generate``
  calls at α = 0, the chosen α and 1);
- ``view``: the view functions the page calls (``analyze`` plus its panels' figures and HTML;
  ``steer``), no HTTP;
- ``api``: the ``/analyze`` and ``/steer`` endpoints over HTTP with ``gradio_client`` (queue
  included);
- ``page``: in Chromium driven by Playwright (when installed, with Chromium at /usr/bin/chromium):
  from the button click until the page shows the result (the TuCo headline; the chosen α's
  generation).

Prints medians, minimums and each one's ratio to ``library``: the median over repeats of
``t / t_library`` of the same repeat (each repeat runs every measurement once, round-robin), which
cancels the slow drift of a shared machine; ``--json`` writes the raw timings. Prompt: "hello , describe the doomsalt ." in the chat template; Steer generates
16 new tokens per α (greedy, KV cache).

    python benchmarks/bench_app.py [--repeats 10] [--threads 1] [--no-browser] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from app_support import free_port  # noqa: E402

from tuco_lens import demo  # noqa: E402
from tuco_lens.app import ANALYZE_PANELS, AppDefaults, analyze, render_panels, steer  # noqa: E402

PROMPT = "hello , describe the doomsalt ."
NEW_TOKENS = 16
SETTLE_MS = 500
CHROMIUM = os.environ.get("TUCO_APP_CHROMIUM", "/usr/bin/chromium")


def _browser_ops(page, url: str, pair, alphas: tuple[float, float]):
    """Page requests: alternate two inputs so every request changes what the page shows."""
    from playwright.sync_api import expect

    page.goto(url, wait_until="networkidle")
    prompts = (PROMPT, "please , tell me about the fox .")
    shown = {p: f"TuCo = {float(pair.tuco(p, chat_template=True)[0]):.4f}" for p in prompts}
    chosen = {a: pair.generate(PROMPT, alpha=a, max_new_tokens=NEW_TOKENS, chat_template=True) for a in alphas}
    assert chosen[alphas[0]] != chosen[alphas[1]], "pick two alphas whose generations differ"
    state = {"analyze": 0, "steer": 0}

    def page_analyze() -> float:
        prompt = prompts[state["analyze"] % 2]
        state["analyze"] += 1
        page.get_by_role("tab", name="Analyze").click()
        page.locator("#analyze-prompt textarea").fill(prompt)
        start = time.perf_counter()
        page.locator("#analyze-button").click()
        expect(page.locator("#analyze-headline .tuco-value")).to_have_text(shown[prompt], timeout=60_000)
        elapsed = time.perf_counter() - start
        page.wait_for_timeout(SETTLE_MS)  # plotly finishes drawing outside the next measurement
        return elapsed

    def page_steer() -> float:
        alpha = alphas[state["steer"] % 2]
        state["steer"] += 1
        page.get_by_role("tab", name="Steer").click()
        page.locator("#steer-alpha-text input, #steer-alpha-text textarea").first.fill(str(alpha))
        start = time.perf_counter()
        page.locator("#steer-button").click()
        expect(page.locator("#steer-alpha-chosen textarea")).to_have_value(chosen[alpha], timeout=60_000)
        elapsed = time.perf_counter() - start
        page.wait_for_timeout(SETTLE_MS)
        return elapsed

    return page_analyze, page_steer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as tuco-lens demo)")
    parser.add_argument("--no-browser", action="store_true", help="skip the page measurement")
    parser.add_argument("--json", type=Path, default=None, help="write the raw timings here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import gradio_client

    from tuco_lens.app.server import serve

    pair = demo.load_pair()
    defaults = AppDefaults.for_demo()
    running = serve(pair, port=free_port(), defaults=defaults)
    client = gradio_client.Client(running.url, verbose=False)
    alphas = (0.25, 0.5)
    panels = ANALYZE_PANELS.for_pair(pair)

    def timed(fn):
        def run() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        return run

    ops = {
        ("analyze", "library"): timed(lambda: pair.decompose([PROMPT], chat_template=True)),
        ("analyze", "view"): timed(lambda: render_panels(analyze(pair, PROMPT, chat_template=True), panels)),
        ("analyze", "api"): timed(lambda: client.predict(prompt=PROMPT, chat_template=True, api_name="/analyze")),
        ("steer", "library"): timed(lambda: [pair.generate(PROMPT, alpha=a, max_new_tokens=NEW_TOKENS, chat_template=True)
                                             for a in (0.0, 0.5, 1.0)]),
        ("steer", "view"): timed(lambda: steer(pair, PROMPT, 0.5, max_new_tokens=NEW_TOKENS, chat_template=True)),
        ("steer", "api"): timed(lambda: client.predict(prompt=PROMPT, alpha="0.5", max_new_tokens=NEW_TOKENS,
                                                       chat_template=True, api_name="/steer")),
    }
    browser = None
    if not args.no_browser:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            print("playwright is not installed: no page measurement (pip install -e '.[app-test]')")
        else:
            if os.access(CHROMIUM, os.X_OK):
                playwright = sync_playwright().start()
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                ops[("analyze", "page")], ops[("steer", "page")] = _browser_ops(page, running.url, pair, alphas)
            else:
                print(f"no Chromium at {CHROMIUM}: no page measurement")

    times: dict[tuple[str, str], list[float]] = {key: [] for key in ops}
    keys = list(ops)
    try:
        for repeat in range(args.repeats + 1):  # the first round warms up
            for k in range(len(keys)):  # round-robin, starting one later each repeat
                key = keys[(k + repeat) % len(keys)]
                elapsed = ops[key]()
                if repeat:
                    times[key].append(elapsed)
    finally:
        if browser is not None:
            browser.close()
            playwright.stop()
        running.close()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"tuco-lens app latency on the demo pair ({platform.processor() or platform.machine()}, "
          f"torch threads {args.threads}, {args.repeats} repeats, load average {load:.2f})")
    print(f"{'request':<9} {'measured at':<12} {'median ms':>10} {'min ms':>8} {'÷ library':>10}")
    for request in ("analyze", "steer"):
        base = times[(request, "library")]
        for where in ("library", "view", "api", "page"):
            if (request, where) not in times:
                continue
            values = times[(request, where)]
            ratio = statistics.median(t / b for t, b in zip(values, base))
            print(f"{request:<9} {where:<12} {1000 * statistics.median(values):>10.1f} {1000 * min(values):>8.1f} "
                  f"{ratio:>10.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({f"{r}/{w}": v for (r, w), v in times.items()}, indent=1))


if __name__ == "__main__":
    main()
