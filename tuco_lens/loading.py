"""Load models as HookedTransformers, from whatever the user has.

:func:`load_model` accepts a ready ``HookedTransformer``, a ``transformers`` causal LM object, a
local checkpoint directory (any name, offline), a TransformerLens official model name or any
other Hugging Face hub id. By default **no weight processing** is applied, so the residual
stream equals Hugging Face's hidden states, which is what TuCo measures. :func:`load_pair` loads
a pre-trained / fine-tuned pair the same way and wraps it in a :class:`~tuco_lens.pair.TuCoPair`.

Loading is a pipeline: **resolve** (:func:`resolve_source` says which kind of :data:`Source`
a source is, one small class per kind, each saying how it is loaded), **materialise** (a
``transformers`` model: the object, a merged adapter, or loaded from a directory or the hub)
and **convert** (to a HookedTransformer or TransformerBridge). Ready models and official names
(on the HookedTransformer backend) skip the last two steps. The TransformerLens workarounds
needed on the way are small named functions, each saying which upstream behaviour it works around.

Example:
    >>> from tuco_lens.loading import load_model, load_pair
    >>> model = load_model(demo.FT_DIR)        # a checkpoint directory (or a hub name)
    >>> pair = load_pair("meta-llama/Llama-2-7b-hf", "./llama-2-7b-chat-sft")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tuco_lens import adapters
from tuco_lens.backends import (
    HAS_HOOKED_TRANSFORMER,
    HookedTransformer,
    HookedTransformerConfig,
    Model,
    TransformerBridge,
    backend_of,
    bridge_from_hf,
    is_model,
    record_processing,
    tl_loading,
)
from tuco_lens.errors import InputError, InputTypeError, ModelLoadError
from tuco_lens.validation import check_device

if TYPE_CHECKING:
    from tuco_lens.pair import TuCoPair

__all__ = [
    "AdapterDirectory",
    "CheckpointDirectory",
    "HubId",
    "OfficialName",
    "PeftModelObject",
    "ReadyModel",
    "Source",
    "TransformersModel",
    "load_model",
    "load_pair",
    "resolve_dtype",
    "resolve_source",
    "tokenizer_adds_bos",
]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
# owner/name, as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w-]{0,95}")  # a hub id without owner ("gpt2")
#: The model classes :func:`load_model` can build.
BACKENDS = ("auto", "hooked", "bridge")
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


@dataclass(frozen=True)
class ReadyModel:
    """A ``HookedTransformer`` (or subclass, e.g. SAE-Lens' ``HookedSAETransformer``) or a
    ``TransformerBridge``.

    Loaded as itself: :func:`load_model` returns the same object, moved **in place** only if
    ``device`` / ``dtype`` are given; the processing flags and ``tokenizer`` are ignored.
    """

    model: Model


@dataclass(frozen=True)
class TransformersModel:
    """A ``transformers`` causal LM object (a ``PreTrainedModel``).

    Converted with its own config. The tokenizer comes from ``tokenizer`` or, failing that,
    from ``model.name_or_path`` if that directory holds one. ``device`` / ``dtype`` default to
    the object's. The object itself is left intact.
    """

    model: transformers.PreTrainedModel


@dataclass(frozen=True)
class PeftModelObject:
    """A live ``peft.PeftModel`` (or ``PeftMixedModel``).

    Its adapter is merged into a deep copy of the model it wraps (the ``PeftModel`` is not
    modified), which is converted as a :class:`TransformersModel`. Needs ``pip install peft``.
    """

    model: Any


@dataclass(frozen=True)
class AdapterDirectory:
    """A PEFT adapter directory (``adapter_config.json``, no ``config.json``).

    The adapter (LoRA, DoRA, IA3, LoHa, LoKr... anything peft can merge) is merged into a copy
    of its base (``adapter_base``, else the adapter's recorded ``base_model_name_or_path``) and
    converted; the base is not modified. Needs ``pip install peft``; prompt / prefix tuning
    adapters are refused (they change no weight). See ``docs/lora.md``.
    """

    path: Path


@dataclass(frozen=True)
class CheckpointDirectory:
    """An existing local path, a checkpoint directory (any name; offline).

    Loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and converted with its own
    ``config.json`` (a path without one is refused when it is loaded).
    """

    path: Path


@dataclass(frozen=True)
class OfficialName:
    """A TransformerLens official model name or alias (``"gpt2"``, ``"meta-llama/Llama-2-7b-hf"``).

    Loaded with ``HookedTransformer.from_pretrained_no_processing`` and the processing flags;
    with ``backend="bridge"``, as the :class:`HubId` the name stands for.
    """

    name: str

    def hub_id(self) -> HubId:
        """The Hugging Face hub id TransformerLens maps this name to."""
        return HubId(tl_loading.get_official_model_name(self.name))


@dataclass(frozen=True)
class HubId:
    """Any other Hugging Face hub id (``"lmsys/vicuna-7b-v1.5"``), with no local path of that name.

    Downloaded with ``AutoModelForCausalLM`` and converted with the fine-tune's own config; the
    tokenizer comes from the same id, with ``hf_model_kwargs``' hub options.
    """

    repo_id: str


#: What :func:`resolve_source` turns a ``load_model`` source into: one class per kind of source.
Source = ReadyModel | TransformersModel | PeftModelObject | AdapterDirectory | CheckpointDirectory | OfficialName | HubId


def resolve_source(source: Any) -> Source:
    """Which kind of source ``source`` is, as the :data:`Source` class that says how it is loaded.

    Nothing is loaded or downloaded: objects are recognised by type, strings and paths by what
    exists on disk, then by TransformerLens's official names, then by the hub's ``owner/name``.

    Args:
        source: Anything :func:`load_model` accepts.

    Returns:
        A :class:`ReadyModel`, :class:`TransformersModel`, :class:`PeftModelObject`,
        :class:`AdapterDirectory`, :class:`CheckpointDirectory`, :class:`OfficialName` or
        :class:`HubId`.

    Raises:
        InputTypeError: If ``source`` is none of the accepted types.
        ModelLoadError: If a string or path is no existing path, official name or hub id.

    Example:
        >>> resolve_source(demo.FT_DIR) == CheckpointDirectory(Path(demo.FT_DIR))
        True
        >>> resolve_source("lmsys/vicuna-7b-v1.5")
        HubId(repo_id='lmsys/vicuna-7b-v1.5')
    """
    if is_model(source):
        return ReadyModel(source)
    if isinstance(source, transformers.PreTrainedModel):
        return TransformersModel(source)
    if adapters.is_peft_model(source):
        return PeftModelObject(source)
    if not isinstance(source, (str, os.PathLike)):
        raise InputTypeError(
            f"cannot load a model from {type(source).__name__}; expected a HookedTransformer, a "
            "transformers PreTrainedModel, a peft PeftModel, a local checkpoint or PEFT adapter "
            "directory, a TransformerLens model name or a Hugging Face hub id"
        )
    path = Path(source).expanduser()
    if adapters.is_adapter_dir(source):
        return AdapterDirectory(path)
    with contextlib.suppress(OSError, ValueError):  # e.g. names too long for the file system
        if path.exists():
            return CheckpointDirectory(path)
    return _resolve_name(os.fspath(source), isinstance(source, str), path)


def _resolve_name(text: str, is_str: bool, path: Path) -> OfficialName | HubId:
    """An official name or hub id: what a string that is no existing path may be."""
    if is_str:
        if tl_loading is not None:
            with contextlib.suppress(ValueError):
                tl_loading.get_official_model_name(text)
                return OfficialName(text)
        elif _HUB_NAME.fullmatch(text):  # without TransformerLens names, "gpt2" is a hub id
            return HubId(text)
        if _HUB_ID.fullmatch(text) and ".." not in text and "--" not in text:
            return HubId(text)
    raise ModelLoadError(
        f"no model at {text!r}: the path {str(path.resolve())!r} does not exist, and it is neither "
        "a TransformerLens official model name nor a Hugging Face hub id ('owner/name'). Expected "
        "a checkpoint directory containing config.json and the weights (as written by "
        "save_pretrained), a HookedTransformer or a transformers model object."
    )


@contextlib.contextmanager
def _neutral_tempdir() -> Iterator[Path]:
    """Workaround: TransformerLens picks Llama/Gemma configs by substrings of the path; a temp dir free of them."""
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
    """Workaround: TransformerLens builds Gemma (v1) configs from official names only; this mirrors them."""
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
    """Workaround: TransformerLens silently skips some processing flags; those that take effect for ``cfg``."""
    flags = dict(requested)
    no_norm = cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre")
    post_norm = cfg.original_architecture in tl_loading.POST_NORM_ARCHITECTURES  # pyright: ignore[reportPrivateImportUsage]  # defined there, not re-exported
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


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer(text)`` puts the BOS token in front of the text by itself.

    This is the BOS rule of the models tuco_lens loads: plain strings get a BOS exactly when
    the model's own tokenizer adds one (Llama 2/3, Mistral, Gemma: yes; GPT-2, GPT-NeoX, Qwen2,
    ChatML models such as SmolLM, whose BOS ``<|im_start|>`` opens a chat turn: no). It sets
    ``cfg.default_prepend_bos``, which ``TuCoPair`` and ``model.to_tokens`` follow. Call it on
    the original Hugging Face tokenizer: a TransformerLens model's ``model.tokenizer`` is a copy
    loaded with ``add_bos_token=True``.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tokenizer_adds_bos(AutoTokenizer.from_pretrained(demo.FT_DIR))   # the demo's adds none
        False
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return with_special[:1] == [bos] and plain[:1] != [bos]


def _follow_tokenizer_bos(model: HookedTransformer, tokenizer: Any, kwargs: dict[str, Any]) -> None:
    """Workaround: TransformerLens's official models get a BOS-adding tokenizer copy's BOS rule; use the original's.

    The original is reloaded from the same place (the local cache that loading just filled;
    nothing is downloaded).
    """
    if tokenizer is None:
        source = getattr(model.tokenizer, "name_or_path", None) if model.tokenizer is not None else None
        if not source:
            return
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **kwargs)
        except Exception as error:  # an unusual cache layout: keep TransformerLens's rule, say so
            warnings.warn(
                f"could not reload the original tokenizer {source!r} ({error}), so plain strings "
                f"follow TransformerLens's default_prepend_bos={model.cfg.default_prepend_bos}; pass "
                "default_prepend_bos=... to load_model / load_pair to choose",
                UserWarning,
                stacklevel=4,
            )
            return
    model.cfg.default_prepend_bos = tokenizer_adds_bos(tokenizer)


def _attach_tokenizer(
    model: HookedTransformer, tokenizer: PreTrainedTokenizerBase, padding_side: str | None
) -> None:
    """Workaround: TransformerLens's ``set_tokenizer`` reloads by ``name_or_path``, failing for in-memory tokenizers.

    Such a tokenizer is saved to a temporary directory and reloaded from there.
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
    backend: str = "hooked",
) -> Any:
    """Build a HookedTransformer (or, with ``backend="bridge"``, a TransformerBridge that takes
    ``hf_model`` over) from a Hugging Face causal LM, using the model's own config.

    ``default_prepend_bos=None`` follows the tokenizer (:func:`tokenizer_adds_bos`)."""
    if default_prepend_bos is None and tokenizer is not None:
        default_prepend_bos = tokenizer_adds_bos(tokenizer)
    if backend == "bridge":
        return _bridge(hf_model, tokenizer, name=name, device=device, dtype=dtype,
                       processing=processing, default_prepend_bos=default_prepend_bos,
                       default_padding_side=default_padding_side, n_ctx=n_ctx, n_devices=n_devices)
    cfg, state_dict = _hooked_config_and_weights(
        hf_model, name=name, device=device, dtype=dtype, default_prepend_bos=default_prepend_bos,
        n_ctx=n_ctx, n_devices=n_devices,
    )
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
    record_processing(model, processing)
    return model


def _hooked_config_and_weights(
    hf_model: transformers.PreTrainedModel,
    *,
    name: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    default_prepend_bos: bool | None,
    n_ctx: int | None,
    n_devices: int | None,
) -> tuple[HookedTransformerConfig, dict[str, torch.Tensor]]:
    """TransformerLens's config and state dict for ``hf_model``, from the model's own config
    (written to a neutral directory: TransformerLens must not guess from a name)."""
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
        try:
            cfg_dict = _tl_config_dict(hf_config, architecture, config_dir)
        except (NotImplementedError, ValueError) as error:
            raise ModelLoadError(f"TransformerLens cannot convert {architecture}: {error}") from error
        overrides = {"default_prepend_bos": default_prepend_bos, "n_ctx": n_ctx, "n_devices": n_devices}
        cfg_dict.update({key: value for key, value in overrides.items() if value is not None})
        # n_devices: blocks split evenly over cuda:0..n-1
        cfg_dict.update(model_name=name, tokenizer_name=None, init_weights=False, device=device, dtype=dtype)
        cfg_dict.setdefault("default_prepend_bos", True)
        cfg = HookedTransformerConfig.from_dict(cfg_dict)
        try:
            state_dict = tl_loading.get_pretrained_state_dict(str(config_dir), cfg, hf_model, dtype=dtype)
        except (NotImplementedError, ValueError) as error:
            raise ModelLoadError(f"TransformerLens cannot convert {architecture}: {error}") from error
    return cfg, state_dict


def _tl_config_dict(hf_config: transformers.PretrainedConfig, architecture: str, config_dir: Path) -> dict[str, Any]:
    """TransformerLens's config dict for ``hf_config``, converted from a copy written to ``config_dir``."""
    config_dict = _with_architecture(_with_gpt2_n_ctx(hf_config.to_dict(), hf_config.model_type), architecture)
    (config_dir / "config.json").write_text(json.dumps(config_dict, default=str))
    if hf_config.model_type == "gemma":
        cfg_dict = _gemma_config(hf_config)
    else:
        cfg_dict = _with_qwen2_rope_theta(tl_loading.convert_hf_model_config(str(config_dir)), hf_config)
    return _with_config_vocab(cfg_dict, hf_config)


def _with_architecture(config_dict: dict[str, Any], architecture: str) -> dict[str, Any]:
    """Workaround: TransformerLens reads ``architectures`` from config.json, which in-memory configs may lack."""
    config_dict["architectures"] = [architecture]
    return config_dict


def _with_config_vocab(cfg_dict: dict[str, Any], hf_config: transformers.PretrainedConfig) -> dict[str, Any]:
    """Workaround: some TransformerLens configs hard-code ``d_vocab``; the checkpoint's own vocabulary wins."""
    cfg_dict["d_vocab"] = hf_config.vocab_size
    return cfg_dict


def _with_gpt2_n_ctx(config_dict: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Workaround: transformers 5's ``GPT2Config`` has no ``n_ctx``, which TransformerLens reads."""
    if model_type == "gpt2":
        config_dict.setdefault("n_ctx", config_dict["n_positions"])
    return config_dict


def _with_qwen2_rope_theta(cfg_dict: dict[str, Any], hf_config: Any) -> dict[str, Any]:
    """Workaround: TransformerLens truncates Qwen2's rotary base to an int; restore the config's value."""
    if cfg_dict["original_architecture"] == "Qwen2ForCausalLM":
        cfg_dict["rotary_base"] = tl_loading._get_rope_theta(hf_config, cfg_dict["rotary_base"])
    return cfg_dict


def _resolve_backend(backend: str) -> Literal["hooked", "bridge"]:
    """``"hooked"`` or ``"bridge"``: what ``backend="auto"`` means with this transformer-lens."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        return "hooked" if HAS_HOOKED_TRANSFORMER else "bridge"
    if backend == "hooked" and not HAS_HOOKED_TRANSFORMER:
        raise InputError(
            "backend='hooked' needs HookedTransformer, which transformer-lens 4.x removed: use "
            "backend='bridge' (or 'auto'), or install transformer-lens>=3,<4."
        )
    return "hooked" if backend == "hooked" else "bridge"


def _bridge(
    hf_model: transformers.PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    name: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    processing: dict[str, bool],
    default_prepend_bos: bool | None,
    default_padding_side: str | None,
    n_ctx: int | None,
    n_devices: int | None,
) -> Any:
    """A TransformerBridge around ``hf_model`` (which it takes over), unprocessed."""
    requested = sorted(flag for flag, on in processing.items() if on)
    if requested:
        raise InputError(
            f"weight processing {requested} is a HookedTransformer option: a TransformerBridge "
            "runs the Hugging Face weights (the residual stream TuCo measures). For processed "
            "weights call enable_compatibility_mode(...) the same way on both bridges yourself."
        )
    if n_devices is not None:
        raise InputError(
            "n_devices is a HookedTransformer option: for a TransformerBridge, load the Hugging "
            "Face models with device_map=... (hf_model_kwargs={'device_map': ...}) instead."
        )
    model = bridge_from_hf(
        hf_model, tokenizer, name=name, device=device, dtype=dtype, n_ctx=n_ctx,
        default_prepend_bos=default_prepend_bos,
    )
    if default_padding_side is not None:
        model.tokenizer.padding_side = default_padding_side
    record_processing(model, processing)
    return model


def _load_hf_model(source: str, dtype: torch.dtype, kwargs: dict[str, Any], what: str) -> Any:
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except Exception as error:
        raise ModelLoadError(f"could not load {what}: {error}") from error


@dataclass(frozen=True)
class _LoadOptions:
    """``load_model``'s checked arguments, as the loader of each kind of source takes them."""

    device: str | torch.device | None
    dtype: torch.dtype | None
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None
    processing: dict[str, bool]
    hf_model_kwargs: dict[str, Any]
    backend: Literal["hooked", "bridge"]
    from_pretrained_kwargs: dict[str, Any]

    @property
    def tokenizer_kwargs(self) -> dict[str, Any]:
        """The Hugging Face loading options that also apply to the tokenizer of a hub id."""
        return {key: value for key, value in self.hf_model_kwargs.items() if key in _TOKENIZER_KWARGS}


@dataclass
class _Materialised:
    """A ``transformers`` model to convert, with what its source says about it."""

    model: transformers.PreTrainedModel
    name: str
    device: str | torch.device | None
    dtype: torch.dtype
    tokenizer_source: str | None = None  # where the tokenizer comes from unless tokenizer=... is given
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)


# The sources that are materialised as a transformers model and converted.
_Convertible = TransformersModel | PeftModelObject | AdapterDirectory | CheckpointDirectory | OfficialName | HubId


@overload
def load_model(source: Any, *, backend: Literal["hooked"], **options: Any) -> HookedTransformer: ...
@overload
def load_model(source: Any, *, backend: Literal["bridge"], **options: Any) -> TransformerBridge: ...
@overload
def load_model(source: Any, *, backend: Literal["auto"] = ..., **options: Any) -> Model: ...
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
    adapter_base: Any = None,
    backend: Literal["auto", "hooked", "bridge"] = "auto",
    **from_pretrained_kwargs: Any,
) -> Model:
    """Load ``source`` as a HookedTransformer or TransformerBridge, without weight processing.

    :func:`resolve_source` says which kind of :data:`Source` ``source`` is, and each kind's page
    says how it is loaded: :class:`ReadyModel` (returned as is), :class:`TransformersModel`,
    :class:`PeftModelObject`, :class:`CheckpointDirectory`, :class:`AdapterDirectory`,
    :class:`OfficialName` or :class:`HubId`. All but ready models and official names (on the
    ``"hooked"`` backend) are materialised as a ``transformers`` model, then converted. The
    processing flags that took effect are recorded (:func:`tuco_lens.compatibility.processing_of`).
    Architectures: those TransformerLens converts from a config (GPT-2, Llama 2/3, Mistral,
    Qwen2, GPT-NeoX/Pythia, ...) plus Gemma (v1).

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
            (e.g. ``revision``, ``trust_remote_code``); passed on for official names too.
        adapter_base: For a PEFT adapter directory only: the base model to merge it into
            (anything but an adapter; copied, never modified). :func:`load_pair` passes its ``pt``.
        backend: ``"hooked"`` (a HookedTransformer, transformer-lens 3.x), ``"bridge"`` (a
            ``TransformerBridge`` around the Hugging Face model, the only model class of
            transformer-lens 4.x: no processing flags, no ``n_devices``) or ``"auto"``
            (default): ``"hooked"`` when HookedTransformer is installed, else ``"bridge"``.
            Ready models are returned as they are with ``"auto"``. See ``docs/backends.md``.
        **from_pretrained_kwargs: For official names, passed to
            ``HookedTransformer.from_pretrained_no_processing``; otherwise only
            ``default_prepend_bos``, ``default_padding_side``, ``n_ctx`` and ``n_devices`` (an even
            split of the blocks over ``n_devices`` GPUs; the same for both models of a pair).

    Returns:
        A HookedTransformer (or TransformerBridge, see ``backend``) in eval mode.

    Raises:
        ModelLoadError: A missing path, an unsupported architecture, a failed download...
        InputTypeError: ``source``, ``device``, ``dtype`` or ``tokenizer`` of the wrong type, or
            an unsupported keyword argument.

    Example:
        >>> model = load_model(demo.FT_DIR, dtype="bfloat16")
        >>> model.cfg.dtype, tuco_lens.compatibility.processing_of(model)["fold_ln"]
        (torch.bfloat16, False)
    """
    resolved = resolve_source(source)
    requested_backend, backend = backend, _resolve_backend(backend)
    if adapter_base is not None and not isinstance(resolved, AdapterDirectory):
        raise InputError("adapter_base is only used when source is a PEFT adapter directory")
    check_device(device)
    processing = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights,
                  "center_unembed": center_unembed, "fold_value_biases": fold_value_biases}
    options = _LoadOptions(device, resolve_dtype(dtype), tokenizer, processing, dict(hf_model_kwargs or {}),
                           backend, from_pretrained_kwargs)
    if isinstance(resolved, ReadyModel):
        return _ready_model(resolved, requested_backend, options)
    if isinstance(resolved, OfficialName) and backend == "hooked":
        return _official_model(resolved, options)
    return _converted(resolved, options, adapter_base)


