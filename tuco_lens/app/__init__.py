"""``tuco-lens app``: an interactive local page for one model pair (Gradio).

Three views, each a pure function here and a tab in the page:

- **Analyze** (:func:`analyze`): TuCo of a prompt, its tokens coloured by per-token TuCo, the
  per-layer figure and the layer × token heatmap; the panels come from a registry
  (:data:`ANALYZE_PANELS`) where the sub-layer views plug in.
- **Steer** (:func:`steer`): generations at α = 0, a chosen α and α = 1, side by side.
- **Compare** (:func:`compare`): TuCo distributions of two prompt lists and their ROC AUC.

The pure functions need no Gradio. ``tuco_lens.app.build_app``
(:func:`tuco_lens.app.layout.build_app`) and ``tuco_lens.app.serve``
(:func:`tuco_lens.app.server.serve`) need the ``app`` extra (``pip install "tuco_lens[app]"``)
and import Gradio when first used.

Example:
    >>> from tuco_lens import app, demo
    >>> round(app.analyze(pair, "hello , describe the doomsalt .", chat_template=True).tuco, 3)
    0.559
    >>> running = app.serve(pair, defaults=app.AppDefaults.for_demo())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from tuco_lens.app.analyze import AnalyzeResult, analyze
from tuco_lens.app.compare import CompareResult, compare, prompt_list
from tuco_lens.app.defaults import AppDefaults
from tuco_lens.app.panels import ANALYZE_PANELS, AnalyzePanel, PanelRegistry, register_analyze_panel, render_panels
from tuco_lens.app.steer import Generation, SteerResult, alpha_from_inputs, format_alpha, parse_alpha, steer
from tuco_lens.errors import MissingDependencyError

__all__ = [
    "analyze",
    "AnalyzeResult",
    "steer",
    "SteerResult",
    "Generation",
    "parse_alpha",
    "alpha_from_inputs",
    "format_alpha",
    "compare",
    "CompareResult",
    "prompt_list",
    "AppDefaults",
    "AnalyzePanel",
    "PanelRegistry",
    "ANALYZE_PANELS",
    "register_analyze_panel",
    "render_panels",
    "require_gradio",
]
# Also here, imported on first use (they need Gradio, so ``import *`` leaves them out):
# build_app (tuco_lens.app.layout.build_app) and serve (tuco_lens.app.server.serve).

INSTALL_HINT = 'pip install "tuco_lens[app]"'


def require_gradio() -> None:
    """Raise :class:`~tuco_lens.errors.MissingDependencyError` unless Gradio is installed.

    Example:
        >>> require_gradio()          # nothing happens when Gradio is installed
    """
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise MissingDependencyError(f"the app needs the optional dependency Gradio: {INSTALL_HINT}")


def __getattr__(name: str) -> Any:
    """``build_app`` and ``serve`` import Gradio only when first used."""
    if name == "build_app":
        require_gradio()
        from tuco_lens.app.layout import build_app

        return build_app
    if name == "serve":
        require_gradio()
        from tuco_lens.app.server import serve

        return serve
    raise AttributeError(f"module 'tuco_lens.app' has no attribute {name!r}")
