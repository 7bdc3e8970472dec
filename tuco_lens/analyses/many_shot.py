"""Many-shot jailbreaking: TuCo (and behaviour) as a function of the number of shots (paper §5.3)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tuco_lens.analyses._common import (
    apply_checked,
    check_common,
    check_pair,
    check_sample_settings,
    groups_of,
    label,
    mean_sem,
    n_prompt_tokens,
    score,
    sem,
)
from tuco_lens.analyses.outputco import outputco as _outputco
from tuco_lens.decomposition import Norm
from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.io import PromptSource, read_prompts
from tuco_lens.pair import TuCoPair
from tuco_lens.plotting._util import notebook_layout, set_colours
from tuco_lens.validation import check_callable, check_int

__all__ = ["Shot", "ManyShotSweep", "many_shot_sweep", "chat_template_builder", "default_ks"]

Shot = tuple[str, str]
"""One example dialogue: ``(user message, assistant reply)``."""

ShotPool = Sequence[Shot] | Sequence[Mapping[str, str]] | pd.DataFrame


@dataclass(frozen=True)
class ManyShotSweep:
    """TuCo of many-shot prompts per request and number of shots ``k``.

    Attributes:
        table: One row per (request, k) that was scored: ``request_index``, ``request``, ``k``,
            ``n_tokens`` (prompt length), ``prompt`` (the built prompt), ``tuco``; with
            ``with_outputco=True`` also ``outputco``; with a ``behaviour`` predicate also
            ``behaviour_rate`` (fraction of the request's completions showing the behaviour)
            and ``completion`` (the first completion).
        summary: One row per k (increasing): ``k``, ``n`` (requests scored), ``mean_tuco``,
            ``sem_tuco``; ``mean_outputco``, ``sem_outputco`` with OutputCo;
            ``behaviour_rate`` (mean over requests and samples) and ``behaviour_sem`` (standard
            error over requests) with a predicate.
        completions: With a predicate: one row per completion: ``request_index``, ``k``,
            ``sample``, ``completion``, ``behaviour``. Otherwise ``None``.
        skipped: Prompts left out because they did not fit the context (``too_long="skip"``):
            ``request_index``, ``k``, ``n_tokens``, ``limit``. Empty otherwise.
        notes: Human-readable notes (e.g. how many prompts were skipped).
        ks: The shot counts, increasing.
        behaviour_name: Label of the behaviour rate in the figure.
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    completions: pd.DataFrame | None
    skipped: pd.DataFrame
    ks: tuple[int, ...]
    notes: list[str] = field(default_factory=list)
    behaviour_name: str = "behaviour rate"

    def to_dataframe(self) -> pd.DataFrame:
        """A copy of :attr:`table`."""
        return self.table.copy()

    def figure(self, *, log_x: bool = True, title: str | None = None) -> go.Figure:
        """Mean TuCo (± standard error) vs k on top; the behaviour rate under it, on its own axis.

        With ``log_x`` (the paper's spacing) the shot counts are evenly spaced categories,
        so ``k = 0`` sits on the axis with the others; otherwise k is linear. The TuCo panel's
        axis fits the means (it does not start at 0), so small changes stay visible.
        """
        s = self.summary
        has_rate = "behaviour_rate" in s.columns
        has_oc = "mean_outputco" in s.columns
        rows = 2 if has_rate else 1
        fig = make_subplots(
            rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.12, row_heights=[0.6, 0.4][:rows] if has_rate else None,
            subplot_titles=("mean TuCo" + (" and OutputCo" if has_oc else "") + " (± s.e.)",
                            *([self.behaviour_name] if has_rate else [])),
        )
        x = [str(k) for k in s["k"]] if log_x else s["k"]
        series = [("mean TuCo", "mean_tuco", "sem_tuco", 1)]
        if has_oc:
            series.append(("mean OutputCo", "mean_outputco", "sem_outputco", 1))
        if has_rate:
            series.append((self.behaviour_name, "behaviour_rate", "behaviour_sem", 2))
        colours = set_colours([name for name, *_ in series])
        for name, column, err, row in series:
            fig.add_trace(
                go.Scatter(
                    x=x, y=s[column], name=name, mode="lines+markers", line_color=colours[name],
                    error_y=dict(type="data", array=s[err].fillna(0.0), visible=True),
                    customdata=s["n"],
                    hovertemplate=f"{name}<br>k = %{{x}}<br>value = %{{y:.4f}}<br>n = %{{customdata}}<extra></extra>",
                ),
                row=row, col=1,
            )
        fig.update_xaxes(title_text="number of shots k" + (" (evenly spaced)" if log_x else ""), row=rows, col=1)
        fig.update_xaxes(type="category" if log_x else "linear")
        fig.update_yaxes(title_text="TuCo" + (" / OutputCo" if has_oc else ""), row=1, col=1)
        if has_rate:
            fig.update_yaxes(title_text="rate", range=[-0.05, 1.05], tickformat=".0%", row=2, col=1)
        heading = title or (
            "Many-shot prompts: TuCo vs number of shots"
            f"<br><sup>n = {int(s['n'].to_numpy().max())} requests per k</sup>"
        )
        notebook_layout(fig, heading, height=560 if has_rate else 450)
        fig.update_annotations(x=0, xanchor="left", font_size=13)  # subplot titles: left-aligned, small
        return fig


def default_ks(pool_size: int) -> tuple[int, ...]:
    """``(0, 1, 2, 4, …)``: 0 and every power of two up to ``pool_size``."""
    ks = [0]
    k = 1
    while k <= pool_size:
        ks.append(k)
        k *= 2
    return tuple(ks)


def chat_template_builder(pair: TuCoPair) -> Callable[[str, list[Shot]], str]:
    """The default prompt builder: the fine-tuned tokenizer's chat template over the dialogue.

    The k example dialogues become k user/assistant turns, followed by the request as the last
    user turn and the generation prompt (the template's text decides BOS).

    Raises:
        InputError: If the fine-tuned model has no tokenizer or no chat template.
    """
    tokenizer = pair.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "The fine-tuned tokenizer has no chat template, so many-shot prompts cannot be built "
            "by default. Pass build_prompt=lambda request, shots: ... returning the prompt text."
        )

    def build(request: str, shots: list[Shot]) -> str:
        messages = []
        for user, assistant in shots:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": request})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)

    return build