def _ready_model(ready: ReadyModel, requested_backend: str, options: _LoadOptions) -> Model:
    """A HookedTransformer or TransformerBridge passed in: the same object, moved in place if asked."""
    model, kind = ready.model, backend_of(ready.model).kind
    wanted = "HookedTransformer" if options.backend == "hooked" else "TransformerBridge"
    if kind != options.backend and requested_backend != "auto":
        raise InputTypeError(
            f"backend={options.backend!r} asks for a {wanted}, but a ready {backend_of(model).name} was "
            "passed: pass backend='auto' to use it as it is, or load from the checkpoint."
        )
    moves = {} if kind == "bridge" else {"print_details": False}
    if options.device is not None:
        model.to(options.device, **moves)
    if options.dtype is not None:
        model.to(options.dtype, **moves)
    return model


def _official_model(official: OfficialName, options: _LoadOptions) -> Model:
    """A TransformerLens official model name, through ``HookedTransformer.from_pretrained_no_processing``."""
    given_tokenizer = _resolve_tokenizer(options.tokenizer, None)
    try:
        model = HookedTransformer.from_pretrained_no_processing(
            official.name,
            device=options.device,
            dtype=options.dtype or torch.float32,
            tokenizer=given_tokenizer,
            **options.processing,
            **options.hf_model_kwargs,
            **options.from_pretrained_kwargs,
        )
    except OSError as error:  # download failures, missing files, no network
        raise ModelLoadError(f"could not load the TransformerLens model {official.name!r}: {error}") from error
    if "default_prepend_bos" not in options.from_pretrained_kwargs:
        tokenizer_kwargs = options.tokenizer_kwargs
        tokenizer_kwargs.pop("local_files_only", None)
        _follow_tokenizer_bos(model, given_tokenizer, tokenizer_kwargs)
    record_processing(model, _applicable(model.cfg, options.processing))
    return model


