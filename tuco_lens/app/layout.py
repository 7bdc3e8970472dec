"""The Gradio page: three tabs (Analyze, Steer, Compare) and the ``/analyze`` and ``/steer`` API.

Only this module (and :mod:`tuco_lens.app.server`) imports Gradio. Each handler calls the pure
function of its view (:mod:`~tuco_lens.app.analyze`, :mod:`~tuco_lens.app.steer`,
:mod:`~tuco_lens.app.compare`) and turns a :class:`~tuco_lens.errors.TuCoError` into an
escaped message in the page; the page keeps working after it. Every event that runs the models
shares one queue slot (``concurrency_id="pair"``, limit 1): α-scaling adds hooks to the shared
fine-tuned model, so two requests must never run on it at once.

No ``from __future__ import annotations`` here: ``gr.api`` reads the endpoints' signatures.
"""

import html
from collections.abc import Callable
from typing import Any

import gradio as gr

from tuco_lens.app.analyze import analyze
from tuco_lens.app.analyze import headline_html as analyze_headline
from tuco_lens.app.compare import compare, prompt_list
from tuco_lens.app.compare import headline_html as compare_headline
from tuco_lens.app.defaults import AppDefaults
from tuco_lens.app.panels import ANALYZE_PANELS, AnalyzePanel, PanelRegistry, render_panels
from tuco_lens.app.steer import alpha_from_inputs, steer
from tuco_lens.errors import TuCoError

__all__ = ["build_app", "error_html", "PAGE_CSS", "QUEUE"]

QUEUE = dict(concurrency_limit=1, concurrency_id="pair")
"""Queue settings of every event that runs the models: one at a time."""

PAGE_CSS = """
.tuco-error { border: 1px solid #d33; background: #fff2f2; color: #900; padding: 8px 12px; border-radius: 6px; }
.tuco-headline { font-size: 1.05em; padding: 4px 0; }
.tuco-value, .tuco-auc { font-weight: 700; font-size: 1.25em; }
"""
"""Styles of the error box and the headlines (passed to ``launch``)."""


def error_html(error: Exception) -> str:
    """The error box: the error's class and message, escaped."""
    return (
        f'<div class="tuco-error" role="alert"><b>{type(error).__name__}</b>: '
        f"{html.escape(str(error), quote=False)}</div>"
    )


def _pair_html(pair: Any) -> str:
    def name(model: Any) -> str:
        return html.escape(str(model.cfg.model_name), quote=False)

    return (
        f"<div>Pre-trained: <code>{name(pair.pt)}</code> · fine-tuned: <code>{name(pair.ft)}</code> · "
        f"{pair.n_layers} layers · {html.escape(pair.backend.name)}</div>"
    )


def _api(call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return call()
    except TuCoError as error:
        raise gr.Error(f"{type(error).__name__}: {error}", print_exception=False) from None


def _analyze_tab(pair: Any, defaults: AppDefaults, panels: list[AnalyzePanel]) -> None:
    with gr.Row():
        prompt = gr.Textbox(
            label="Prompt", value=defaults.analyze_prompt, lines=3, scale=4, elem_id="analyze-prompt",
            placeholder="Type a prompt; TuCo is measured at its last token.",
        )
        with gr.Column(scale=1):
            chat = gr.Checkbox(label="chat template", value=defaults.chat_template, elem_id="analyze-chat-template")
            button = gr.Button("Analyze", variant="primary", elem_id="analyze-button")
    error = gr.HTML(elem_id="analyze-error")
    headline = gr.HTML(elem_id="analyze-headline")
    outputs = []
    for panel in panels:
        if panel.kind == "plot":
            outputs.append(gr.Plot(label=panel.label, elem_id=f"analyze-{panel.name}"))
        else:
            outputs.append(gr.HTML(label=panel.label, elem_id=f"analyze-{panel.name}"))

    def on_analyze(text: str, chat_template: bool):
        try:
            result = analyze(pair, text, chat_template=chat_template)
            rendered = render_panels(result, panels)
        except TuCoError as exc:
            return [error_html(exc), "", *(None if p.kind == "plot" else "" for p in panels)]
        return ["", analyze_headline(result), *(rendered[p.name] for p in panels)]

    button.click(on_analyze, [prompt, chat], [error, headline, *outputs], api_visibility="private", **QUEUE)


def _steer_tab(pair: Any, defaults: AppDefaults) -> None:
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value=defaults.steer_prompt, lines=3, scale=4, elem_id="steer-prompt")
        with gr.Column(scale=1):
            chat = gr.Checkbox(label="chat template", value=defaults.chat_template, elem_id="steer-chat-template")
            button = gr.Button("Generate", variant="primary", elem_id="steer-button")
    with gr.Row():
        alpha = gr.Slider(-1.0, 2.0, value=defaults.alpha, step=0.05, label="α (scale of the fine-tuning component)",
                          elem_id="steer-alpha")
        alpha_text = gr.Textbox(
            label="α as text (overrides the slider when filled)", elem_id="steer-alpha-text",
            placeholder="0.5  ·  one per layer: 0 0.5 1 1  ·  per component: attn=0.5 mlp=1",
        )
        budget = gr.Slider(1, max(1, min(256, pair.ft.cfg.n_ctx - 1)), value=defaults.max_new_tokens, step=1,
                           label="max new tokens", elem_id="steer-max-new-tokens")
    error = gr.HTML(elem_id="steer-error")
    with gr.Row():
        columns = [
            gr.Textbox(label=label, lines=6, interactive=False, elem_id=f"steer-{key}")
            for key, label in (("alpha-0", "α = 0 (pre-trained blocks)"), ("alpha-chosen", "chosen α"),
                               ("alpha-1", "α = 1 (fine-tuned)"))
        ]

    def on_steer(text: str, chat_template: bool, slider: float, typed: str, max_new_tokens: float,
                 progress=gr.Progress(track_tqdm=True)):
        try:
            result = steer(pair, text, alpha_from_inputs(slider, typed), max_new_tokens=max_new_tokens,
                           chat_template=chat_template, show_progress=True)
        except TuCoError as exc:
            return [error_html(exc), *("" for _ in columns)]
        return ["", *(gr.Textbox(value=g.text, label=g.label) for g in result.generations)]

    button.click(on_steer, [prompt, chat, alpha, alpha_text, budget], [error, *columns], api_visibility="private",
                 **QUEUE)


