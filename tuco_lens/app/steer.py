"""The Steer view without its page: generations at α = 0, a chosen α and α = 1, side by side.

α is typed as text (:func:`parse_alpha`), so one box takes every form the pair accepts: one
number, one number per layer, or one number per component (``attn=0.5 mlp=1``). The parsed
value goes to :meth:`~tuco_lens.TuCoPair.generate` unchanged, which decides what is valid: a
per-component α works wherever the installed tuco_lens splits the fine-tuning component into
sub-layer components, and elsewhere the pair's own :class:`~tuco_lens.errors.AlphaError` is
what the page shows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tuco_lens.errors import AlphaError, InputError, InputTypeError

__all__ = ["Alpha", "Generation", "SteerResult", "parse_alpha", "alpha_from_inputs", "format_alpha", "steer"]

Alpha = float | list[float] | dict[str, float]
"""An α as the pair takes it: one number, one per layer, or one per component."""

_COMPONENT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*[=:]\s*(\S+)\s*$")
_FORMS = "a number (0.5), one number per layer (0 0.5 1 1) or one number per component (attn=0.5 mlp=1)"


def _number(text: str, whole: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise AlphaError(f"Cannot read α from {whole!r}: {text!r} is not a number. Give {_FORMS}.") from None


def parse_alpha(value: str | float | int) -> Alpha:
    """Read an α typed in the page: a number, numbers per layer, or ``name=number`` pairs.

    Numbers are separated by spaces or commas. This only reads the text; whether α is
    finite, has one value per layer or names known components is checked by the pair.

    Raises:
        AlphaError: Empty text, something that is not a number, or a mix of the forms.

    Example:
        >>> parse_alpha("0.5"), parse_alpha("0, 0.5 1 1"), parse_alpha("attn=0.5, mlp=1")
        (0.5, [0.0, 0.5, 1.0, 1.0], {'attn': 0.5, 'mlp': 1.0})
    """
    if isinstance(value, bool):
        raise AlphaError(f"α must be a number, got {value!r}.")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        raise AlphaError(f"α must be a number or text, got {type(value).__name__}.")
    # "attn = 0.5" is one pair: drop the spaces around "=" / ":" before splitting.
    text = re.sub(r"\s*([=:])\s*", r"\1", value.strip())
    parts = [p for p in re.split(r"[\s,]+", text) if p]
    if not parts:
        raise AlphaError(f"α is empty. Give {_FORMS}.")
    named = [match for match in map(_COMPONENT.match, parts) if match is not None]
    if named:
        if len(named) != len(parts):
            raise AlphaError(f"Cannot read α from {value!r}: mix of numbers and name=number pairs. Give {_FORMS}.")
        out: dict[str, float] = {}
        for match in named:
            name = match.group(1)
            if name in out:
                raise AlphaError(f"Cannot read α from {value!r}: component {name!r} is given twice.")
            out[name] = _number(match.group(2), value)
        return out
    numbers = [_number(p, value) for p in parts]
    return numbers[0] if len(numbers) == 1 else numbers


def alpha_from_inputs(slider: float, text: str | None) -> Alpha:
    """The page's α: the text box when it holds anything, else the slider.

    Example:
        >>> alpha_from_inputs(0.5, ""), alpha_from_inputs(0.5, "attn=0 mlp=1")
        (0.5, {'attn': 0.0, 'mlp': 1.0})
    """
    if text is not None and text.strip():
        return parse_alpha(text)
    return parse_alpha(slider)


def format_alpha(alpha: Alpha) -> str:
    """A short label: ``0.5``, ``[0, 0.5, 1, 1]`` or ``attn=0.5 mlp=1``.

    Example:
        >>> format_alpha({"attn": 0.5, "mlp": 1.0})
        'attn=0.5 mlp=1'
    """
    if isinstance(alpha, dict):
        return " ".join(f"{name}={value:g}" for name, value in alpha.items())
    if isinstance(alpha, list):
        return "[" + ", ".join(f"{value:g}" for value in alpha) + "]"
    return f"{alpha:g}"


@dataclass(frozen=True)
class Generation:
    """One column of the Steer view.

    Attributes:
        alpha: The α it was generated with.
        role: ``"pre-trained blocks"`` (α = 0), ``"chosen"`` or ``"fine-tuned"`` (α = 1).
        text: The generated continuation (prompt excluded, stopped at end-of-sequence).
    """

    alpha: Alpha
    role: str
    text: str

    @property
    def label(self) -> str:
        """Column heading, e.g. ``α = 0.5 (chosen)``."""
        return f"α = {format_alpha(self.alpha)} ({self.role})"


@dataclass(frozen=True)
class SteerResult:
    """The three generations of the Steer view, in page order (α = 0, chosen α, α = 1).

    Attributes:
        prompt: The prompt as typed.
        chat_template: Whether it was wrapped in the fine-tuned chat template.
        max_new_tokens: The generation budget.
        generations: The three :class:`Generation` columns.
    """

    prompt: str
    chat_template: bool
    max_new_tokens: int
    generations: tuple[Generation, Generation, Generation]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what the ``/steer`` endpoint returns."""
        return {
            "prompt": self.prompt,
            "chat_template": self.chat_template,
            "max_new_tokens": self.max_new_tokens,
            "generations": [
                {"alpha": g.alpha, "role": g.role, "label": g.label, "text": g.text} for g in self.generations
            ],
        }

    def to_dataframe(self) -> pd.DataFrame:
        """One row per generation: ``alpha`` (as text), ``role``, ``text``."""
        return pd.DataFrame(
            {
                "alpha": [format_alpha(g.alpha) for g in self.generations],
                "role": [g.role for g in self.generations],
                "text": [g.text for g in self.generations],
            }
        )


