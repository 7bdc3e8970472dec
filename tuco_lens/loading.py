"""Load models as HookedTransformers, from whatever the user has.

:func:`load_model` accepts a ready ``HookedTransformer``, a ``transformers`` causal LM object, a
local checkpoint directory (any name, offline), a TransformerLens official model name or any
other Hugging Face hub id. By default **no weight processing** is applied, so the residual
stream equals Hugging Face's hidden states, which is what TuCo measures. :func:`load_pair` loads
a pre-trained / fine-tuned pair the same way and wraps it in a :class:`~tuco_lens.pair.TuCoPair`.

Example:
    >>> from tuco_lens.loading import load_model, load_pair
    >>> model = load_model("./checkpoints/my-sft-run", dtype="bfloat16")
    >>> pair = load_pair("meta-llama/Llama-2-7b-hf", "./llama-2-7b-chat-sft")
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tuco_lens.compatibility import PROCESSING_ATTR
from tuco_lens.errors import InputError, InputTypeError, ModelLoadError

if TYPE_CHECKING:
    from tuco_lens.pair import TuCoPair

__all__ = ["load_model", "load_pair", "resolve_dtype"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
# owner/name, as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# TransformerLens picks Llama/Gemma configs by these substrings of the *path*; keep them out.
_NAME_TRAPS = ("llama", "gemma")
# Keyword arguments honoured when tuco_lens converts a Hugging Face model itself.
_CONVERSION_KWARGS = ("default_prepend_bos", "default_padding_side", "n_ctx", "n_devices")
# Hugging Face loading options that also apply to the tokenizer of a hub id.
_TOKENIZER_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_UNSUPPORTED_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Turn ``"bfloat16"``, ``"fp16"``, ``"torch.float32"``... into a ``torch.dtype``.

    Args:
        dtype: A ``torch.dtype``, a string naming a floating-point dtype, or ``None``.

    Returns:
        The ``torch.dtype`` (``None`` stays ``None``).

    Raises:
        InputTypeError: If ``dtype`` is neither a string nor a ``torch.dtype``.
        InputError: If the string names no floating-point dtype.

    Example:
        >>> resolve_dtype("bf16")
        torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise InputTypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")
    key = dtype.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def _check_device(device: Any) -> None:
    if device is not None and not isinstance(device, (str, torch.device)):
        raise InputTypeError(
            f"device must be a string or torch.device, got {type(device).__name__}"
        )


def _route(source: Any) -> str:
    """Which loader handles ``source``: 'hooked', 'hf_model', 'local', 'official' or 'hub'."""
    if isinstance(source, HookedTransformer):
        return "hooked"
    if isinstance(source, transformers.PreTrainedModel):
        return "hf_model"
    if not isinstance(source, (str, os.PathLike)):
        raise InputTypeError(
            f"cannot load a model from {type(source).__name__}; expected a HookedTransformer, a "
            "transformers PreTrainedModel, a local checkpoint directory, a TransformerLens model "
            "name or a Hugging Face hub id"
        )
    path = Path(source).expanduser()
    with contextlib.suppress(OSError, ValueError):  # e.g. names too long for the file system
        if path.exists():
            return "local"
    text = os.fspath(source)
    if isinstance(source, str):
        with contextlib.suppress(ValueError):
            tl_loading.get_official_model_name(text)
            return "official"
        if _HUB_ID.fullmatch(text) and ".." not in text and "--" not in text:
            return "hub"
    raise ModelLoadError(
        f"no model at {text!r}: the path {str(path.resolve())!r} does not exist, and it is neither "
        "a TransformerLens official model name nor a Hugging Face hub id ('owner/name'). Expected "
        "a checkpoint directory containing config.json and the weights (as written by "
        "save_pretrained), a HookedTransformer or a transformers model object."
    )


@contextlib.contextmanager
def _neutral_tempdir() -> Iterator[Path]:
    """A temporary directory whose path contains no name TransformerLens branches on."""
    for parent in (tempfile.gettempdir(), "/tmp", os.getcwd()):
        if any(trap in parent.lower() for trap in _NAME_TRAPS) or not os.path.isdir(parent):
            continue
        for _ in range(5):
            path = tempfile.mkdtemp(prefix="tuco_cfg_", dir=parent)
            if not any(trap in path.lower() for trap in _NAME_TRAPS):
                try:
                    yield Path(path)
                finally:
                    shutil.rmtree(path, ignore_errors=True)
                return
            os.rmdir(path)
    raise ModelLoadError(
        "could not create a temporary directory whose path avoids 'llama' and 'gemma' (needed to "
        "convert the config); set TMPDIR to another directory"
    )


def _gemma_config(hf_config: transformers.PretrainedConfig) -> dict[str, Any]:
    """TransformerLens config of a Gemma (v1) model, mirroring TL's official Gemma configs."""
    activation = hf_config.hidden_act
    if activation == "gelu":  # legacy Gemma spelling; Hugging Face runs the tanh approximation
        activation = "gelu_pytorch_tanh"
    if getattr(hf_config, "attention_bias", False):
        raise ModelLoadError("Gemma checkpoints with attention biases are not supported")
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    return {
        "d_model": hf_config.hidden_size,
        "d_head": head_dim,
        "n_heads": hf_config.num_attention_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.rms_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": activation,
        "initializer_range": hf_config.initializer_range,
        "normalization_type": "RMS",
        "rotary_base": tl_loading._get_rope_theta(hf_config),
        "rotary_dim": head_dim,
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "n_key_value_heads": hf_config.num_key_value_heads,
        "gated_mlp": True,
        "final_rms": True,
        "original_architecture": "GemmaForCausalLM",
    }


