"""Plotly figures and HTML views of TuCo results (tuned-lens style: functions return figures).

Every function returns a ``plotly.graph_objects.Figure`` (or an HTML object) and never calls
``.show()``; token strings go on the x axis, layers on the y axis.

- :func:`plot_layers`: PTC/FTC norms and the cumulative ratio β per layer, at the last token.
- :func:`plot_token_heatmap`: β per layer and token for one prompt.
- :func:`token_html`: the prompt's tokens coloured by per-token TuCo (Jupyter and reports).
- :func:`plot_prompt_sets`: TuCo distributions of named prompt sets, with ROC AUC.
- :func:`plot_alpha_sweep`: any metric as a function of the FTC scale α.
- :func:`plot_components`: FTC per layer split into attention / MLP / MLP←attention.
- :func:`plot_head_heatmap`: a layer × head heatmap of each head's FTC.
- :func:`plot_top_tokens`: the tokens a part of the stream promotes and suppresses most.
- :func:`save_report`: one offline, self-contained HTML file, optionally in
  :class:`ReportSection` sections (title, intro, figure, how to read it, docs link).
- :func:`set_colours`: the colour of a named prompt set, the same in every figure.

Every figure fits a 650 px notebook cell: the legend sits under the plot, labels are short
(no special tokens), margins are small.

Example:
    >>> from tuco_lens.plotting import plot_layers, plot_token_heatmap, save_report
    >>> dec = pair.decompose(prompts, chat_template=True)
    >>> save_report([plot_layers(dec), plot_token_heatmap(dec, 0)], "tuco.html")
    PosixPath('tuco.html')
"""

from tuco_lens.plotting._util import DEFAULT_COLORSCALE, set_colours
from tuco_lens.plotting.components import plot_components, plot_head_heatmap, plot_top_tokens
from tuco_lens.plotting.layers import plot_layers, plot_token_heatmap
from tuco_lens.plotting.report import ReportSection, save_report
from tuco_lens.plotting.sets import plot_alpha_sweep, plot_prompt_sets
from tuco_lens.plotting.tokens import TokenHTML, token_html

__all__ = [
    "plot_layers",
    "plot_token_heatmap",
    "token_html",
    "TokenHTML",
    "plot_prompt_sets",
    "plot_alpha_sweep",
    "plot_components",
    "plot_head_heatmap",
    "plot_top_tokens",
    "save_report",
    "ReportSection",
    "set_colours",
    "DEFAULT_COLORSCALE",
]