def _read_shots(shots: ShotPool) -> list[Shot]:
    if isinstance(shots, pd.DataFrame):
        missing = [c for c in ("user", "assistant") if c not in shots.columns]
        if missing:
            raise InputError(f"The shots DataFrame needs 'user' and 'assistant' columns; it lacks {missing}.")
        items: list = list(zip(shots["user"].tolist(), shots["assistant"].tolist()))
    elif isinstance(shots, (str, bytes)) or not isinstance(shots, Sequence):
        raise InputTypeError(
            "shots must be a list of (user, assistant) pairs, of {'user': ..., 'assistant': ...} "
            f"dicts, or a DataFrame with 'user' and 'assistant' columns; got {type(shots).__name__}."
        )
    else:
        items = list(shots)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            if "user" not in item or "assistant" not in item:
                raise InputError(f"shots[{i}] needs 'user' and 'assistant' keys, has {sorted(item)}.")
            item = (item["user"], item["assistant"])
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise InputTypeError(f"shots[{i}] must be a (user, assistant) pair, got {item!r}.")
        user, assistant = item
        if not isinstance(user, str) or not isinstance(assistant, str):
            raise InputTypeError(f"shots[{i}] must hold two strings, got ({type(user).__name__}, {type(assistant).__name__}).")
        out.append((user, assistant))
    return out


def _check_ks(ks: Sequence[int] | None, pool_size: int) -> tuple[int, ...]:
    if ks is None:
        return default_ks(pool_size)
    given = [ks] if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool) else ks
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise InputTypeError(f"ks must be a list of shot counts, got {type(given).__name__}.")
    values = [check_int(k, "every k in ks", 0) for k in given]
    if not values:
        raise InputError("ks is empty: pass at least one number of shots (e.g. (0, 1, 2, 4)).")
    too_many = [k for k in values if k > pool_size]
    if too_many:
        raise InputError(
            f"k = {max(too_many)} needs {max(too_many)} distinct example dialogues but the shot pool "
            f"has {pool_size}; pass more shots or smaller ks."
        )
    return tuple(sorted(set(values)))


