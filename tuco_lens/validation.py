"""Every check of a value a user passes to tuco_lens, in one place.

Each validator raises a tuco_lens error (:mod:`tuco_lens.errors`) that names the argument, what
is wrong with it and what to pass instead, and returns the value in the form the code uses.
Checks of whole objects live with what they check: :func:`tuco_lens.compatibility.check_compatible`
(a pair of models), :func:`tuco_lens.versions.check_versions` (the installed libraries),
:func:`tuco_lens.components.check_component_alpha` (α per component, parsed into its dataclass),
:func:`tuco_lens.inputs.prepare_batch` (prompts and token ids) and the output-file checks of
:mod:`tuco_lens.scoring_io`.

Example:
    >>> check_size(8, "batch_size"), check_size(None, "token_budget")
    (8, None)
    >>> check_size(0, "batch_size")
    Traceback (most recent call last):
    ...
    tuco_lens.errors.InputError: batch_size must be a positive integer or None, got 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import numpy as np
import torch
from torch import Tensor

from tuco_lens.errors import AlphaError, InputError, InputTypeError

if TYPE_CHECKING:
    from tuco_lens.decomposition import Norm

__all__ = [
    "NORMS",
    "check_accumulate_dtype",
    "check_alpha",
    "check_callable",
    "check_device",
    "check_eos_token_id",
    "check_float",
    "check_int",
    "check_norm",
    "check_options",
    "check_sampling",
    "check_size",
    "is_real_number",
]

#: The norms TuCo is computed with: ``"l1"`` (the paper's) and ``"l2"``.
NORMS = ("l1", "l2")


def is_real_number(value: object) -> TypeGuard[numbers.Real]:
    """A real number (Python, numpy or 0-d torch), not a bool.

    Example:
        >>> is_real_number(np.float32(0.5)), is_real_number(True), is_real_number("1")
        (True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_options(options: Mapping[str, Any], allowed: Iterable[str], where: str, what: str = "option") -> None:
    """Refuse keyword options a function gathers in ``**options`` that are not among ``allowed``.

    Example:
        >>> check_options({"chat_templat": True}, ("attention_mask", "chat_template"), "TuCoPair.tuco")
        Traceback (most recent call last):
        ...
        tuco_lens.errors.InputTypeError: TuCoPair.tuco() got an unexpected keyword argument 'chat_templat'; its options are attention_mask, chat_template.
    """
    allowed = tuple(allowed)
    unknown = [name for name in options if name not in allowed]
    if unknown:
        raise InputTypeError(
            f"{where}() got an unexpected keyword argument {unknown[0]!r}; its {what}s are {', '.join(allowed)}."
        )


def check_int(value: object, name: str, minimum: int | None = None) -> int:
    """An integer (Python or numpy, not a bool), at least ``minimum`` if given.

    Example:
        >>> check_int(np.int64(3), "n_samples", 1)
        3
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}.")
    return value


def check_size(value: object, name: str, *, optional: bool = True) -> int | None:
    """A positive integer (a number of rows, tokens, prompts...), or None where ``optional``.

    Example:
        >>> check_size(np.int64(4), "batch_size")
        4
    """
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        allowed = "a positive integer or None" if optional else "a positive integer"
        raise InputError(f"{name} must be {allowed}, got {value!r}.")
    return int(value)


def check_float(value: object, name: str, positive: bool = False) -> float:
    """A finite number (Python or numpy, not a bool), > 0 if ``positive``.

    Example:
        >>> check_float(np.float32(0.5), "temperature", positive=True)
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"{name} must be a number, got {type(value).__name__} ({value!r}).")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise InputError(f"{name} must be a finite{' positive' if positive else ''} number, got {value}.")
    return value


def check_callable(value: object, name: str) -> None:
    """A function, or None."""
    if value is not None and not callable(value):
        raise InputTypeError(f"{name} must be a function (or None), got {type(value).__name__}.")


def check_norm(norm: str) -> Norm:
    """Validate a norm name, raising :class:`~tuco_lens.errors.InputError` otherwise."""
    if norm not in NORMS:
        raise InputError(f"norm must be 'l1' (the paper's) or 'l2', got {norm!r}.")
    return cast("Norm", norm)  # checked against NORMS just above


