"""The panels of the Analyze view: a registry, so new views of one prompt plug in.

Each :class:`AnalyzePanel` turns an :class:`~tuco_lens.app.analyze.AnalyzeResult` into a plotly
figure (``kind="plot"``) or an HTML fragment (``kind="html"``, escaped by the panel). The page
draws one component per panel of :data:`ANALYZE_PANELS`, in order, below the TuCo headline;
panels whose ``available(pair)`` is false for the loaded pair are left out.

Built in, in this order:

- ``tokens``: the prompt's tokens coloured by per-token TuCo (hover for the value),
  :func:`~tuco_lens.plotting.token_html`;
- ``layers``: PTC/FTC norms and β per layer at the last token,
  :func:`~tuco_lens.plotting.plot_layers`;
- ``heatmap``: β per layer and token, :func:`~tuco_lens.plotting.plot_token_heatmap`.

- ``components``: FTC per layer split into attention / MLP / MLP←attention,
  :func:`~tuco_lens.plotting.plot_components`;
- ``heads``: each head's share of TuCo, :func:`~tuco_lens.plotting.plot_head_heatmap` (left out
  when the model has no per-head split);
- ``top_tokens``: the tokens fine-tuning promotes and suppresses (``pair.logit_attribution``),
  :func:`~tuco_lens.plotting.plot_top_tokens`.

More views plug in with :func:`register_analyze_panel` (``after=`` places them).

Panels must be registered before :func:`~tuco_lens.app.build_app` builds the page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import plotly.graph_objects as go

from tuco_lens.app.analyze import AnalyzeResult
from tuco_lens.errors import InputError
from tuco_lens.plotting import (
    plot_components,
    plot_head_heatmap,
    plot_layers,
    plot_token_heatmap,
    plot_top_tokens,
    token_html,
)

__all__ = ["AnalyzePanel", "PanelRegistry", "ANALYZE_PANELS", "register_analyze_panel", "render_panels"]

PanelKind = Literal["plot", "html"]


def _always(pair: Any) -> bool:
    return True


@dataclass(frozen=True)
class AnalyzePanel:
    """One view of an analyzed prompt.

    Attributes:
        name: Identifier (unique in a registry; the page gives its component the HTML id
            ``analyze-<name>``).
        label: Heading shown above the panel.
        kind: ``"plot"`` (``render`` returns a ``plotly.graph_objects.Figure``) or ``"html"``
            (``render`` returns an HTML string in which every user text is escaped).
        render: ``render(result) -> Figure | str``.
        available: ``available(pair) -> bool``: whether the panel applies to a pair (e.g.
            the pair has a method the panel needs). Default: always.

    Example:
        >>> panel = AnalyzePanel("table", "Per-token TuCo", "html",
        ...                      lambda result: result.to_dataframe().to_html())
        >>> panel.name
        'table'
    """

    name: str
    label: str
    kind: PanelKind
    render: Callable[[AnalyzeResult], go.Figure | str]
    available: Callable[[Any], bool] = _always

    def __post_init__(self) -> None:
        if self.kind not in ("plot", "html"):
            raise InputError(f"AnalyzePanel {self.name!r}: kind must be 'plot' or 'html', got {self.kind!r}.")
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise InputError(
                f"AnalyzePanel name {self.name!r} must be non-empty letters, digits, '-' or '_' "
                "(it becomes an HTML id)."
            )


class PanelRegistry:
    """An ordered set of :class:`AnalyzePanel` objects with unique names.

    Example:
        >>> panel_a = AnalyzePanel("a", "Panel A", "html", lambda result: "<p>a</p>")
        >>> panel_b = AnalyzePanel("b", "Panel B", "html", lambda result: "<p>b</p>")
        >>> registry = PanelRegistry([panel_a])
        >>> panel = registry.register(panel_b, after="a")
        >>> registry.names()
        ['a', 'b']
    """

    def __init__(self, panels: list[AnalyzePanel] | None = None) -> None:
        self._panels: list[AnalyzePanel] = []
        for panel in panels or []:
            self.register(panel)

    def register(self, panel: AnalyzePanel, *, after: str | None = None) -> AnalyzePanel:
        """Add ``panel`` at the end, or right after the panel named ``after``.

        Raises:
            InputError: A panel of that name is registered already, or ``after`` is unknown.
        """
        if not isinstance(panel, AnalyzePanel):
            raise InputError(f"register() needs an AnalyzePanel, got {type(panel).__name__}.")
        if panel.name in self.names():
            raise InputError(
                f"An Analyze panel named {panel.name!r} is registered already; unregister it first "
                "or choose another name."
            )
        position = len(self._panels)
        if after is not None:
            if after not in self.names():
                raise InputError(f"No Analyze panel named {after!r} to insert after; the panels are {self.names()}.")
            position = self.names().index(after) + 1
        self._panels.insert(position, panel)
        return panel

    def unregister(self, name: str) -> AnalyzePanel:
        """Remove and return the panel named ``name``.

        Raises:
            InputError: No panel has that name.
        """
        for k, panel in enumerate(self._panels):
            if panel.name == name:
                return self._panels.pop(k)
        raise InputError(f"No Analyze panel named {name!r}; the panels are {self.names()}.")

    def names(self) -> list[str]:
        """Panel names, in page order."""
        return [panel.name for panel in self._panels]

    def for_pair(self, pair: Any) -> list[AnalyzePanel]:
        """The panels that apply to ``pair``, in page order."""
        return [panel for panel in self._panels if panel.available(pair)]

    def __iter__(self) -> Iterator[AnalyzePanel]:
        return iter(list(self._panels))

    def __len__(self) -> int:
        return len(self._panels)


def _tokens(result: AnalyzeResult) -> str:
    return token_html(result.decomposition, 0).html


def _layers(result: AnalyzeResult) -> go.Figure:
    return plot_layers(result.decomposition, 0)


def _heatmap(result: AnalyzeResult) -> go.Figure:
    return plot_token_heatmap(result.decomposition, 0)


def _components(result: AnalyzeResult) -> go.Figure:
    return plot_components(result.decomposition, 0)


def _heads(result: AnalyzeResult) -> go.Figure:
    if result.decomposition.ftc_head is None:
        return go.Figure(layout=dict(title="No per-head split: a norm follows this model's attention output"))
    return plot_head_heatmap(result.decomposition, 0, shares=True)


def _top_tokens(result: AnalyzeResult) -> go.Figure:
    if result.attribution is None:
        raise InputError("The top-tokens panel needs the prompt's logit attribution: build the result with analyze().")
    return plot_top_tokens(result.attribution, 0, part="ftc", k=8)


ANALYZE_PANELS = PanelRegistry(
    [
        AnalyzePanel("tokens", "Tokens coloured by per-token TuCo (hover a token for its value)", "html", _tokens),
        AnalyzePanel("layers", "Per layer, at the last token", "plot", _layers),
        AnalyzePanel("heatmap", "β per layer and token", "plot", _heatmap),
        AnalyzePanel("components", "Inside the blocks: attention / MLP / MLP←attention", "plot", _components),
        AnalyzePanel("heads", "Each attention head's share of TuCo", "plot", _heads),
        AnalyzePanel("top_tokens", "Tokens fine-tuning promotes and suppresses (direct logit effect)", "plot",
                     _top_tokens),
    ]
)
"""The panels the page draws (more register with :func:`register_analyze_panel`)."""


def register_analyze_panel(panel: AnalyzePanel, *, after: str | None = None) -> AnalyzePanel:
    """Register ``panel`` in :data:`ANALYZE_PANELS` (``ANALYZE_PANELS.register``).

    Example:
        >>> panel = register_analyze_panel(AnalyzePanel("table", "Per-token TuCo", "html",
        ...     lambda result: result.to_dataframe().to_html()), after="tokens")
        >>> "table" in ANALYZE_PANELS.names()
        True
        >>> removed = ANALYZE_PANELS.unregister("table")     # back to the built-in panels
    """
    return ANALYZE_PANELS.register(panel, after=after)


def render_panels(result: AnalyzeResult, panels: list[AnalyzePanel]) -> dict[str, go.Figure | str]:
    """``{panel name: panel.render(result)}`` for each panel, in order.

    Raises:
        InputError: A panel returned something else than its ``kind`` promises.
    """
    out: dict[str, go.Figure | str] = {}
    for panel in panels:
        value = panel.render(result)
        expected = go.Figure if panel.kind == "plot" else str
        if not isinstance(value, expected):
            raise InputError(
                f"Analyze panel {panel.name!r} ({panel.kind}) returned a {type(value).__name__}, "
                f"not a {expected.__name__}."
            )
        out[panel.name] = value
    return out