def many_shot_sweep(
    pair: TuCoPair,
    requests: PromptSource,
    shots: ShotPool,
    ks: Sequence[int] | None = None,
    *,
    build_prompt: Callable[[str, list[Shot]], str] | None = None,
    behaviour: Callable[[str], bool] | None = None,
    behaviour_name: str = "behaviour rate",
    shuffle: bool = True,
    seed: int = 0,
    too_long: Literal["raise", "skip"] = "raise",
    max_new_tokens: int = 30,
    do_sample: bool = False,
    n_samples: int = 1,
    temperature: float = 1.0,
    alpha: float = 1.0,
    with_outputco: bool = False,
    batch_size: int | None = None,
    show_progress: bool = False,
    norm: str = "l1",
) -> ManyShotSweep:
    """TuCo of many-shot prompts for k = 0, 1, 2, 4, … example dialogues, and optionally a behaviour rate.

    Reproduces the paper's many-shot jailbreaking analysis (§5.3): each target request is
    preceded by k example dialogues (in the paper, compliant answers to harmful requests); mean
    TuCo falls with k (Llama 2 7B 0.285 → 0.22 from 1 to 128 shots) while the share of harmful
    responses rises. With ``with_outputco=True`` it also gives the §5.5 comparison with OutputCo.

    Shots: for request ``i`` the pool is put in a random order seeded by ``(seed, i)`` (or kept
    in order with ``shuffle=False``) and the k-shot prompt uses its first k dialogues, so the
    shots of a smaller k are a prefix of those of a larger k (only k changes along the sweep).

    Prompts: by default the fine-tuned tokenizer's chat template renders the k example turns,
    then the request as the last user turn, with the generation prompt; its text decides BOS
    (as ``chat_template=True`` does elsewhere), and TuCo is taken at the template's last token.
    ``build_prompt(request, shots_k) -> str`` replaces this (e.g. a Q/A format, or
    ``lambda r, s: demo.many_shot_prompt(r, len(s))``); its strings are scored like any prompt
    (``pair.tuco(prompt)``: BOS is prepended unless the text starts with the BOS token).

    Context length: a prompt with more tokens than the model's context (or, with ``behaviour``,
    more than the context minus ``max_new_tokens``) raises an :class:`InputError` naming k and
    the request (``too_long="raise"``, the default), or is left out and listed in ``skipped``
    and ``notes`` (``too_long="skip"``).

    Args:
        pair: The pre-trained / fine-tuned pair.
        requests: Target requests (plain user messages): a list, a DataFrame with a ``prompt``
            column, or a ``.jsonl`` / ``.txt`` path.
        shots: Pool of example dialogues: ``(user, assistant)`` pairs, ``{"user", "assistant"}``
            dicts, or a DataFrame with ``user`` and ``assistant`` columns.
        ks: Numbers of shots (each ``0 <= k <= len(shots)``). Default: 0 and powers of two up
            to the pool size (the paper uses 1, 2, 4, …, 128).
        build_prompt: ``(request, shots_k) -> prompt text``; default: the chat template.
        behaviour: ``completion -> bool``, e.g. "is not a refusal". When given, completions are
            generated (greedy by default) and the rate is reported per k.
        behaviour_name: Label of the rate in the figure (e.g. ``"refusal rate"``).
        shuffle: Draw each request's shots in a seeded random order (else the pool's order).
        seed: Seed of the shot order and of sampling.
        too_long: ``"raise"`` or ``"skip"`` prompts that do not fit the context.
        max_new_tokens: Completion length for ``behaviour``.
        do_sample: Sample completions (seeded with ``seed``) instead of greedy decoding.
        n_samples: Completions per prompt (needs ``do_sample=True`` when > 1).
        temperature: Sampling temperature.
        alpha: FTC scale for the generated completions (1 = the fine-tuned model); TuCo is
            always measured on the unscaled pair.
        with_outputco: Also compute :func:`~tuco_lens.analyses.outputco` per prompt.
        batch_size: Rows per forward pass / generation batch (``None``: one batch per k).
        show_progress: Progress bars.
        norm: ``"l1"`` (the paper's) or ``"l2"``.

    Returns:
        A :class:`ManyShotSweep` (``table``, ``summary`` per k, ``completions``, ``figure()``).

    Raises:
        InputError: Empty requests or pool, a k < 0 or larger than the pool, a prompt too long
            for the context (``too_long="raise"``), ``n_samples > 1`` without sampling, no chat
            template and no ``build_prompt``, or a ``build_prompt`` / ``behaviour`` that fails.
        InputTypeError: Arguments of the wrong type, a ``build_prompt`` that returns no string,
            a ``behaviour`` that returns no bool.

    Example:
        >>> from tuco_lens import demo
        >>> from tuco_lens.analyses import many_shot_sweep
        >>> harmful = [r.text for r in demo.requests("heldout", ["potions"])[:3]]
        >>> pool = [(r.text, r.compliant_answer) for r in demo.requests("train", ["potions"])[:4]]
        >>> sweep = many_shot_sweep(pair, harmful, pool, ks=[0, 2, 4],
        ...                         build_prompt=lambda r, s: demo.many_shot_prompt(r, len(s)),
        ...                         behaviour=demo.is_refusal, behaviour_name="refusal rate",
        ...                         max_new_tokens=12)
        >>> sweep.summary[["k", "mean_tuco", "behaviour_rate"]].round(3)
           k  mean_tuco  behaviour_rate
        0  0      0.543             1.0
        1  2      0.545             1.0
        2  4      0.534             1.0
        >>> fig = sweep.figure()
    """
    pair = check_pair(pair)
    norm = check_common(batch_size, norm)
    request_list = read_prompts(requests, name="requests")
    pool = _read_shots(shots)
    ks_checked = _check_ks(ks, len(pool))
    if too_long not in ("raise", "skip"):
        raise InputError(f"too_long must be 'raise' or 'skip', got {too_long!r}.")
    check_callable(build_prompt, "build_prompt")
    check_callable(behaviour, "behaviour")
    n_samples, max_new_tokens, seed, temperature = check_sample_settings(n_samples, max_new_tokens, seed, temperature)
    if n_samples > 1 and not do_sample:
        raise InputError(f"n_samples = {n_samples} needs do_sample=True (greedy decoding gives one completion).")
    prepend_bos = None if build_prompt is not None else False  # the template's text decides BOS
    build = build_prompt if build_prompt is not None else chat_template_builder(pair)

    n_ctx = pair.ft.cfg.n_ctx
    limit = n_ctx - (max_new_tokens if behaviour is not None else 0)
    fits = f"the model's context of {n_ctx}" if behaviour is None else (
        f"{limit} (context {n_ctx} minus max_new_tokens {max_new_tokens})"
    )
    orders = [_shot_order(len(pool), shuffle, seed, i) for i in range(len(request_list))]
    table, skipped = _prompt_table(pair, request_list, pool, orders, ks_checked, build, prepend_bos, limit, fits, too_long)
    notes = [] if not skipped else [
        f"{len(skipped)} prompt(s) did not fit in {limit} tokens and were skipped "
        f"(k = {sorted({s['k'] for s in skipped})})."
    ]
    present = set(table["k"].tolist())
    scored_ks = tuple(k for k in ks_checked if k in present)
    for name, values in _scores_by_k(pair, table, scored_ks, with_outputco, prepend_bos, batch_size, show_progress, norm).items():
        table[name] = values
    completions = None
    if behaviour is not None:
        samples = pair.sample(
            table["prompt"].tolist(), n_samples, seed=seed, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, alpha=alpha, prepend_bos=prepend_bos, batch_size=batch_size,
            show_progress=show_progress,
        )
        completions = _label_completions(table, samples, behaviour)
    return ManyShotSweep(
        table=table,
        summary=_summary(table, completions, scored_ks, with_outputco),
        completions=completions,
        skipped=pd.DataFrame(skipped, columns=["request_index", "k", "n_tokens", "limit"]),
        ks=scored_ks,
        notes=notes,
        behaviour_name=behaviour_name,
    )