def _converted(source: _Convertible, options: _LoadOptions, adapter_base: Any) -> Model:
    """Materialise ``source`` as a ``transformers`` model, then convert it to ``options.backend``."""
    unknown = sorted(set(options.from_pretrained_kwargs) - set(_CONVERSION_KWARGS))
    if unknown:
        raise InputTypeError(
            f"unexpected keyword argument(s) {unknown} when converting a Hugging Face model; "
            f"accepted: {list(_CONVERSION_KWARGS)}. Pass Hugging Face loading options in "
            "hf_model_kwargs={...}."
        )
    hf = _materialise(source, options, adapter_base)
    try:
        return _convert(
            hf.model,
            _resolve_tokenizer(options.tokenizer, hf.tokenizer_source, **hf.tokenizer_kwargs),
            name=hf.name,
            device=hf.device,
            dtype=hf.dtype,
            processing=options.processing,
            backend=options.backend,
            **options.from_pretrained_kwargs,
        )
    finally:
        del hf
        gc.collect()


def _materialise(source: _Convertible, options: _LoadOptions, adapter_base: Any) -> _Materialised:
    """The ``transformers`` model ``source`` stands for: the object (copied for a bridge, which
    takes it over), a merged copy, or loaded from a directory or the hub."""
    match source:
        case TransformersModel(model=model):
            name, fallback, device, dtype = _object_defaults(model, options.device, options.dtype)
            return _Materialised(copy.deepcopy(model) if options.backend == "bridge" else model,
                                 name, device, dtype, fallback)
        case PeftModelObject(model=model):
            merged = adapters.merge_peft_model(model)  # a merged deep copy; ``model`` is intact
            name, fallback, device, dtype = _object_defaults(merged, options.device, options.dtype)
            return _Materialised(merged, f"{name}+adapter", device, dtype, fallback, options.tokenizer_kwargs)
        case AdapterDirectory(path=path):
            return _merged_adapter_dir(path.resolve(), adapter_base, options)
        case CheckpointDirectory(path=path):
            return _checkpoint_model(path.resolve(), options)
        case OfficialName():
            return _hub_model(source.hub_id(), options)
        case HubId():
            return _hub_model(source, options)