def _applicable(cfg: HookedTransformerConfig, requested: dict[str, bool]) -> dict[str, bool]:
    """The processing flags that take effect for ``cfg`` (TransformerLens drops some silently)."""
    flags = dict(requested)
    no_norm = cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre")
    post_norm = cfg.original_architecture in tl_loading.POST_NORM_ARCHITECTURES
    if cfg.positional_embedding_type == "shortformer":
        flags.update(fold_ln=False, center_writing_weights=False, center_unembed=False)
    if no_norm or post_norm:
        flags["fold_ln"] = False
    if post_norm or cfg.normalization_type not in ("LN", "LNPre") or cfg.final_rms:
        flags["center_writing_weights"] = False  # TL only centres LayerNorm models
    if getattr(cfg, "output_logits_soft_cap", -1.0) > 0:
        flags["center_unembed"] = False
    return flags


def _resolve_tokenizer(
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None,
    fallback: str | os.PathLike | None,
    **kwargs: Any,
) -> PreTrainedTokenizerBase | None:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        raise InputTypeError(
            f"tokenizer must be a transformers tokenizer or a path, got {type(tokenizer).__name__}"
        )
    source = tokenizer if tokenizer is not None else fallback
    if source is None:
        return None
    local = Path(source).expanduser()
    has_files = any((local / name).exists() for name in _TOKENIZER_FILES)
    if tokenizer is None and local.is_dir() and not has_files:
        return None  # a checkpoint directory saved without tokenizer files
    try:
        return AutoTokenizer.from_pretrained(os.fspath(source), **kwargs)
    except Exception as error:
        message = f"could not load a tokenizer from {os.fspath(source)!r}: {error}"
        raise ModelLoadError(message) from error


def _attach_tokenizer(
    model: HookedTransformer, tokenizer: PreTrainedTokenizerBase, padding_side: str | None
) -> None:
    """``model.set_tokenizer``, also for tokenizers that exist only in memory.

    TransformerLens reloads a tokenizer by its ``name_or_path`` to get a BOS-adding copy, which
    fails for a tokenizer built in memory: such a tokenizer is saved to a temporary directory and
    reloaded from there.
    """
    try:
        model.set_tokenizer(tokenizer, default_padding_side=padding_side)
    except (KeyError, OSError, ValueError):
        with _neutral_tempdir() as directory:
            tokenizer.save_pretrained(directory)
            reloaded = AutoTokenizer.from_pretrained(directory)
            model.set_tokenizer(reloaded, default_padding_side=padding_side)
    model.cfg.tokenizer_name = None  # never reload it by name (it may be a temporary path)