def _shot_order(pool_size: int, shuffle: bool, seed: int, request_index: int) -> list[int]:
    """The order of the shot pool for one request: seeded by ``(seed, request_index)``, or kept."""
    order = list(range(pool_size))
    if shuffle:
        random.Random(f"tuco-many-shot-{seed}-{request_index}").shuffle(order)
    return order


def _prompt_table(
    pair: TuCoPair, requests: list[str], pool: list[Shot], orders: list[list[int]], ks: tuple[int, ...],
    build: Callable[[str, list[Shot]], str], prepend_bos: bool | None, limit: int, fits: str, too_long: str,
) -> tuple[pd.DataFrame, list[dict[str, int]]]:
    """One row per (k, request) whose prompt fits in ``limit`` tokens, and the skipped ones."""
    rows, skipped = [], []
    for k in ks:
        for i, request in enumerate(requests):
            shots_k = [pool[j] for j in orders[i][:k]]
            prompt = apply_checked(lambda r, shots=shots_k: build(r, shots), request, f"build_prompt(request {i}, {k} shots)")
            if not isinstance(prompt, str) or not prompt:
                raise InputTypeError(f"build_prompt must return a non-empty str, got {prompt!r} for request {i} at k = {k}.")
            n_tokens = n_prompt_tokens(pair, prompt, prepend_bos)
            if n_tokens <= limit:
                rows.append({"request_index": i, "request": request, "k": k, "n_tokens": n_tokens, "prompt": prompt})
            elif too_long == "raise":
                raise InputError(
                    f"The many-shot prompt with k = {k} shots for request {i} has {n_tokens} tokens, "
                    f"more than {fits}. Use smaller ks, shorter shots, or too_long='skip'."
                )
            else:
                skipped.append({"request_index": i, "k": k, "n_tokens": n_tokens, "limit": limit})
    if not rows:
        raise InputError("No many-shot prompt fits the model's context; use smaller ks or shorter shots.")
    return pd.DataFrame(rows), skipped


