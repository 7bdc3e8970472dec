"""Regenerate the figures of docs/how-to/plots.md from the embedded demo pair (offline).

    OMP_NUM_THREADS=1 python docs/make_figures.py

Writes one HTML fragment per figure to docs/images/plots/: a ``<div>`` and the ``Plotly.newPlot``
call with the figure's data, without plotly.js (the site loads it once per page, see
docs/hooks/pages.py), and the token view of ``token_html``. The pages include them with
``--8<--``. Div ids are fixed, so rerunning on the same code gives the same files. Takes about
half a minute on one CPU thread (the α sweep generates greedily for 280 prompts at 7 values).
"""

from __future__ import annotations

from pathlib import Path

import plotly.io as pio
import torch

from tuco_lens import demo
from tuco_lens.analyses import behaviour_sweep
from tuco_lens.demo.refusals import refusal_budget
from tuco_lens.demo.report import ALPHAS
from tuco_lens.plotting import plot_layers, plot_prompt_sets, plot_token_heatmap, token_html

OUT = Path(__file__).resolve().parent / "images" / "plots"


def write(name: str, figure) -> None:
    html = pio.to_html(
        figure,
        include_plotlyjs=False,
        full_html=False,
        div_id=f"tuco-{name}",
        default_width="100%",
        default_height=f"{figure.layout.height or 480}px",
        config={"responsive": True, "displaylogo": False},
    )
    (OUT / f"{name}.html").write_text(html.strip() + "\n", encoding="utf-8")
    print(f"wrote {OUT / f'{name}.html'}")


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    pair = demo.load_pair()
    sets = demo.prompt_sets()

    # One prompt of each kind, decomposed layer by layer and token by token.
    names = ["web", "chat", "harmful"]
    dec = pair.decompose([sets[name][0] for name in names])
    write("layers", plot_layers(dec, labels=names))
    write("token_heatmap", plot_token_heatmap(dec, index=2, label="harmful"))
    (OUT / "token_html.html").write_text(token_html(dec, index=[0, 1, 2], labels=names).html + "\n", encoding="utf-8")
    print(f"wrote {OUT / 'token_html.html'}")

    # TuCo of whole prompt sets.
    scores = {name: pair.tuco(sets[name], batch_size=32) for name in ("web", "chat", "harmful", "harmful_lang2")}
    write("prompt_sets", plot_prompt_sets(scores, positive="chat", negative="web"))

    # Refusal rate of α-scaled greedy generation (the sweep of `tuco-lens demo`).
    sweep = behaviour_sweep(
        pair, {"harmful": sets["harmful"], "chat": sets["chat"]}, ALPHAS, demo.is_refusal,
        max_new_tokens=refusal_budget(pair), behaviour_name="refusal rate",
    )
    write("alpha_sweep", sweep.figure(title="Refusal rate of α-scaled greedy generation (demo pair)"))


if __name__ == "__main__":
    main()