def _checkpoint_model(path: Path, options: _LoadOptions) -> _Materialised:
    """A local checkpoint directory, loaded with ``AutoModelForCausalLM`` (tokenizer: the same directory)."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{str(path)!r} is not a Hugging Face checkpoint directory: expected a directory "
            "containing config.json and the weights (*.safetensors or pytorch_model.bin), as "
            "written by model.save_pretrained(...)"
        )
    dtype = options.dtype or torch.float32
    model = _load_hf_model(str(path), dtype, options.hf_model_kwargs, f"the checkpoint directory {str(path)!r}")
    return _Materialised(model, path.name, options.device, dtype, str(path))


def _hub_model(hub: HubId, options: _LoadOptions) -> _Materialised:
    """A hub id, downloaded with ``AutoModelForCausalLM`` (tokenizer: the same id, the same hub options)."""
    text, dtype = hub.repo_id, options.dtype or torch.float32
    what = f"{text!r} from the Hugging Face hub (there is no local directory {str(Path(text).resolve())!r})"
    model = _load_hf_model(text, dtype, options.hf_model_kwargs, what)
    return _Materialised(model, Path(text).name, options.device, dtype, text, options.tokenizer_kwargs)


def _object_defaults(
    model: transformers.PreTrainedModel, device: Any, dtype: torch.dtype | None
) -> tuple[str, str | None, Any, torch.dtype]:
    """What a ``transformers`` model object says about itself: ``(name, tokenizer directory or None,
    device, dtype)``, where the device and dtype asked for win over the object's own."""
    parameter = next(model.parameters())
    origin = str(getattr(model, "name_or_path", "") or "")
    fallback = origin if origin and Path(origin).is_dir() else None
    name = Path(origin).name or type(model).__name__
    return name, fallback, (device if device is not None else str(parameter.device)), dtype or parameter.dtype