def _scores_by_k(
    pair: TuCoPair, table: pd.DataFrame, ks: tuple[int, ...], with_outputco: bool, prepend_bos: bool | None,
    batch_size: int | None, show_progress: bool, norm: Norm,
) -> dict[str, np.ndarray]:
    """``tuco`` (and ``outputco``) of every row of ``table``, one scoring call per k."""
    columns = {name: np.empty(len(table)) for name in (("tuco", "outputco") if with_outputco else ("tuco",))}
    for k in ks:
        where = np.flatnonzero(table["k"].to_numpy() == k)
        prompts = table["prompt"].iloc[where].tolist()
        columns["tuco"][where] = score(pair, prompts, prepend_bos=prepend_bos, batch_size=batch_size, show_progress=show_progress, norm=norm)
        if with_outputco:
            oc = _outputco(pair, prompts, prepend_bos=prepend_bos, batch_size=batch_size, norm=norm)
            columns["outputco"][where] = oc.detach().cpu().double().numpy()
    return columns


def _label_completions(table: pd.DataFrame, samples: list[list[str]], behaviour: Callable[[str], bool]) -> pd.DataFrame:
    """One row per completion with its ``behaviour`` label; adds ``behaviour_rate`` and ``completion``
    (the first sample) to ``table``."""
    records, rates = [], []
    for i, k, texts in zip(table["request_index"].tolist(), table["k"].tolist(), samples):
        labels = [label(behaviour, text, "behaviour", f"completion of request {i} at k = {k}") for text in texts]
        records += [
            {"request_index": i, "k": k, "sample": s, "completion": text, "behaviour": value}
            for s, (text, value) in enumerate(zip(texts, labels))
        ]
        rates.append(sum(labels) / len(labels))
    table["behaviour_rate"] = rates
    table["completion"] = [texts[0] for texts in samples]
    return pd.DataFrame(records)


def _summary(table: pd.DataFrame, completions: pd.DataFrame | None, ks: tuple[int, ...], with_outputco: bool) -> pd.DataFrame:
    """One row per k: mean TuCo (and OutputCo) with standard errors, and the behaviour rate."""
    tuco = groups_of(table, "k", "tuco")
    outputco = groups_of(table, "k", "outputco") if with_outputco else {}
    rates = groups_of(table, "k", "behaviour_rate") if completions is not None else {}
    labels = groups_of(completions, "k", "behaviour") if completions is not None else {}
    rows = []
    for k in ks:
        entry = {"k": k, "n": len(tuco[k]), **mean_sem(tuco[k], "tuco")}
        if with_outputco:
            entry.update(mean_sem(outputco[k], "outputco"))
        if completions is not None:
            entry["behaviour_rate"] = float(labels[k].mean())  # over requests and samples
            entry["behaviour_sem"] = sem(rates[k])  # over requests
        rows.append(entry)
    return pd.DataFrame(rows)