def _convert(
    hf_model: transformers.PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    name: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    processing: dict[str, bool],
    default_prepend_bos: bool | None = None,
    default_padding_side: str | None = None,
    n_ctx: int | None = None,
    n_devices: int | None = None,
) -> HookedTransformer:
    """Build a HookedTransformer from a Hugging Face causal LM, using the model's own config."""
    hf_config = hf_model.config
    architecture = type(hf_model).__name__
    if hf_config.model_type in _UNSUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{architecture} ({hf_config.model_type}) cannot be converted from a local checkpoint "
            "or model object yet; load it by its TransformerLens official name instead"
        )
    if hf_model.get_output_embeddings() is None:
        raise ModelLoadError(f"{architecture} has no language-model head; expected a causal LM")
    with _neutral_tempdir() as config_dir:
        config_dict = hf_config.to_dict()
        config_dict["architectures"] = [architecture]
        if hf_config.model_type == "gpt2":  # transformers 5's GPT2Config has no n_ctx
            config_dict.setdefault("n_ctx", config_dict["n_positions"])
        (config_dir / "config.json").write_text(json.dumps(config_dict, default=str))
        try:
            if hf_config.model_type == "gemma":
                cfg_dict = _gemma_config(hf_config)
            else:
                cfg_dict = tl_loading.convert_hf_model_config(str(config_dir))
        except (NotImplementedError, ValueError) as error:
            message = f"TransformerLens cannot convert {architecture}: {error}"
            raise ModelLoadError(message) from error
        if cfg_dict["original_architecture"] == "Qwen2ForCausalLM":  # TL truncates it to int
            theta = tl_loading._get_rope_theta(hf_config, cfg_dict["rotary_base"])
            cfg_dict["rotary_base"] = theta
        if default_prepend_bos is not None:
            cfg_dict["default_prepend_bos"] = default_prepend_bos
        if n_ctx is not None:
            cfg_dict["n_ctx"] = n_ctx
        if n_devices is not None:
            cfg_dict["n_devices"] = n_devices  # blocks split evenly over cuda:0..n-1
        cfg_dict.update(
            model_name=name,
            tokenizer_name=None,
            init_weights=False,
            device=device,
            dtype=dtype,
            d_vocab=hf_config.vocab_size,
        )
        cfg_dict.setdefault("default_prepend_bos", True)
        cfg = HookedTransformerConfig.from_dict(cfg_dict)
        try:
            state_dict = tl_loading.get_pretrained_state_dict(
                str(config_dir), cfg, hf_model, dtype=dtype
            )
        except (NotImplementedError, ValueError) as error:
            message = f"TransformerLens cannot convert {architecture}: {error}"
            raise ModelLoadError(message) from error
    model = HookedTransformer(cfg, move_to_device=False)
    processing = _applicable(cfg, processing)
    model.load_and_process_state_dict(
        state_dict, refactor_factored_attn_matrices=False, **processing
    )
    del state_dict
    if tokenizer is not None:
        _attach_tokenizer(model, tokenizer, default_padding_side)
    else:
        warnings.warn(
            f"no tokenizer found for {name!r}: the model takes token ids only; pass tokenizer=... "
            "(a tokenizer or a path) to load_model for text input",
            UserWarning,
            stacklevel=3,
        )
    model.move_model_modules_to_device()
    model.eval()
    setattr(model, PROCESSING_ATTR, processing)
    return model


def _load_hf_model(source: str, dtype: torch.dtype, kwargs: dict[str, Any], what: str) -> Any:
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except Exception as error:
        raise ModelLoadError(f"could not load {what}: {error}") from error