# --- PEFT adapter directories: the base model to merge into, the merge (tuco_lens.adapters) ---
def _merged_adapter_dir(path: Path, base: Any, options: _LoadOptions) -> _Materialised:
    """An adapter directory merged into a copy of its base (see :class:`AdapterDirectory`)."""
    info = adapters.adapter_info(path)  # refuses prompt tuning before anything is loaded
    dtype = options.dtype or torch.float32
    model, owned, fallback = _adapter_base_model(
        path, info["base_model_name_or_path"], base, dtype, options.hf_model_kwargs
    )
    merged = adapters.merge_adapter_dir(model, path, copy_base=not owned)
    del model
    if any((path / name).exists() for name in _TOKENIZER_FILES):
        fallback = str(path)  # the fine-tune's own tokenizer (e.g. its chat template)
    return _Materialised(merged, path.name, options.device, dtype, fallback, options.tokenizer_kwargs)


def _note_base_mismatch(adapter: Path, recorded: str | None, used: str) -> None:
    """Warn (never fail) when an adapter is merged into another base than the one it records."""
    if not recorded or not used:
        return
    same = recorded.rstrip("/") == used.rstrip("/")
    with contextlib.suppress(OSError, ValueError):
        if Path(recorded).expanduser().exists() and Path(used).expanduser().exists():
            same = Path(recorded).expanduser().resolve() == Path(used).expanduser().resolve()
    if not same:
        warnings.warn(
            f"the adapter {str(adapter)!r} records the base model {recorded!r} but is merged into "
            f"the pre-trained model {used!r}: the fine-tuned model is {used!r} + adapter",
            UserWarning,
            stacklevel=7,  # load_model's caller
        )


