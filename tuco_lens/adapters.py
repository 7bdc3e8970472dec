"""PEFT adapters (LoRA, DoRA, IA3, LoHa, LoKr...) as fine-tuned models.

TuCo compares the blocks of two models, so it needs the fine-tuned model's weights. A weight
adapter gives them: merged into its base, it defines the fine-tuned model ``W + ΔW``. This
module has one job: recognise an adapter (a directory written by peft's ``save_pretrained``, or
a live ``peft.PeftModel``) and turn it into a plain ``transformers`` model with the adapter
merged, **without touching** the base model or the ``PeftModel`` it was given (it merges into a
copy). Adapters that are not a weight change (prompt tuning, prefix tuning, P-tuning, CPT,
LLaMA-Adapter's adaption prompts...) are refused with a :class:`~tuco_lens.errors.ModelLoadError`.

``peft`` is an optional dependency (``pip install peft`` or ``pip install "tuco_lens[adapters]"``);
it is imported only when an adapter is actually loaded. Users normally call
:func:`tuco_lens.load_pair`, which resolves adapters (:class:`~tuco_lens.loading.AdapterDirectory`,
:class:`~tuco_lens.loading.PeftModelObject`) and merges them here.

Example:
    >>> import peft, tuco_lens
    >>> from transformers import AutoModelForCausalLM
    >>> base_hf_model = AutoModelForCausalLM.from_pretrained(demo.PT_DIR)
    >>> lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(demo.PT_DIR),
    ...                            peft.LoraConfig(target_modules=["q_proj"]))
    >>> lora.save_pretrained("my-lora-adapter")
    >>> pair = tuco_lens.load_pair(demo.PT_DIR, "./my-lora-adapter")  # base dir, adapter dir
    >>> from tuco_lens.adapters import merge_adapter_dir
    >>> merged = merge_adapter_dir(base_hf_model, "./my-lora-adapter")      # base_hf_model intact
    >>> type(merged).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from tuco_lens.errors import ModelLoadError

__all__ = [
    "NOT_A_WEIGHT_CHANGE",
    "adapter_info",
    "is_adapter_dir",
    "is_peft_model",
    "merge_adapter_dir",
    "merge_peft_model",
]

#: peft method types that add inputs (virtual tokens, prefixes, gated prompts) instead of changing
#: weights: they have nothing to merge, so there is no fine-tuned block to compare.
NOT_A_WEIGHT_CHANGE = frozenset(
    {
        "PROMPT_TUNING",
        "MULTITASK_PROMPT_TUNING",
        "P_TUNING",
        "PREFIX_TUNING",
        "CPT",
        "ADAPTION_PROMPT",
    }
)

_INSTALL_HINT = "pip install peft (or pip install 'tuco_lens[adapters]')"


def is_adapter_dir(source: Any) -> bool:
    """Whether ``source`` is a PEFT adapter directory.

    An adapter directory holds ``adapter_config.json`` and no ``config.json`` (a directory with
    both is a full checkpoint and is loaded as one).

    Args:
        source: Anything; only strings and path-likes can be adapter directories.

    Returns:
        ``True`` for an adapter directory.

    Example:
        >>> import peft
        >>> from transformers import AutoModelForCausalLM
        >>> base = AutoModelForCausalLM.from_pretrained(demo.PT_DIR)
        >>> lora = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"]))
        >>> lora.save_pretrained("my-lora-adapter")
        >>> is_adapter_dir("./my-lora-adapter"), is_adapter_dir(demo.PT_DIR)
        (True, False)
    """
    if not isinstance(source, (str, os.PathLike)):
        return False
    try:
        path = Path(source).expanduser()
        return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()
    except (OSError, ValueError):  # e.g. names too long for the file system
        return False


def is_peft_model(source: Any) -> bool:
    """Whether ``source`` is a ``peft.PeftModel`` (or ``PeftMixedModel``).

    Never imports peft: an object can only be a ``PeftModel`` if peft was imported already.

    Args:
        source: Any object.

    Returns:
        ``True`` for a peft model wrapper.

    Example:
        >>> import peft
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(demo.PT_DIR)
        >>> is_peft_model(model)
        False
        >>> is_peft_model(peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"])))
        True
    """
    peft = sys.modules.get("peft")
    if peft is None:
        return False
    classes = tuple(
        cls for cls in (getattr(peft, "PeftModel", None), getattr(peft, "PeftMixedModel", None))
        if isinstance(cls, type)
    )
    return bool(classes) and isinstance(source, classes)


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise ModelLoadError(
            f"loading a PEFT adapter needs the optional dependency peft: {_INSTALL_HINT}"
        ) from error
    return peft


def _refuse_if_not_weights(peft_type: str, where: str, *, prompt_like: bool = False) -> None:
    if prompt_like or peft_type.upper() in NOT_A_WEIGHT_CHANGE:
        raise ModelLoadError(
            f"{where} is a {peft_type} adapter, which TuCo cannot use: TuCo compares each block "
            "of the fine-tuned model with the same block of the pre-trained model, so it needs the "
            f"fine-tuned model's weights, but {peft_type} learns a soft prompt (virtual tokens, "
            "prefixes or gated prompts added to the input), not a weight change: every block stays "
            "the pre-trained block and there is nothing to merge. Use a weight adapter (LoRA, "
            "DoRA, IA3, LoHa, LoKr...) or a full fine-tune; to study a soft prompt, compare runs "
            "of the base model with and without it."
        )


def adapter_info(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check an adapter directory's ``adapter_config.json`` (peft is not needed).

    Args:
        path: An adapter directory (see :func:`is_adapter_dir`).

    Returns:
        ``{"peft_type": str, "base_model_name_or_path": str | None}`` as recorded by peft.

    Raises:
        ModelLoadError: If the file is not valid JSON, names no ``peft_type``, or the adapter is
            not a weight change (prompt / prefix tuning...).

    Example:
        >>> import peft
        >>> from transformers import AutoModelForCausalLM
        >>> base = AutoModelForCausalLM.from_pretrained(demo.PT_DIR)
        >>> lora = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"]))
        >>> lora.save_pretrained("my-lora-adapter")
        >>> info = adapter_info("./my-lora-adapter")
        >>> info["peft_type"], info["base_model_name_or_path"] == str(demo.PT_DIR)
        ('LORA', True)
    """
    config_file = Path(path).expanduser() / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        message = f"cannot read the PEFT adapter config {str(config_file)!r}: {error}"
        raise ModelLoadError(message) from error
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if not isinstance(peft_type, str) or not peft_type:
        raise ModelLoadError(
            f"{str(config_file)!r} is not a PEFT adapter config: it names no 'peft_type' (expected "
            "the adapter_config.json written by a PeftModel's save_pretrained)"
        )
    _refuse_if_not_weights(peft_type, f"the adapter at {str(config_file.parent)!r}")
    base = config.get("base_model_name_or_path")
    return {"peft_type": peft_type, "base_model_name_or_path": base or None}


def _check_configs(peft_model: Any, what: str) -> None:
    """Refuse a peft model any of whose adapters is not a weight change."""
    for config in dict(getattr(peft_model, "peft_config", None) or {}).values():
        peft_type = str(getattr(config.peft_type, "value", config.peft_type))
        prompt_like = bool(  # also catches prompt-style types newer than NOT_A_WEIGHT_CHANGE
            getattr(config, "is_prompt_learning", False)
            or getattr(config, "is_adaption_prompt", False)
        )
        _refuse_if_not_weights(peft_type, what, prompt_like=prompt_like)


def _merge(peft_model: Any, what: str) -> transformers.PreTrainedModel:
    """``merge_and_unload`` with tuco_lens errors; checks that a plain model came out."""
    _import_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    _check_configs(peft_model, what)
    try:
        merged = peft_model.merge_and_unload()
    except (NotImplementedError, ValueError, AttributeError, TypeError) as error:
        raise ModelLoadError(
            f"peft cannot merge {what} into its base model ({error}); TuCo needs the fine-tuned "
            "model's weights, so only adapters that peft can merge are supported"
        ) from error
    leftover = [
        name for name, module in merged.named_modules() if isinstance(module, BaseTunerLayer)
    ]
    if leftover or not isinstance(merged, transformers.PreTrainedModel):
        raise ModelLoadError(
            f"merging {what} did not give a plain transformers model (unmerged adapter modules: "
            f"{leftover[:3]}); TuCo needs the fine-tuned model's weights"
        )
    merged.eval()
    return merged


def merge_adapter_dir(
    base: transformers.PreTrainedModel,
    path: str | os.PathLike,
    *,
    copy_base: bool = True,
) -> transformers.PreTrainedModel:
    """Merge the adapter saved in ``path`` into (a copy of) ``base``.

    Args:
        base: The base causal LM the adapter applies to.
        path: The adapter directory (``adapter_config.json`` and the adapter weights).
        copy_base: Merge into a deep copy of ``base`` (default), leaving ``base`` untouched. Pass
            ``False`` only for a base you own and will not use again (it is modified in place).

    Returns:
        A ``transformers`` model in eval mode whose weights are the base's with the adapter merged.

    Raises:
        ModelLoadError: peft missing, a bad or non-weight adapter, weights that do not fit
            ``base``, or an adapter type peft cannot merge.

    Example:
        >>> import peft
        >>> from transformers import AutoModelForCausalLM
        >>> base = AutoModelForCausalLM.from_pretrained(demo.PT_DIR)
        >>> lora = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"]))
        >>> lora.save_pretrained("llama-lora")
        >>> base = AutoModelForCausalLM.from_pretrained(demo.PT_DIR)
        >>> merged = merge_adapter_dir(base, "./llama-lora")   # base is unchanged
        >>> type(merged).__name__
        'LlamaForCausalLM'
    """
    where = f"the adapter at {os.fspath(path)!r}"
    adapter_info(path)
    peft = _import_peft()
    model = copy.deepcopy(base) if copy_base else base
    try:
        with torch.no_grad():
            wrapped = peft.PeftModel.from_pretrained(model, os.fspath(path), is_trainable=False)
    except Exception as error:  # peft raises many kinds: missing weights, shape mismatches...
        raise ModelLoadError(
            f"could not apply {where} to the base model {type(base).__name__} "
            f"({getattr(base, 'name_or_path', '') or 'in memory'}): {error}"
        ) from error
    with torch.no_grad():
        return _merge(wrapped, where)


def merge_peft_model(model: Any) -> transformers.PreTrainedModel:
    """A merged copy of a ``peft.PeftModel``: its active adapter(s) merged into its base weights.

    The ``PeftModel`` is deep-copied first, so the caller's model (its base weights, adapters and
    merge state) is left exactly as it was.

    Args:
        model: A ``peft.PeftModel`` wrapping a ``transformers`` causal LM.

    Returns:
        A ``transformers`` model in eval mode with the adapter merged.

    Raises:
        ModelLoadError: A non-weight adapter (prompt tuning...) or one peft cannot merge.

    Example:
        >>> import peft
        >>> from transformers import AutoModelForCausalLM
        >>> base = AutoModelForCausalLM.from_pretrained(demo.PT_DIR)
        >>> lora = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"]))
        >>> lora.save_pretrained("llama-lora")
        >>> peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo.PT_DIR), "./llama-lora")
        >>> merged = merge_peft_model(peft_model)    # peft_model is unchanged
        >>> type(merged).__name__, is_peft_model(peft_model)
        ('LlamaForCausalLM', True)
    """
    if not is_peft_model(model):
        raise ModelLoadError(f"expected a peft.PeftModel, got {type(model).__name__}")
    what = f"the {type(model).__name__}"
    _check_configs(model, what)  # before paying for the copy
    with torch.no_grad():
        return _merge(copy.deepcopy(model), what)