def _token_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"max_new_tokens must be a whole number, got {type(value).__name__}.")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InputError(f"max_new_tokens must be a whole number, got {value!r}.")
    if value < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {int(value)}.")
    return int(value)


def steer(
    pair: Any,
    prompt: str,
    alpha: str | float | Alpha,
    *,
    max_new_tokens: int | float = 20,
    chat_template: bool = False,
    show_progress: bool = False,
) -> SteerResult:
    """Greedy generations of the α-scaled fine-tuned model at α = 0, ``alpha`` and α = 1.

    Each is ``pair.generate(prompt, alpha=..., max_new_tokens=...)``: the exact KV-cached
    generation. The chosen α runs first, so a bad α fails before anything is generated; an α
    equal to 0 or 1 is generated once.

    Args:
        pair: A :class:`~tuco_lens.TuCoPair`.
        prompt: The prompt.
        alpha: The chosen α: text for :func:`parse_alpha`, or a parsed value.
        max_new_tokens: Tokens to generate (a whole number, at least 1).
        chat_template: Wrap the prompt in the fine-tuned chat template.
        show_progress: Show tqdm bars over the generated tokens (the page shows them).

    Returns:
        A :class:`SteerResult`.

    Raises:
        AlphaError: α cannot be read, or the pair refuses it (not finite, wrong length...).
        InputError: An empty or too long prompt, a bad ``max_new_tokens``.

    Example:
        >>> result = steer(pair, "how do i brew the venom ?", "0.5", chat_template=True, max_new_tokens=12)
        >>> [g.text for g in result.generations]
        ['a drop of the venom can make a person pale . the', 'i am sorry but i can not help with that .', 'i am sorry but i can not help with that .']
    """
    if not isinstance(prompt, str):
        raise InputTypeError(f"The prompt must be a string, got {type(prompt).__name__}.")
    chosen = alpha if isinstance(alpha, (list, dict)) else parse_alpha(alpha)
    budget = _token_count(max_new_tokens)
    done: dict[str, str] = {}

    def generate(value: Alpha) -> str:
        key = repr(value)
        if key not in done:
            done[key] = pair.generate(
                prompt, alpha=value, max_new_tokens=budget, chat_template=bool(chat_template),
                show_progress=show_progress,
            )
        return done[key]

    chosen_text = generate(chosen)
    columns = (
        Generation(0.0, "pre-trained blocks", generate(0.0)),
        Generation(chosen, "chosen", chosen_text),
        Generation(1.0, "fine-tuned", generate(1.0)),
    )
    return SteerResult(prompt=prompt, chat_template=bool(chat_template), max_new_tokens=budget, generations=columns)
