"""Serving the page: on 127.0.0.1 unless told otherwise, no share link, no usage analytics.

Gradio's usage analytics are turned off before Gradio is imported
(``GRADIO_ANALYTICS_ENABLED=False``) and again on the page itself; the public share link is
never requested; the page needs nothing from the internet (Gradio ships its fonts and
JavaScript, plotly.js included), which the browser test checks by refusing every request that
does not go to the app.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402

from tuco_lens.app.defaults import AppDefaults  # noqa: E402
from tuco_lens.app.layout import PAGE_CSS, build_app  # noqa: E402
from tuco_lens.app.panels import PanelRegistry  # noqa: E402

__all__ = ["RunningApp", "serve", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``127.0.0.0/8``, ``::1``, ``localhost``).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0")
        (True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RunningApp:
    """A page being served.

    Attributes:
        blocks: The ``gradio.Blocks``.
        url: Where it is served, e.g. ``http://127.0.0.1:7860/``.
    """

    blocks: gr.Blocks
    url: str

    def wait(self) -> None:
        """Serve until interrupted (Ctrl+C), then stop."""
        self.blocks.block_thread()

    def close(self) -> None:
        """Stop serving."""
        self.blocks.close(verbose=False)


def serve(
    pair: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    defaults: AppDefaults | None = None,
    panels: PanelRegistry | None = None,
) -> RunningApp:
    """Build the page for ``pair`` (:func:`~tuco_lens.app.layout.build_app`) and serve it.

    Returns at once; call :meth:`RunningApp.wait` to serve until Ctrl+C (``tuco-lens app``
    does) or :meth:`RunningApp.close` to stop. Requests run one at a time on ``pair``.

    Args:
        pair: A :class:`~tuco_lens.TuCoPair`, loaded once by the caller.
        host: Address to bind. Anything but a loopback address makes the page (and the
            models) reachable from the network: a warning says so.
        port: TCP port.
        defaults: Initial values of the inputs.
        panels: The Analyze panels (default: the registered ones).

    Raises:
        OSError: The port is in use or cannot be bound.

    Example:
        >>> running = serve(pair, port=7861)
        >>> running.url
        'http://127.0.0.1:7861/'
        >>> running.close()
    """
    if not is_loopback(host):
        print(
            f"tuco-lens app: warning: serving on {host}, reachable from other machines; anyone who can "
            "reach it can run the models. Use --host 127.0.0.1 to keep it local.",
            file=sys.stderr,
        )
    blocks = build_app(pair, defaults=defaults, panels=panels)
    blocks.queue(default_concurrency_limit=1)
    _, url, _ = blocks.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=False,
        css=PAGE_CSS,
        footer_links=["api", "settings"],
        run_history=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        max_file_size="20mb",
    )
    return RunningApp(blocks=blocks, url=url)