def _adapter_base_model(
    adapter: Path,
    recorded: str | None,
    base: Any,
    dtype: torch.dtype,
    hf_model_kwargs: dict[str, Any],
) -> tuple[transformers.PreTrainedModel, bool, str | None]:
    """The base to merge the adapter directory into: ``(model, owned, tokenizer fallback)``.

    ``base`` (the pair's pre-trained model) wins over the adapter's recorded base; ``owned``
    says whether the model was loaded here (so it may be merged into in place).
    """
    if base is not None:
        given = resolve_source(base)
        if isinstance(given, TransformersModel):
            origin = str(getattr(given.model, "name_or_path", "") or "")
            _note_base_mismatch(adapter, recorded, origin)
            return given.model, False, origin if origin and Path(origin).is_dir() else None
        if isinstance(given, (AdapterDirectory, PeftModelObject)):
            raise ModelLoadError(
                f"cannot merge the adapter {str(adapter)!r} into a pre-trained model that is itself "
                "a PEFT adapter: merge that one first (merge_and_unload(), then save_pretrained)"
            )
        if isinstance(given, ReadyModel):
            warnings.warn(
                f"the pre-trained model is a ready {type(base).__name__}, not a checkpoint: the "
                f"adapter {str(adapter)!r} is merged into its recorded base {recorded!r} instead",
                UserWarning,
                stacklevel=6,  # load_model's caller
            )
        else:
            base = os.fspath(base)
            _note_base_mismatch(adapter, recorded, base)
            recorded = base
    if not recorded:
        raise ModelLoadError(
            f"the adapter {str(adapter)!r} records no base model (base_model_name_or_path): pass "
            "the base, e.g. load_pair(base, adapter) or load_model(adapter, adapter_base=base)"
        )
    text = _base_checkpoint(resolve_source(recorded), recorded, adapter)
    model = _load_hf_model(text, dtype, hf_model_kwargs, f"the adapter's base model {text!r}")
    return model, True, text


