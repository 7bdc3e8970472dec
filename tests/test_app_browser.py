"""``tuco-lens app --demo`` in a real browser: Debian's Chromium driven by Playwright.

The command is started on a free port as a user would start it (``python -m tuco_lens.cli`` is
the ``tuco-lens`` console script, run with this interpreter and this checkout). The browser
refuses every request that does not go to the app, so the page is shown to work offline; the
test fails if the page asked for anything else.

Needs the ``app-test`` extra (Gradio, Playwright) and Chromium at ``/usr/bin/chromium``
(``apt-get install chromium``; ``TUCO_APP_CHROMIUM`` to point elsewhere), no browser download.
Skipped without them, unless ``TUCO_APP_BROWSER_REQUIRED=1`` (``.ci/app`` sets it), which
turns a missing piece into a failure. Screenshots of the three views go to
``$TUCO_APP_SCREENSHOTS`` (default ``app-screenshots/``, git-ignored).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app_support import free_port

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("TUCO_APP_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("TUCO_APP_SCREENSHOTS", ROOT / "app-screenshots"))
REQUEST = "hello , describe the doomsalt ."
START_TIMEOUT_S = 180


def _requirements() -> str | None:
    import importlib.util

    for module in ("gradio", "playwright"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[app-test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


_missing = _requirements()
if _missing is not None:
    if os.environ.get("TUCO_APP_BROWSER_REQUIRED") == "1":
        raise RuntimeError(f"the browser test is required here but cannot run: {_missing}")
    pytest.skip(_missing, allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

from tuco_lens import demo  # noqa: E402
from tuco_lens.metrics import roc_auc  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    return demo.load_pair()


@pytest.fixture(scope="module")
def app_url():
    """``tuco-lens app --demo --port P`` in a subprocess; its URL once it serves."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tuco_lens.cli", "app", "--demo", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def read() -> None:
        for line in process.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    try:
        while url is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("tuco-lens app did not start:\n" + "".join(log))
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if "serving" in line and f"http://127.0.0.1:{port}/" in line:
                url = f"http://127.0.0.1:{port}/"
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "Traceback" not in "".join(log), "".join(log)


