"""Errors raised by tuco_lens.

Every error a user can trigger with bad input derives from :class:`TuCoError`, so
``except tuco_lens.TuCoError`` catches all of them. Each also derives from the builtin
exception a Python user would expect (``ValueError``, ``TypeError``, ``FileNotFoundError``),
so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = [
    "TuCoError",
    "IncompatiblePairError",
    "ModelLoadError",
    "InputError",
    "InputTypeError",
    "AlphaError",
    "UnsupportedVersionsError",
    "MissingDependencyError",
    "OutputError",
    "ResumeMismatchError",
    "OutputLockedError",
    "TuCoWarning",
    "DoubledBOSWarning",
    "ChatTemplateTwiceWarning",
    "NonFiniteError",
]


class TuCoError(Exception):
    """Base class of every error tuco_lens raises on purpose."""


class IncompatiblePairError(TuCoError, ValueError):
    """The pre-trained and fine-tuned models cannot form a TuCo pair.

    The message names what differs (layer count, width, heads, vocabulary, positional
    embedding, normalization, weight processing, device or dtype) and how to fix it.
    """


class ModelLoadError(TuCoError, FileNotFoundError):
    """A model could not be resolved or loaded (missing path, unsupported architecture...)."""


class InputError(TuCoError, ValueError):
    """Prompts, tokens or attention masks that cannot be scored as given."""


class InputTypeError(TuCoError, TypeError):
    """An input of the wrong type (e.g. float tokens, a dict where a prompt was expected)."""


class AlphaError(TuCoError, ValueError):
    """An α that is not a finite number, or a per-layer α of the wrong length."""


class UnsupportedVersionsError(TuCoError, RuntimeError):
    """The installed library versions are known to give wrong results (see the README, 'Tested versions')."""


class MissingDependencyError(TuCoError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the extra to install."""


class OutputError(TuCoError, OSError):
    """An output path that cannot be written, or an output file that cannot be resumed safely.

    Raised before any model is loaded where possible (a missing directory, a path that is a
    directory, an unwritable location, an output that would overwrite the input), and while
    writing when the disk refuses a batch (the batch is rolled back, see docs/guarantees.md).
    """


class ResumeMismatchError(OutputError):
    """An existing output was computed with other prompts or settings than the current run.

    The message names what changed and the two ways out: a new ``--out``, or ``--overwrite``.
    """


class OutputLockedError(OutputError):
    """Another process is writing the same output (its lock file is held)."""


class TuCoWarning(UserWarning):
    """Base class of the warnings tuco_lens gives about inputs it scores as given."""


class DoubledBOSWarning(TuCoWarning):
    """A row starts with two BOS tokens (e.g. ``model.to_tokens`` on a chat-formatted string).

    Given where a doubled BOS can be told from padding: the pad token differs from BOS.
    """


class ChatTemplateTwiceWarning(TuCoWarning):
    """``chat_template=True`` on prompts that already look formatted by the chat template."""


class NonFiniteError(TuCoError, ArithmeticError):
    """A PTC or FTC that is not finite (inf or NaN) at a real token, e.g. a float16 overflow.

    Raised instead of a TuCo computed from infinities (the ratio of two NaNs is no number).
    """