def _base_checkpoint(resolved: Source, recorded: str, adapter: Path) -> str:
    """Where to load an adapter's base from: a resolved local directory or a hub id."""
    match resolved:
        case CheckpointDirectory(path=path):
            return str(path.resolve())
        case OfficialName():
            return resolved.hub_id().repo_id
        case HubId(repo_id=repo_id):
            return repo_id
    raise ModelLoadError(
        f"the base model {recorded!r} of the adapter {str(adapter)!r} is not a checkpoint "
        "directory or hub id (is it itself an adapter? merge it first)"
    )
# --- end of PEFT adapter directories ---


def load_pair(
    pt: Any,
    ft: Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    device_map: str | dict[str, Any] | None = None,
    **kwargs: Any,
) -> TuCoPair:
    """Load a pre-trained / fine-tuned pair the same way and wrap it in a ``TuCoPair``.

    Both sources go through :func:`load_model` with the same ``device``, ``dtype``, tokenizer
    and flags; the pair is then checked by :func:`tuco_lens.compatibility.check_compatible`.

    Args:
        pt: The pre-trained model (anything :func:`load_model` accepts).
        ft: The fine-tuned model; may also be a PEFT adapter directory, merged into a copy of
            ``pt``'s weights (``pt`` itself is not modified), or a ``peft.PeftModel``, merged
            into a copy of itself.
        device: Device for both models.
        dtype: Dtype for both models.
        tokenizer: One tokenizer for both models (default: each model's own).
        device_map: For models too large for one device, on the ``TransformerBridge`` backend
            (chosen automatically when ``backend`` is ``"auto"``): an accelerate device map
            (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict module -> device) for
            checkpoint directories and hub ids. The pre-trained model is loaded with it and the
            fine-tuned model with **the map the pre-trained one got**, so block ``l`` of both
            sits on the same device (``"auto"`` alone could place the second model differently,
            as the first one fills the GPUs). Ready models with different maps are refused by
            :class:`~tuco_lens.TuCoPair`. The HookedTransformer counterpart is ``n_devices``.
        **kwargs: Further :func:`load_model` arguments, applied to both.

    Returns:
        A :class:`~tuco_lens.pair.TuCoPair`.

    Raises:
        IncompatiblePairError: If the models cannot form a pair.
        ModelLoadError: If either model cannot be loaded.
        InputTypeError: If either source (or an argument) has the wrong type.

    Example:
        >>> pair = load_pair(demo.PT_DIR, demo.FT_DIR)          # two checkpoint directories
        >>> pair.n_layers
        4
        >>> pair = load_pair("meta-llama/Llama-2-7b-hf", "./my-lora-adapter")  # doctest: +SKIP
        >>> pair = load_pair("meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-70b-chat-hf",
        ...                  dtype="bfloat16", device_map="auto")  # doctest: +SKIP
    """
    from tuco_lens.pair import TuCoPair

    if device_map is not None:
        return _load_pair_with_device_map(pt, ft, device_map, device=device, dtype=dtype, tokenizer=tokenizer, **kwargs)

    resolve_source(pt)  # fail on a bad source before loading anything
    ft_source = resolve_source(ft)
    ft_is_adapter = isinstance(ft_source, AdapterDirectory)
    if ft_is_adapter:
        adapters.adapter_info(ft_source.path)  # e.g. a prompt-tuning adapter is refused before loading pt
    options = dict(device=device, dtype=dtype, tokenizer=tokenizer, **kwargs)
    pt_model = load_model(pt, **options)
    ft_model = load_model(ft, **options, **({"adapter_base": pt} if ft_is_adapter else {}))
    return TuCoPair(pt_model, ft_model)


