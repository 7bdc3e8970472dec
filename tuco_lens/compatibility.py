"""Can two TransformerLens models form a TuCo pair?

TuCo runs the pre-trained model's blocks on the fine-tuned model's residual stream, so both
models must share the architecture, the vocabulary, the device, the dtype and the way their
weights were processed (``fold_ln``, centering...). :func:`check_compatible` refuses a pair
that differs in any of these, listing every difference and how to fix it.

Example:
    >>> from tuco_lens.compatibility import check_compatible, describe_differences
    >>> describe_differences(pt_model, ft_model)
    []
    >>> check_compatible(pt_model, ft_model)  # raises IncompatiblePairError if the list is not empty
"""

from __future__ import annotations

import warnings
from typing import Any

from tuco_lens.backends import PROCESSING_FLAGS, Model, backend_of, is_model, recorded_processing
from tuco_lens.errors import IncompatiblePairError, InputTypeError

__all__ = [
    "PROCESSING_FLAGS",
    "check_compatible",
    "describe_differences",
    "processing_of",
]


_SAME_MODEL_HINT = (
    "a fine-tune has the architecture of its base model: check that you passed the right "
    "pre-trained model"
)
_ARCHITECTURE_FIELDS = (
    "n_layers",
    "d_model",
    "n_heads",
    "n_key_value_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "positional_embedding_type",
    "normalization_type",
    "act_fn",
    "gated_mlp",
    "parallel_attn_mlp",
    "rotary_dim",
)
_LEARNED_POSITIONS = ("standard", "shortformer")


def _cfg_value(model: Model, field: str) -> Any:
    cfg = model.cfg
    if field == "n_key_value_heads":  # TransformerLens writes None for "same as n_heads"
        return cfg.n_key_value_heads or cfg.n_heads
    if field == "normalization_type":  # "LNPre" is "LN" with fold_ln: compared as processing
        return cfg.normalization_type.removesuffix("Pre") if cfg.normalization_type else None
    return getattr(cfg, field, None)


def processing_of(model: Model) -> dict[str, bool | None]:
    """How a model's weights were processed: recorded by tuco_lens, else inferred.

    Models loaded by :func:`tuco_lens.loading.load_model` carry a record of the flags that took
    effect. For other models ``fold_ln`` is read from ``cfg.normalization_type`` (``"LNPre"`` /
    ``"RMSPre"`` mean folded), centering from the weights themselves (rows of ``W_E`` / ``W_U``
    with zero mean), and ``fold_value_biases`` is ``None`` (unknown) unless the model has
    nonzero value biases. A flag that cannot change anything for this model (centering writes on
    an RMSNorm model, folding biases that are all zero) is reported as ``False``.

    Args:
        model: Any HookedTransformer (or subclass) or TransformerBridge (which runs the Hugging
            Face weights unprocessed unless ``enable_compatibility_mode`` processed them).

    Returns:
        A dict with the keys of :data:`PROCESSING_FLAGS`; values ``True``, ``False`` or ``None``.

    Example:
        >>> processing_of(HookedTransformer.from_pretrained("gpt2"))["fold_ln"]  # doctest: +SKIP
        True
        >>> processing_of(pair.ft)["fold_ln"]         # tuco_lens loads models unprocessed
        False
    """
    recorded = recorded_processing(model)
    if recorded is not None:
        return {flag: recorded.get(flag) for flag in PROCESSING_FLAGS}
    return backend_of(model).processing()


def _architecture_differences(pt: Model, ft: Model) -> list[str]:
    fields: list[str] = list(_ARCHITECTURE_FIELDS)
    if _cfg_value(pt, "positional_embedding_type") in _LEARNED_POSITIONS:
        fields.append("n_ctx")  # the learned position table has n_ctx rows
    messages = []
    for field in fields:
        a, b = _cfg_value(pt, field), _cfg_value(ft, field)
        if a != b:
            hint = _SAME_MODEL_HINT
            if field == "d_vocab":
                hint = (
                    "the fine-tune probably resized its embeddings (e.g. added chat tokens); TuCo "
                    "needs one shared vocabulary, so pair it with a base model of the same size "
                    "(e.g. resize the base model's embeddings before loading it)"
                )
            elif field == "n_ctx":
                hint = "load both with the same n_ctx"
            messages.append(
                f"cfg.{field} differs: pre-trained has {a!r}, fine-tuned has {b!r}; {hint}."
            )
    return messages