def load_model(
    source: Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    hf_model_kwargs: dict[str, Any] | None = None,
    **from_pretrained_kwargs: Any,
) -> HookedTransformer:
    """Load ``source`` as a HookedTransformer, without weight processing by default.

    ``source`` may be:

    * a ``HookedTransformer`` (or subclass, e.g. SAE-Lens' ``HookedSAETransformer``): returned
      as is, the same object. It is moved **in place** only if ``device`` / ``dtype`` are given;
      the processing flags and ``tokenizer`` are ignored.
    * a ``transformers`` causal LM object: converted with its own config. The tokenizer comes
      from ``tokenizer`` or, failing that, from ``model.name_or_path`` if that directory holds
      one. ``device`` / ``dtype`` default to the object's. The object itself is left intact.
    * a local checkpoint directory (any name; offline): loaded with
      ``AutoModelForCausalLM`` / ``AutoTokenizer`` and converted.
    * a TransformerLens official model name (``"gpt2"``, ``"meta-llama/Llama-2-7b-hf"``):
      ``HookedTransformer.from_pretrained_no_processing`` with the flags below.
    * any other Hugging Face hub id (``"lmsys/vicuna-7b-v1.5"``): downloaded with
      ``AutoModelForCausalLM`` and converted with the fine-tune's own config.

    Models loaded here carry ``model.tuco_processing``, the processing flags that took effect,
    so :func:`tuco_lens.compatibility.check_compatible` can compare them. Supported
    architectures for directories and objects: those TransformerLens converts from a config
    (GPT-2, Llama 2/3, Mistral, Qwen2, GPT-NeoX/Pythia, ...) plus Gemma (v1).

    Args:
        source: What to load (see above).
        device: Where to put the model; default TransformerLens' choice (CUDA if available),
            or the object's own device for a ``transformers`` model.
        dtype: ``torch.dtype`` or a string like ``"bfloat16"``; default ``float32``, or the
            object's own dtype for a ``transformers`` model.
        tokenizer: A tokenizer object, or a path / hub id to load one from.
        fold_ln: Fold norm weights into the next matrices (residual stream unchanged).
        center_writing_weights: Centre weights writing to the stream (LayerNorm models only;
            changes the residual stream, hence TuCo).
        center_unembed: Centre ``W_U`` (shifts logits, not log-probs).
        fold_value_biases: Fold value biases into the attention output bias.
        hf_model_kwargs: Extra keyword arguments for ``AutoModelForCausalLM.from_pretrained``
            (e.g. ``revision``, ``trust_remote_code``); for official names they are passed on
            through ``HookedTransformer.from_pretrained``.
        **from_pretrained_kwargs: For official names, passed to
            ``HookedTransformer.from_pretrained_no_processing``; otherwise only
            ``default_prepend_bos``, ``default_padding_side``, ``n_ctx`` and ``n_devices``
            (TransformerLens's even split of the blocks over ``n_devices`` GPUs; load both
            models of a pair with the same value) are accepted.

    Returns:
        A HookedTransformer in eval mode.

    Raises:
        ModelLoadError: A missing path, an unsupported architecture, a failed download...
        InputTypeError: ``source``, ``device``, ``dtype`` or ``tokenizer`` of the wrong type, or
            an unsupported keyword argument.

    Example:
        >>> model = load_model("./my-llama-2-sft", dtype="bfloat16")
        >>> model.tuco_processing["fold_ln"]
        False
    """
    route = _route(source)
    _check_device(device)
    dtype = resolve_dtype(dtype)
    hf_model_kwargs = dict(hf_model_kwargs or {})
    processing = {
        "fold_ln": fold_ln,
        "center_writing_weights": center_writing_weights,
        "center_unembed": center_unembed,
        "fold_value_biases": fold_value_biases,
    }

    if route == "hooked":
        if device is not None:
            source.to(device, print_details=False)
        if dtype is not None:
            source.to(dtype, print_details=False)
        return source

    if route == "official":
        try:
            model = HookedTransformer.from_pretrained_no_processing(
                source,
                device=device,
                dtype=dtype or torch.float32,
                tokenizer=_resolve_tokenizer(tokenizer, None),
                **processing,
                **hf_model_kwargs,
                **from_pretrained_kwargs,
            )
        except OSError as error:  # download failures, missing files, no network
            raise ModelLoadError(
                f"could not load the TransformerLens model {source!r}: {error}"
            ) from error
        setattr(model, PROCESSING_ATTR, _applicable(model.cfg, processing))
        return model

    unknown = sorted(set(from_pretrained_kwargs) - set(_CONVERSION_KWARGS))
    if unknown:
        raise InputTypeError(
            f"unexpected keyword argument(s) {unknown} when converting a Hugging Face model; "
            f"accepted: {list(_CONVERSION_KWARGS)}. Pass Hugging Face loading options in "
            "hf_model_kwargs={...}."
        )
    if route == "hf_model":
        parameter = next(source.parameters())
        origin = str(getattr(source, "name_or_path", "") or "")
        return _convert(
            source,
            _resolve_tokenizer(tokenizer, origin if origin and Path(origin).is_dir() else None),
            name=Path(origin).name or type(source).__name__,
            device=device if device is not None else str(parameter.device),
            dtype=dtype or parameter.dtype,
            processing=processing,
            **from_pretrained_kwargs,
        )

    dtype = dtype or torch.float32
    if route == "local":
        path = Path(source).expanduser().resolve()
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{str(path)!r} holds a PEFT adapter, not a full checkpoint: merge it into its "
                "base model first (peft's merge_and_unload(), then save_pretrained) and load that"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{str(path)!r} is not a Hugging Face checkpoint directory: expected a directory "
                "containing config.json and the weights (*.safetensors or pytorch_model.bin), as "
                "written by model.save_pretrained(...)"
            )
        text, what, tokenizer_kwargs = str(path), f"the checkpoint directory {str(path)!r}", {}
    else:  # hub id
        text = os.fspath(source)
        what = (
            f"{text!r} from the Hugging Face hub (there is no local directory "
            f"{str(Path(text).resolve())!r})"
        )
        tokenizer_kwargs = {k: v for k, v in hf_model_kwargs.items() if k in _TOKENIZER_KWARGS}
    hf_model = _load_hf_model(text, dtype, hf_model_kwargs, what)
    try:
        return _convert(
            hf_model,
            _resolve_tokenizer(tokenizer, text, **tokenizer_kwargs),
            name=Path(text).name,
            device=device,
            dtype=dtype,
            processing=processing,
            **from_pretrained_kwargs,
        )
    finally:
        del hf_model
        gc.collect()