def _load_pair_with_device_map(pt: Any, ft: Any, device_map: str | dict[str, Any], **kwargs: Any) -> TuCoPair:
    """``load_pair`` with one accelerate device map for both models (see :func:`load_pair`)."""
    from tuco_lens.pair import TuCoPair

    if kwargs.get("device") is not None:
        raise InputError("give either device=... or device_map=..., not both (the map says where each block goes)")
    backend = kwargs.pop("backend", "auto")
    if backend == "hooked":
        raise InputError(
            "device_map is a TransformerBridge option: use backend='bridge' (or 'auto'), or n_devices=N "
            "to split HookedTransformers over N GPUs"
        )
    if "n_devices" in kwargs:
        raise InputError("give either n_devices (HookedTransformer) or device_map (TransformerBridge), not both")
    hf_kwargs = dict(kwargs.pop("hf_model_kwargs", None) or {})
    if "device_map" in hf_kwargs and hf_kwargs["device_map"] != device_map:
        raise InputError(
            f"device_map={device_map!r} and hf_model_kwargs['device_map']={hf_kwargs['device_map']!r} differ: "
            "give the map once, as device_map=..."
        )
    for source in (pt, ft):
        if not isinstance(resolve_source(source), (CheckpointDirectory, HubId, OfficialName)):
            raise InputError(
                "device_map applies when loading a checkpoint directory or hub id; ready models and "
                "adapters keep their own placement (load them with the same map yourself)"
            )
    pt_model = load_model(pt, backend="bridge", hf_model_kwargs={**hf_kwargs, "device_map": device_map}, **kwargs)
    got = backend_of(pt_model).device_map()
    ft_map = dict(got) if got else device_map  # the map the pre-trained model actually got
    ft_model = load_model(ft, backend="bridge", hf_model_kwargs={**hf_kwargs, "device_map": ft_map}, **kwargs)
    return TuCoPair(pt_model, ft_model)