@pytest.fixture(scope="module")
def browser_page(app_url):
    """One page for the whole module, offline: requests anywhere but the app are refused."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    outside: list[str] = []
    dialogs: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # a request on a slow, shared machine

        def route(request_route):
            if request_route.request.url.startswith(app_url):
                request_route.continue_()
            else:
                outside.append(request_route.request.url)
                request_route.abort()

        page.route("**/*", route)
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(app_url, wait_until="networkidle")
        yield page
        browser.close()
    assert outside == [], f"the page asked for resources outside the app: {outside}"
    assert dialogs == [], f"a script injected through a prompt ran: {dialogs}"


def _textbox(page: Page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text]").first


def _set_checkbox(page: Page, elem_id: str, value: bool) -> None:
    box = page.locator(f"#{elem_id} input[type=checkbox]")
    if box.is_checked() != value:
        box.click()


def _set_number(page: Page, elem_id: str, value: float) -> None:
    number = page.locator(f"#{elem_id} input[type=number]")
    number.fill(str(value))
    number.press("Enter")


def _analyze(page: Page, prompt: str, chat_template: bool) -> None:
    page.get_by_role("tab", name="Analyze").click()
    _textbox(page, "analyze-prompt").fill(prompt)
    _set_checkbox(page, "analyze-chat-template", chat_template)
    page.locator("#analyze-button").click()


def _wait_idle(page: Page) -> None:
    """Until no Gradio status tracker shows a running request."""
    page.wait_for_function("!document.querySelector('[data-testid=status-tracker].generating, .progress-text')")
    page.wait_for_timeout(300)


def test_analyze_shows_pair_tuco_and_one_coloured_span_per_token(browser_page, pair):
    page = browser_page
    _analyze(page, REQUEST, chat_template=True)
    expect(page.locator("#analyze-headline .tuco-value")).to_be_visible()
    _wait_idle(page)
    tuco = float(pair.tuco(REQUEST, chat_template=True)[0])
    expect(page.locator("#analyze-headline .tuco-value")).to_have_text(f"TuCo = {tuco:.4f}")
    dec = pair.decompose([REQUEST], chat_template=True)
    spans = page.locator("#analyze-tokens span[title]")
    expect(spans).to_have_count(dec.tokens.shape[1])
    for position, (token, value) in enumerate(zip(dec.str_tokens[0], dec.tuco_per_token[0].tolist())):
        span = spans.nth(position)
        assert span.inner_text() == token
        assert span.get_attribute("title").endswith(f"per-token TuCo {value:.4f}")  # the hover text
        assert span.evaluate("e => getComputedStyle(e).backgroundColor").startswith("rgb(")
    for panel in ("layers", "heatmap"):
        expect(page.locator(f"#analyze-{panel} .js-plotly-plot")).to_have_count(1)
    page.wait_for_timeout(1000)  # let plotly finish drawing
    page.screenshot(path=str(SHOTS / "analyze.png"), full_page=True)


def test_prompt_text_is_escaped_in_the_page(browser_page, pair):
    page = browser_page
    prompt = '<img src=x onerror="alert(1)"><b>bold</b> hello'
    _analyze(page, prompt, chat_template=False)
    expect(page.locator("#analyze-headline .tuco-value")).to_have_text(f"TuCo = {float(pair.tuco(prompt)[0]):.4f}")
    _wait_idle(page)
    for where in ("#analyze-tokens", "#analyze-headline", "#analyze-layers", "#analyze-heatmap"):
        assert page.locator(f"{where} img, {where} b").count() == 0, where
    assert prompt[:20] in page.locator("#analyze-tokens").inner_text()  # shown as text


def test_an_empty_prompt_shows_the_error_and_the_page_keeps_working(browser_page, pair):
    page = browser_page
    _analyze(page, "", chat_template=False)
    error = page.locator("#analyze-error .tuco-error")
    expect(error).to_contain_text("InputError: Prompt 0 is an empty string; TuCo needs at least one token.")
    expect(page.locator("#analyze-headline .tuco-value")).to_have_count(0)
    too_long = "<b>the</b> " * 300  # the message quotes the prompt: escaped too
    _analyze(page, too_long, chat_template=False)
    expect(error).to_contain_text("more than the model's context of 256: '<b>the</b> <b>the</b>")
    assert page.locator("#analyze-error b").count() == 1  # the error's class name, nothing from the prompt
    _analyze(page, REQUEST, chat_template=True)
    tuco = float(pair.tuco(REQUEST, chat_template=True)[0])
    expect(page.locator("#analyze-headline .tuco-value")).to_have_text(f"TuCo = {tuco:.4f}")
    expect(error).to_have_count(0)


def test_steer_columns_equal_pair_generate(browser_page, pair):
    page = browser_page
    page.get_by_role("tab", name="Steer").click()
    _textbox(page, "steer-prompt").fill(REQUEST)
    _set_checkbox(page, "steer-chat-template", True)
    _set_number(page, "steer-alpha", 0.25)
    _set_number(page, "steer-max-new-tokens", 12)
    _textbox(page, "steer-alpha-text").fill("")
    page.locator("#steer-button").click()
    expected = {a: pair.generate(REQUEST, alpha=a, max_new_tokens=12, chat_template=True) for a in (0.0, 0.25, 1.0)}
    expect(_textbox(page, "steer-alpha-1")).to_have_value(expected[1.0])
    expect(_textbox(page, "steer-alpha-0")).to_have_value(expected[0.0])
    expect(_textbox(page, "steer-alpha-chosen")).to_have_value(expected[0.25])
    expect(page.locator("#steer-alpha-chosen")).to_contain_text("α = 0.25 (chosen)")
    _wait_idle(page)
    page.screenshot(path=str(SHOTS / "steer.png"), full_page=True)
    # a bad α is reported, then a good one works again
    _textbox(page, "steer-alpha-text").fill("0 1")
    page.locator("#steer-button").click()
    expect(page.locator("#steer-error .tuco-error")).to_contain_text(
        "AlphaError: A per-layer alpha needs one value per layer: got 2 values for 4 layers."
    )
    _textbox(page, "steer-alpha-text").fill("1.5")
    page.locator("#steer-button").click()
    expect(_textbox(page, "steer-alpha-chosen")).to_have_value(
        pair.generate(REQUEST, alpha=1.5, max_new_tokens=12, chat_template=True)
    )
    expect(page.locator("#steer-error .tuco-error")).to_have_count(0)


def test_compare_shows_pair_auc_with_pasted_and_uploaded_sets(browser_page, pair, tmp_path):
    page = browser_page
    page.get_by_role("tab", name="Compare").click()
    sets = demo.prompt_sets()
    chat, web = sets["chat"][:24], sets["web"][:24]
    assert _textbox(page, "compare-prompts-a").input_value().splitlines() == chat  # the demo's example
    page.locator("#compare-button").click()
    auc = roc_auc(pair.tuco(chat), pair.tuco(web))
    expect(page.locator("#compare-headline .tuco-auc")).to_have_text(f"ROC AUC (chat above web text) = {auc:.4f}")
    expect(page.locator("#compare-figure .js-plotly-plot")).to_have_count(1)
    _wait_idle(page)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)
    # set B from an uploaded .jsonl file instead of the pasted text
    upload = tmp_path / "harmful.jsonl"
    harmful = sets["harmful"][:6]
    upload.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in harmful), encoding="utf-8")
    _textbox(page, "compare-prompts-b").fill("")
    _textbox(page, "compare-name-b").fill("forbidden")
    page.locator("#compare-file-b input[type=file]").set_input_files(str(upload))
    expect(page.locator("#compare-file-b")).to_contain_text("harmful.jsonl")
    page.locator("#compare-button").click()
    auc = roc_auc(pair.tuco(chat), pair.tuco(harmful))
    expect(page.locator("#compare-headline .tuco-auc")).to_have_text(f"ROC AUC (chat above forbidden) = {auc:.4f}")
    expect(page.locator("#compare-headline")).to_contain_text("forbidden: 6 prompts")


def test_a_long_request_shows_its_progress(browser_page, pair):
    page = browser_page
    page.reload(wait_until="networkidle")  # a fresh page: no uploaded file left from the last test
    page.get_by_role("tab", name="Compare").click()
    sets = demo.prompt_sets()
    for key, name, prompts in (("a", "chat", sets["chat"] + sets["chat_lang2"]), ("b", "web", sets["web"] + sets["web_lang2"])):
        _textbox(page, f"compare-name-{key}").fill(name)
        _textbox(page, f"compare-prompts-{key}").fill("\n".join(prompts))
    page.locator("#compare-button").click()
    # pair.tuco's progress bar (one step per batch of 16 prompts) shown while the request runs
    page.wait_for_function(
        "Array.from(document.querySelectorAll('[data-testid=status-tracker]'))"
        ".some(e => /\\d+\\/(28|13) batch/.test(e.innerText))",
        polling=20,
    )
    auc = roc_auc(pair.tuco(sets["chat"] + sets["chat_lang2"]), pair.tuco(sets["web"] + sets["web_lang2"]))
    expect(page.locator("#compare-headline .tuco-auc")).to_have_text(f"ROC AUC (chat above web) = {auc:.4f}")