def _hf_config_differences(pt: Model, ft: Model) -> list[str]:
    messages = []
    for key, a, b in backend_of(pt).config_differences(backend_of(ft)):
        if key == "compatibility_mode":
            messages.append(
                "TransformerBridge compatibility mode differs: call enable_compatibility_mode() with "
                "the same arguments on both models, or on neither (tuco_lens's default)."
            )
        else:
            messages.append(
                f"Hugging Face config {key} differs: pre-trained has {a!r}, fine-tuned has {b!r}; "
                f"{_SAME_MODEL_HINT}."
            )
    return messages


def _vocabulary_difference(pt: Model, ft: Model) -> list[str]:
    if pt.tokenizer is None or ft.tokenizer is None or pt.tokenizer is ft.tokenizer:
        return []
    vocab_pt, vocab_ft = pt.tokenizer.get_vocab(), ft.tokenizer.get_vocab()
    if vocab_pt == vocab_ft:
        return []
    only_pt = sorted(set(vocab_pt) - set(vocab_ft))
    only_ft = sorted(set(vocab_ft) - set(vocab_pt))
    moved = sorted(t for t in set(vocab_pt) & set(vocab_ft) if vocab_pt[t] != vocab_ft[t])
    details = []
    for label, tokens in (
        ("only in the pre-trained tokenizer", only_pt),
        ("only in the fine-tuned tokenizer", only_ft),
        ("with different ids", moved),
    ):
        if tokens:
            shown = ", ".join(repr(t) for t in tokens[:5]) + (", ..." if len(tokens) > 5 else "")
            details.append(f"{len(tokens)} token(s) {label} ({shown})")
    return [
        f"tokenizer vocabulary differs: {'; '.join(details)}; the same token id must mean the "
        "same token in both models: load both with the same tokenizer (tokenizer=...) if their "
        "vocabularies really are the same, or pair models that share a vocabulary."
    ]


def _parameter_set(model: Model, attribute: str) -> set[Any]:
    return {getattr(p, attribute) for p in model.parameters()}


def _block_devices(model: Model) -> list[set[Any]]:
    return [{p.device for p in block.parameters()} for block in model.blocks]


def _map_difference(pt: Model, ft: Model) -> str | None:
    """The first parameter the two models' accelerate device maps place differently, as a message."""
    placed_pt, placed_ft = backend_of(pt).placement(), backend_of(ft).placement()
    if placed_pt == placed_ft:
        return None
    if placed_pt is None or placed_ft is None:
        which = "fine-tuned" if placed_pt is None else "pre-trained"
        detail = f"only the {which} model was loaded with a device_map"
    else:
        name = next(n for n in placed_pt if placed_pt[n] != placed_ft.get(n))
        detail = f"the pre-trained model puts {name!r} on {placed_pt[name]}, the fine-tuned on {placed_ft.get(name)}"
    return (
        f"device map differs: {detail}; load both with the same map: tuco_lens.load_pair(pt, ft, "
        "device_map=...) gives the fine-tuned model the map the pre-trained one got."
    )


def _placement_differences(
    pt: Model, ft: Model, offload_pt: bool = False
) -> list[str]:
    messages = []
    devices_pt, devices_ft = _parameter_set(pt, "device"), _parameter_set(ft, "device")
    if offload_pt:
        pass  # the pre-trained blocks are moved next to their twins one at a time
    elif devices_pt != devices_ft:
        messages.append(
            f"device differs: pre-trained parameters are on {sorted(map(str, devices_pt))}, "
            f"fine-tuned ones on {sorted(map(str, devices_ft))}; move both to one device "
            "(load_pair(..., device='cuda') or model.to('cuda')), or keep the pre-trained model "
            "on the CPU with TuCoPair(pt, ft, offload_pt=True)."
        )
    elif _map_difference(pt, ft):
        messages.append(_map_difference(pt, ft))
    else:
        split = [
            (layer, a, b)
            for layer, (a, b) in enumerate(zip(_block_devices(pt), _block_devices(ft)))
            if a != b
        ]
        if split:
            layer, a, b = split[0]
            messages.append(
                f"device placement differs: pre-trained block {layer} is on {sorted(map(str, a))}, "
                f"its fine-tuned twin on {sorted(map(str, b))} ({len(split)} block(s) differ); "
                "split both models the same way (the same n_devices for both)."
            )
    dtypes_pt, dtypes_ft = _parameter_set(pt, "dtype"), _parameter_set(ft, "dtype")
    if dtypes_pt != dtypes_ft:
        messages.append(
            f"dtype differs: pre-trained parameters are {sorted(map(str, dtypes_pt))}, "
            f"fine-tuned ones {sorted(map(str, dtypes_ft))}; load both with the same dtype "
            "(load_pair(..., dtype='float32') or model.to(torch.float32))."
        )
    return messages


