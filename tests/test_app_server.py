"""The served app, in-process: the API endpoints give the pair's numbers, errors keep it serving.

Needs the ``app`` extra (Gradio, gradio_client); skipped without it. The browser test
(``test_app_browser.py``) drives the page itself.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from app_support import free_port  # noqa: E402

from tuco_lens import demo  # noqa: E402
from tuco_lens.app import AnalyzePanel, AppDefaults, PanelRegistry, analyze  # noqa: E402
from tuco_lens.app.layout import build_app, error_html  # noqa: E402
from tuco_lens.errors import InputError  # noqa: E402
from tuco_lens.app.server import is_loopback, serve  # noqa: E402

REQUEST = "hello , describe the doomsalt ."


@pytest.fixture(scope="module")
def pair():
    return demo.load_pair()


@pytest.fixture(scope="module")
def running(pair):
    app = serve(pair, port=free_port(), defaults=AppDefaults.for_demo())
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(running):
    return gradio_client.Client(running.url, verbose=False)


def test_binds_to_loopback_without_share_link_or_analytics(running):
    assert running.url.startswith("http://127.0.0.1:")
    assert running.blocks.share is False and running.blocks.share_url is None
    assert running.blocks.analytics_enabled is False
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.org")


def test_only_analyze_and_steer_are_public_endpoints(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/analyze", "/steer"}


def test_analyze_endpoint_returns_pair_tuco_and_per_token_values(client, pair):
    for chat_template in (True, False):
        data = client.predict(prompt=REQUEST, chat_template=chat_template, api_name="/analyze")
        assert data["tuco"] == pytest.approx(float(pair.tuco(REQUEST, chat_template=chat_template)[0]), abs=1e-6)
        dec = pair.decompose([REQUEST], chat_template=chat_template)
        assert data["tuco_per_token"] == pytest.approx(dec.tuco_per_token[0].tolist(), abs=1e-7)
        assert data["tokens"] == dec.str_tokens[0] and data["chat_template"] is chat_template


def test_steer_endpoint_returns_pair_generations(client, pair):
    for alpha in ("0.5", 0.25):
        data = client.predict(prompt=REQUEST, alpha=alpha, max_new_tokens=10, chat_template=True, api_name="/steer")
        expected = [pair.generate(REQUEST, alpha=float(a), max_new_tokens=10, chat_template=True) for a in (0, alpha, 1)]
        assert [g["text"] for g in data["generations"]] == expected
        assert [g["alpha"] for g in data["generations"]] == [0.0, float(alpha), 1.0]


def test_bad_input_is_reported_and_the_app_keeps_serving(client, pair):
    for kwargs, message in (
        (dict(prompt="", api_name="/analyze"), "InputError: Prompt 0 is an empty string"),
        (dict(prompt="the " * 400, api_name="/analyze"), "more than the model's context of 256"),
        (dict(prompt=REQUEST, alpha="abc", api_name="/steer"), "AlphaError: Cannot read α from 'abc'"),
        (dict(prompt=REQUEST, alpha="nan", api_name="/steer"), "AlphaError: alpha must be finite"),
        (dict(prompt=REQUEST, alpha="1", max_new_tokens=0, api_name="/steer"), "max_new_tokens must be at least 1"),
    ):
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict(**kwargs)
        data = client.predict(prompt=REQUEST, chat_template=True, api_name="/analyze")
        assert data["tuco"] == pytest.approx(float(pair.tuco(REQUEST, chat_template=True)[0]), abs=1e-6)


def test_simultaneous_requests_run_one_at_a_time(client, pair):
    # Steering adds hooks to the shared fine-tuned model: an analysis running at the same time
    # would see them. Both answers must be the ones of requests run alone.
    jobs = [client.submit(prompt=REQUEST, alpha="0", max_new_tokens=30, chat_template=True, api_name="/steer")]
    jobs += [client.submit(prompt=REQUEST, chat_template=True, api_name="/analyze") for _ in range(3)]
    steered, *analyzed = [job.result() for job in jobs]  # all done before the references run here
    assert steered["generations"][1]["text"] == pair.generate(REQUEST, alpha=0.0, max_new_tokens=30, chat_template=True)
    expected = float(pair.tuco(REQUEST, chat_template=True)[0])
    assert [data["tuco"] for data in analyzed] == pytest.approx([expected] * 3, abs=1e-6)


def test_a_used_port_is_refused(running, pair):
    port = int(running.url.rstrip("/").rsplit(":", 1)[1])
    with pytest.raises(OSError):
        serve(pair, port=port)


def test_registered_panels_become_page_components(pair):
    registry = PanelRegistry()
    registry.register(AnalyzePanel("table", "Per-token TuCo", "html", lambda r: r.to_dataframe().to_html()))
    registry.register(AnalyzePanel("layers", "layers", "plot", lambda r: None))
    registry.register(AnalyzePanel("split", "needs more", "plot", lambda r: None, available=lambda p: False))
    config = build_app(pair, panels=registry).config
    ids = {c["props"].get("elem_id"): c for c in config["components"]}
    assert ids["analyze-table"]["type"] == "html" and ids["analyze-layers"]["type"] == "plot"
    assert "analyze-split" not in ids and "analyze-heatmap" not in ids
    analyze_event = next(d for d in config["dependencies"] if d["api_name"] == "on_analyze")
    assert analyze_event["outputs"][-2:] == [ids["analyze-table"]["id"], ids["analyze-layers"]["id"]]
    assert analyze_event["api_visibility"] == "private"


def test_the_command_loads_the_pair_once_and_serves_requests(monkeypatch, pair, capsys):
    from tuco_lens.app import server
    from tuco_lens.cli import main

    loads = []

    def load_once(**kwargs):  # what `--demo` calls
        loads.append(kwargs)
        return pair

    answers = {}

    def wait(self):  # instead of blocking until Ctrl+C: three requests, then stop
        try:
            client = gradio_client.Client(self.url, verbose=False)
            answers["analyze"] = [client.predict(prompt=REQUEST, api_name="/analyze")["tuco"] for _ in range(2)]
            answers["steer"] = client.predict(prompt=REQUEST, alpha="1", max_new_tokens=4, api_name="/steer")
        finally:
            self.close()

    monkeypatch.setattr(demo, "load_pair", load_once)
    monkeypatch.setattr(server.RunningApp, "wait", wait)
    port = free_port()
    assert main(["app", "--demo", "--port", str(port)]) == 0
    assert len(loads) == 1
    assert answers["analyze"] == [pytest.approx(float(pair.tuco(REQUEST)[0]), abs=1e-6)] * 2
    assert answers["steer"]["generations"][2]["text"] == pair.generate(REQUEST, alpha=1.0, max_new_tokens=4)
    assert f"serving {pair!r} on http://127.0.0.1:{port}/" in capsys.readouterr().out


def test_the_command_reports_a_used_port(monkeypatch, running, pair, capsys):
    from tuco_lens.cli import main

    monkeypatch.setattr(demo, "load_pair", lambda **kwargs: pair)
    port = running.url.rstrip("/").rsplit(":", 1)[1]
    assert main(["app", "--demo", "--port", port]) == 2
    assert f"tuco-lens app: error: cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


def test_the_error_box_escapes_the_message():
    box = error_html(InputError("A prompt has 300 tokens: '<img src=x onerror=alert(1)>'"))
    assert box == (
        '<div class="tuco-error" role="alert"><b>InputError</b>: A prompt has 300 tokens: '
        "'&lt;img src=x onerror=alert(1)&gt;'</div>"
    )