def check_accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Validate the dtype the norms and running sums are kept in (float32 or float64)."""
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"accumulate_dtype must be torch.float32 or torch.float64, got {dtype}.")
    return dtype


def check_alpha(alpha: float | Sequence[float] | Tensor, n_layers: int) -> list[float]:
    """Validate α (one number, or one per layer) and return one float per layer.

    Numbers may be Python, numpy (``np.float32(0.5)``) or torch scalars; one value per layer
    may be a list, a tuple, a 1-D numpy array or tensor.

    Raises:
        AlphaError: α is not a finite real number, or a per-layer α has the wrong length.

    Example:
        >>> check_alpha(0.5, 3)
        [0.5, 0.5, 0.5]
        >>> check_alpha(np.array([0.0, 1.0]), 2)
        [0.0, 1.0]
    """
    if isinstance(alpha, (Tensor, np.ndarray, np.generic)):
        if getattr(alpha, "ndim", 0) > 1:
            raise AlphaError(f"alpha must be a number or one number per layer, got an array of shape {tuple(alpha.shape)}.")
        alpha = alpha.tolist()
    if is_real_number(alpha):
        values = [float(alpha)] * n_layers
    elif isinstance(alpha, Sequence) and not isinstance(alpha, (str, bytes)):
        values = list(alpha)
        if len(values) != n_layers:
            raise AlphaError(
                f"A per-layer alpha needs one value per layer: got {len(values)} values for "
                f"{n_layers} layers."
            )
        if not all(is_real_number(a) for a in values):
            raise AlphaError(f"alpha values must be real numbers, got {values!r}.")
        values = [float(a) for a in values]
    else:
        raise AlphaError(
            f"alpha must be a number or one number per layer, got {type(alpha).__name__}."
        )
    bad = [a for a in values if not math.isfinite(a)]
    if bad:
        raise AlphaError(
            f"alpha must be finite, got {bad[0]}. (Negative alpha is allowed: it reverses "
            "the fine-tuning component.)"
        )
    return values


def check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling options that are not numbers, or that would sample from a distorted distribution.

    ``temperature`` must be a finite number > 0 (a negative one would sample from the inverted
    distribution), ``top_k`` a positive integer, ``top_p`` a number in (0, 1]; all are checked
    even when ``do_sample=False`` ignores them, so a typo never goes unnoticed.

    Raises:
        InputError: a value out of range. InputTypeError: a value of the wrong type.

    Example:
        >>> check_sampling(True, 0.7, top_k=50, top_p=0.9)
    """
    if not isinstance(do_sample, (bool, np.bool_)):
        raise InputTypeError(f"do_sample must be True or False, got {do_sample!r}.")
    if not is_real_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise InputError(
            f"temperature must be a finite number > 0, got {temperature!r} (a negative temperature "
            "would sample from the inverted distribution). Use do_sample=False for greedy decoding."
        )
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}.")
    if top_p is not None and (not is_real_number(top_p) or not 0 < float(top_p) <= 1):
        raise InputError(f"top_p must be a number in (0, 1] or None, got {top_p!r}.")


def check_eos_token_id(eos_token_id: Any, d_vocab: int) -> None:
    """Refuse an ``eos_token_id`` that is not a token id (or a non-empty list of them) of the vocabulary.

    Example:
        >>> check_eos_token_id([2, 7], d_vocab=128)
    """
    if eos_token_id is None:
        return
    ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not ids or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        raise InputTypeError(f"eos_token_id must be a token id or a non-empty list of token ids, got {eos_token_id!r}.")
    bad = [int(i) for i in ids if not 0 <= int(i) < d_vocab]
    if bad:
        raise InputError(f"eos_token_id {bad[0]} is outside the vocabulary [0, {d_vocab}).")


def check_device(device: Any) -> None:
    """Refuse a ``device`` that is not a device name, or names a device this machine lacks.

    ``None`` (TransformerLens's choice), ``"cpu"`` and ``"meta"`` always pass; ``"cuda"``,
    ``"cuda:N"``, ``"mps"``, ``"xpu"``... must be available (and ``N`` below the device count).

    Raises:
        InputTypeError: ``device`` is neither a string nor a ``torch.device``.
        InputError: an unknown device type, or one that is not available here.

    Example:
        >>> check_device("cpu")
    """
    if device is None:
        return
    if not isinstance(device, (str, torch.device)):
        raise InputTypeError(
            f"device must be a string or torch.device, got {type(device).__name__}"
        )
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise InputError(
            f"unknown device {device!r} ({error}); use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from None
    if parsed.type in ("cpu", "meta"):
        return
    if parsed.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        module = getattr(torch, parsed.type, None)
        if module is None or not hasattr(module, "is_available"):
            return  # a device type torch knows but tuco_lens cannot query: torch decides
        available = bool(module.is_available())
        count = int(module.device_count()) if available and hasattr(module, "device_count") else 0
    if not available:
        raise InputError(
            f"device {str(device)!r} is not available on this machine (torch finds no "
            f"{parsed.type} device); use device='cpu' or leave device unset"
        )
    if parsed.index is not None and parsed.index >= count:
        raise InputError(
            f"device {str(device)!r} does not exist: this machine has {count} {parsed.type} "
            f"device(s), {parsed.type}:0 to {parsed.type}:{count - 1}"
        )