def _compare_tab(pair: Any, defaults: AppDefaults) -> None:
    gr.Markdown("Two prompt lists, pasted (one prompt per line) or uploaded as .txt / .jsonl (a `prompt` field). "
                "The first set is the one expected to score higher.")
    sets = []
    with gr.Row():
        for key, name, text in (("a", defaults.names[0], defaults.positive), ("b", defaults.names[1], defaults.negative)):
            with gr.Column():
                sets.append((
                    gr.Textbox(label=f"set {key.upper()}: name", value=name, elem_id=f"compare-name-{key}"),
                    gr.Textbox(label=f"set {key.upper()}: prompts, one per line", value=text, lines=8, max_lines=16,
                               elem_id=f"compare-prompts-{key}"),
                    gr.File(label=f"set {key.upper()}: or a .txt / .jsonl file", file_types=[".txt", ".jsonl"],
                            type="filepath", height=140, elem_id=f"compare-file-{key}"),
                ))
    with gr.Row():
        chat = gr.Checkbox(label="chat template", value=defaults.compare_chat_template, elem_id="compare-chat-template")
        button = gr.Button("Compare", variant="primary", elem_id="compare-button")
    error = gr.HTML(elem_id="compare-error")
    headline = gr.HTML(elem_id="compare-headline")
    figure = gr.Plot(label="TuCo distributions", elem_id="compare-figure")
    table = gr.Dataframe(label="TuCo of every prompt", interactive=False, elem_id="compare-table")

    def on_compare(name_a: str, text_a: str, file_a: str | None, name_b: str, text_b: str, file_b: str | None,
                   chat_template: bool, progress=gr.Progress(track_tqdm=True)):
        try:
            result = compare(
                pair, prompt_list(name_a, text_a, file_a), prompt_list(name_b, text_b, file_b),
                names=(name_a, name_b), chat_template=chat_template, show_progress=True,
            )
        except TuCoError as exc:
            return [error_html(exc), "", None, None]
        return ["", compare_headline(result), result.figure(), result.to_dataframe()]

    inputs = [component for group in sets for component in group] + [chat]
    button.click(on_compare, inputs, [error, headline, figure, table], api_visibility="private", **QUEUE)


def build_app(
    pair: Any,
    *,
    defaults: AppDefaults | None = None,
    panels: PanelRegistry | None = None,
    title: str = "tuco_lens",
) -> gr.Blocks:
    """The page for one loaded pair (the pair is used by every request; nothing is reloaded).

    Args:
        pair: A :class:`~tuco_lens.TuCoPair`.
        defaults: Initial values of the inputs (:meth:`AppDefaults.for_demo` for the demo pair).
        panels: The Analyze panels (default :data:`~tuco_lens.app.panels.ANALYZE_PANELS`); only
            those available for ``pair`` are drawn.
        title: Browser tab title.

    Returns:
        A ``gradio.Blocks`` (not launched; :func:`tuco_lens.app.server.launch` serves it). Its
        API: ``/analyze(prompt, chat_template)`` returns :meth:`AnalyzeResult.to_dict`,
        ``/steer(prompt, alpha, max_new_tokens, chat_template)`` returns :meth:`SteerResult.to_dict`.

    Example:
        >>> blocks = build_app(pair, defaults=AppDefaults(analyze_prompt="where is norvik ?", chat_template=True))
    """
    defaults = defaults or AppDefaults()
    page_panels = (panels if panels is not None else ANALYZE_PANELS).for_pair(pair)
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.HTML(f"<h2>tuco_lens: what did fine-tuning do to this response?</h2>{_pair_html(pair)}")
        with gr.Tab("Analyze", elem_id="tab-analyze"):
            _analyze_tab(pair, defaults, page_panels)
        with gr.Tab("Steer", elem_id="tab-steer"):
            _steer_tab(pair, defaults)
        with gr.Tab("Compare", elem_id="tab-compare"):
            _compare_tab(pair, defaults)

        def analyze_endpoint(prompt: str, chat_template: bool = False) -> dict:
            """TuCo of one prompt and its per-token TuCo (the tokens as the model sees them)."""
            return _api(lambda: analyze(pair, prompt, chat_template=chat_template).to_dict())

        def steer_endpoint(prompt: str, alpha: str = "0.5", max_new_tokens: int = 20,
                           chat_template: bool = False) -> dict:
            """Greedy generations at α = 0, alpha and α = 1 (alpha: a number, one per layer, or name=number)."""
            return _api(lambda: steer(pair, prompt, alpha, max_new_tokens=max_new_tokens,
                                      chat_template=chat_template).to_dict())

        gr.api(analyze_endpoint, api_name="analyze", **QUEUE)
        gr.api(steer_endpoint, api_name="steer", **QUEUE)
    return blocks