def load_pair(
    pt: Any,
    ft: Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    **kwargs: Any,
) -> TuCoPair:
    """Load a pre-trained / fine-tuned pair the same way and wrap it in a ``TuCoPair``.

    Both sources go through :func:`load_model` with the same ``device``, ``dtype``, tokenizer
    and flags; the pair is then checked by :func:`tuco_lens.compatibility.check_compatible`.

    Args:
        pt: The pre-trained model (anything :func:`load_model` accepts).
        ft: The fine-tuned model.
        device: Device for both models.
        dtype: Dtype for both models.
        tokenizer: One tokenizer for both models (default: each model's own).
        **kwargs: Further :func:`load_model` arguments, applied to both.

    Returns:
        A :class:`~tuco_lens.pair.TuCoPair`.

    Raises:
        IncompatiblePairError: If the models cannot form a pair.
        ModelLoadError: If either model cannot be loaded.
        InputTypeError: If either source (or an argument) has the wrong type.

    Example:
        >>> pair = load_pair("./llama-base", "./llama-2-chat-sft", dtype="bfloat16")
    """
    from tuco_lens.pair import TuCoPair

    for source in (pt, ft):  # fail on a bad source before loading anything
        _route(source)
    options = dict(device=device, dtype=dtype, tokenizer=tokenizer, **kwargs)
    pt_model = load_model(pt, **options)
    ft_model = load_model(ft, **options)
    return TuCoPair(pt_model, ft_model)