def _processing_differences(pt: Model, ft: Model) -> list[str]:
    proc_pt, proc_ft = processing_of(pt), processing_of(ft)
    messages = []
    for flag in PROCESSING_FLAGS:
        a, b = proc_pt[flag], proc_ft[flag]
        if a is not None and b is not None and a != b:
            messages.append(
                f"weight processing differs: {flag} is {a} for the pre-trained model and {b} for "
                "the fine-tuned model; load both the same way, e.g. tuco_lens.load_pair(pt, ft) "
                "(no processing, residual stream = Hugging Face hidden states) or "
                "HookedTransformer.from_pretrained_no_processing for both."
            )
    return messages


def describe_differences(
    pt: Model, ft: Model, *, offload_pt: bool = False
) -> list[str]:
    """Every reason why ``pt`` and ``ft`` cannot form a TuCo pair.

    Compares the architecture (layers, widths, heads, vocabulary size, positional embedding,
    normalization, activation, parallel attention/MLP...), the tokenizer vocabularies (when both
    models have a tokenizer), the devices and dtypes of the parameters and the weight
    processing (see :func:`processing_of`; flags unknown for either model are not compared).

    Args:
        pt: The pre-trained model.
        ft: The fine-tuned model.

    Returns:
        Human-readable messages, each naming both values and a fix; empty if compatible.

    Example:
        >>> describe_differences(pt_model, ft_model)
        []
        >>> describe_differences(pt_model, tuco_lens.load_model(demo.FT_DIR, dtype="bfloat16"))
        ["dtype differs: pre-trained parameters are ['torch.float32'], fine-tuned ones ['torch.bfloat16']; load both with the same dtype (load_pair(..., dtype='float32') or model.to(torch.float32))."]
    """
    kinds = backend_of(pt).name, backend_of(ft).name
    if kinds[0] != kinds[1]:
        return [
            f"model class differs: pre-trained is a {kinds[0]}, fine-tuned a {kinds[1]}; "
            "load both the same way (tuco_lens.load_pair(pt, ft) or the same TransformerLens "
            "class for both)."
        ]
    return (
        _architecture_differences(pt, ft)
        + _hf_config_differences(pt, ft)
        + _vocabulary_difference(pt, ft)
        + _placement_differences(pt, ft, offload_pt)
        + _processing_differences(pt, ft)
    )


def check_compatible(pt: Model, ft: Model, *, offload_pt: bool = False) -> None:
    """Raise if ``pt`` and ``ft`` cannot form a TuCo pair.

    Identical models (even the same object) are compatible; their TuCo is 0. If only one model
    has a tokenizer the vocabularies cannot be compared: a ``UserWarning`` says so.

    Args:
        pt: The pre-trained model.
        ft: The fine-tuned model.
        offload_pt: The pre-trained model stays off the accelerator and its blocks are moved
            next to their fine-tuned twins one at a time, so its device is not compared.

    Raises:
        IncompatiblePairError: Listing every difference found by :func:`describe_differences`.
        InputTypeError: If either argument is not a HookedTransformer or TransformerBridge.

    Example:
        >>> check_compatible(pt_model, ft_model)  # returns None when the pair is fine
    """
    for model in (pt, ft):
        if not is_model(model):
            raise InputTypeError(
                f"expected two HookedTransformer or two TransformerBridge models, got "
                f"{type(model).__name__}; load checkpoints with tuco_lens.load_model"
            )
    differences = describe_differences(pt, ft, offload_pt=offload_pt)
    if differences:
        listing = "\n".join(f"  - {message}" for message in differences)
        raise IncompatiblePairError(
            f"the pre-trained and fine-tuned models cannot form a TuCo pair "
            f"({len(differences)} difference(s)):\n{listing}"
        )
    if (pt.tokenizer is None) != (ft.tokenizer is None):
        missing = "pre-trained" if pt.tokenizer is None else "fine-tuned"
        warnings.warn(
            f"the {missing} model has no tokenizer, so the vocabularies were not compared; "
            "make sure both models use the same token ids",
            UserWarning,
            stacklevel=2,
        )
