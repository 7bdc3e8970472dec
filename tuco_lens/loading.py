"""Load models as HookedTransformers, from whatever the user has.

:func:`load_model` accepts a ready ``HookedTransformer``, a ``transformers`` causal LM object, a
local checkpoint directory (any name, offline), a TransformerLens official model name or any
other Hugging Face hub id. By default **no weight processing** is applied, so the residual
stream equals Hugging Face's hidden states, which is what TuCo measures. :func:`load_pair` loads
a pre-trained / fine-tuned pair the same way and wraps it in a :class:`~tuco_lens.pair.TuCoPair`.

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

__all__ = ["load_model", "load_pair", "resolve_dtype", "check_device", "tokenizer_adds_bos"]

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


def _route(source: Any) -> str:
    """Which loader handles ``source``: 'hooked', 'hf_model', 'peft_model', 'adapter', 'local',
    'official' or 'hub'."""
    if is_model(source):
        return backend_of(source).kind  # "hooked" or "bridge"
    if isinstance(source, transformers.PreTrainedModel):
        return "hf_model"
    if adapters.is_peft_model(source):
        return "peft_model"
    if not isinstance(source, (str, os.PathLike)):
        raise InputTypeError(
            f"cannot load a model from {type(source).__name__}; expected a HookedTransformer, a "
            "transformers PreTrainedModel, a peft PeftModel, a local checkpoint or PEFT adapter "
            "directory, a TransformerLens model name or a Hugging Face hub id"
        )
    if adapters.is_adapter_dir(source):
        return "adapter"
    path = Path(source).expanduser()
    with contextlib.suppress(OSError, ValueError):  # e.g. names too long for the file system
        if path.exists():
            return "local"
    text = os.fspath(source)
    if isinstance(source, str):
        if tl_loading is not None:
            with contextlib.suppress(ValueError):
                tl_loading.get_official_model_name(text)
                return "official"
        elif _HUB_NAME.fullmatch(text):  # without TransformerLens names, "gpt2" is a hub id
            return "hub"
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
    """Set an official model's ``default_prepend_bos`` from its original tokenizer.

    TransformerLens loaded a BOS-adding copy of the tokenizer; the original is reloaded from the
    same place (the local cache that loading just filled; nothing is downloaded).
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
        config_dict = _with_gpt2_n_ctx(hf_config.to_dict(), hf_config.model_type)
        config_dict["architectures"] = [architecture]
        (config_dir / "config.json").write_text(json.dumps(config_dict, default=str))
        try:
            if hf_config.model_type == "gemma":
                cfg_dict = _gemma_config(hf_config)
            else:
                cfg_dict = _with_qwen2_rope_theta(tl_loading.convert_hf_model_config(str(config_dir)), hf_config)
        except (NotImplementedError, ValueError) as error:
            raise ModelLoadError(f"TransformerLens cannot convert {architecture}: {error}") from error
        overrides = {"default_prepend_bos": default_prepend_bos, "n_ctx": n_ctx, "n_devices": n_devices}
        cfg_dict.update({key: value for key, value in overrides.items() if value is not None})
        cfg_dict.update(model_name=name, tokenizer_name=None, init_weights=False, device=device, dtype=dtype,
                        d_vocab=hf_config.vocab_size)  # n_devices: blocks split evenly over cuda:0..n-1
        cfg_dict.setdefault("default_prepend_bos", True)
        cfg = HookedTransformerConfig.from_dict(cfg_dict)
        try:
            state_dict = tl_loading.get_pretrained_state_dict(str(config_dir), cfg, hf_model, dtype=dtype)
        except (NotImplementedError, ValueError) as error:
            raise ModelLoadError(f"TransformerLens cannot convert {architecture}: {error}") from error
    return cfg, state_dict


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


# --- PEFT adapters: the base model to merge into, the merge (tuco_lens.adapters), conversion ---
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
            stacklevel=5,
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
        base_route = _route(base)
        if base_route == "hf_model":
            origin = str(getattr(base, "name_or_path", "") or "")
            _note_base_mismatch(adapter, recorded, origin)
            return base, False, origin if origin and Path(origin).is_dir() else None
        if base_route in ("adapter", "peft_model"):
            raise ModelLoadError(
                f"cannot merge the adapter {str(adapter)!r} into a pre-trained model that is itself "
                "a PEFT adapter: merge that one first (merge_and_unload(), then save_pretrained)"
            )
        if base_route in ("hooked", "bridge"):
            warnings.warn(
                f"the pre-trained model is a ready {type(base).__name__}, not a checkpoint: the "
                f"adapter {str(adapter)!r} is merged into its recorded base {recorded!r} instead",
                UserWarning,
                stacklevel=4,
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
    route = _route(recorded)
    if route == "local":
        text = str(Path(recorded).expanduser().resolve())
    elif route == "official":
        text = tl_loading.get_official_model_name(recorded)
    elif route == "hub":
        text = recorded
    else:
        raise ModelLoadError(
            f"the base model {recorded!r} of the adapter {str(adapter)!r} is not a checkpoint "
            "directory or hub id (is it itself an adapter? merge it first)"
        )
    model = _load_hf_model(text, dtype, hf_model_kwargs, f"the adapter's base model {text!r}")
    return model, True, text


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


def _load_adapter(
    source: Any,
    route: str,
    base: Any,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None,
    processing: dict[str, bool],
    hf_model_kwargs: dict[str, Any],
    **conversion_kwargs: Any,
) -> HookedTransformer:
    """A PEFT adapter (directory or ``PeftModel``) merged into a copy of its base, converted."""
    if route == "peft_model":
        merged = adapters.merge_peft_model(source)  # a merged deep copy; ``source`` is intact
        name, fallback, device, dtype = _object_defaults(merged, device, dtype)
        name = f"{name}+adapter"
    else:
        path = Path(source).expanduser().resolve()
        info = adapters.adapter_info(path)  # refuses prompt tuning before anything is loaded
        dtype = dtype or torch.float32
        model, owned, fallback = _adapter_base_model(
            path, info["base_model_name_or_path"], base, dtype, hf_model_kwargs
        )
        merged = adapters.merge_adapter_dir(model, path, copy_base=not owned)
        del model
        if any((path / name).exists() for name in _TOKENIZER_FILES):
            fallback = str(path)  # the fine-tune's own tokenizer (e.g. its chat template)
        name = path.name
    tokenizer_kwargs = {k: v for k, v in hf_model_kwargs.items() if k in _TOKENIZER_KWARGS}
    try:
        return _convert(
            merged,
            _resolve_tokenizer(tokenizer, fallback, **tokenizer_kwargs),
            name=name,
            device=device,
            dtype=dtype,
            processing=processing,
            **conversion_kwargs,
        )
    finally:
        del merged
        gc.collect()
# --- end of PEFT adapters ---


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

    ``source`` may be:

    * a ``HookedTransformer`` (or subclass, e.g. SAE-Lens' ``HookedSAETransformer``) or a
      ``TransformerBridge``: returned as is, the same object. It is moved **in place** only if ``device`` / ``dtype`` are given;
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
    * a PEFT adapter directory (``adapter_config.json``, no ``config.json``) or a
      ``peft.PeftModel``: the adapter (LoRA, DoRA, IA3, LoHa, LoKr... anything peft can merge)
      is merged into a copy of its base (``adapter_base``, else the adapter's recorded
      ``base_model_name_or_path``; a ``PeftModel`` carries its own) and converted. Neither the
      base nor the ``PeftModel`` is modified. Needs ``pip install peft``; prompt / prefix tuning
      adapters are refused (they change no weight). See ``docs/lora.md``.

    tuco_lens records the processing flags that took effect for the models it loads
    (:func:`tuco_lens.compatibility.processing_of` reads them), so
    :func:`tuco_lens.compatibility.check_compatible` can compare them. Supported
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
        adapter_base: For a PEFT adapter directory only: the base model to merge it into
            (a checkpoint directory, hub id, TransformerLens name or ``transformers`` model,
            which is copied, never modified). :func:`load_pair` passes its ``pt``.
        backend: ``"hooked"`` (a HookedTransformer, transformer-lens 3.x), ``"bridge"`` (a
            ``TransformerBridge`` around the Hugging Face model: the only model class of
            transformer-lens 4.x; no weight processing flags, no ``n_devices``) or ``"auto"``
            (default): ``"hooked"`` when HookedTransformer is installed, else ``"bridge"``.
            Ready models are returned as they are with ``"auto"``. See ``docs/backends.md``.
        **from_pretrained_kwargs: For official names, passed to
            ``HookedTransformer.from_pretrained_no_processing``; otherwise only
            ``default_prepend_bos``, ``default_padding_side``, ``n_ctx`` and ``n_devices``
            (TransformerLens's even split of the blocks over ``n_devices`` GPUs; load both
            models of a pair with the same value) are accepted.

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
    route = _route(source)
    requested_backend, backend = backend, _resolve_backend(backend)
    if adapter_base is not None and route != "adapter":
        raise InputError("adapter_base is only used when source is a PEFT adapter directory")
    check_device(device)
    dtype = resolve_dtype(dtype)
    hf_model_kwargs = dict(hf_model_kwargs or {})
    processing = {
        "fold_ln": fold_ln,
        "center_writing_weights": center_writing_weights,
        "center_unembed": center_unembed,
        "fold_value_biases": fold_value_biases,
    }
    if route in ("hooked", "bridge"):
        return _ready_model(source, route, backend, requested_backend, device=device, dtype=dtype)
    if route == "official" and backend == "bridge":
        route, source = "hub", tl_loading.get_official_model_name(source)
    if route == "official":
        return _official_model(
            source, device=device, dtype=dtype, tokenizer=tokenizer, processing=processing,
            hf_model_kwargs=hf_model_kwargs, **from_pretrained_kwargs,
        )
    unknown = sorted(set(from_pretrained_kwargs) - set(_CONVERSION_KWARGS))
    if unknown:
        raise InputTypeError(
            f"unexpected keyword argument(s) {unknown} when converting a Hugging Face model; "
            f"accepted: {list(_CONVERSION_KWARGS)}. Pass Hugging Face loading options in "
            "hf_model_kwargs={...}."
        )
    convert = dict(device=device, dtype=dtype, tokenizer=tokenizer, processing=processing, backend=backend)
    if route in ("adapter", "peft_model"):
        return _load_adapter(source, route, adapter_base, hf_model_kwargs=hf_model_kwargs, **convert,
                             **from_pretrained_kwargs)
    if route == "hf_model":
        return _converted_hf_object(source, **convert, **from_pretrained_kwargs)
    return _converted_checkpoint(source, route, hf_model_kwargs=hf_model_kwargs, **convert, **from_pretrained_kwargs)


def _ready_model(
    source: Model, route: str, backend: str, requested_backend: str, *, device: Any, dtype: torch.dtype | None
) -> Model:
    """A HookedTransformer or TransformerBridge passed in: the same object, moved in place if asked."""
    wanted = "HookedTransformer" if backend == "hooked" else "TransformerBridge"
    if backend_of(source).kind != backend and requested_backend != "auto":
        raise InputTypeError(
            f"backend={backend!r} asks for a {wanted}, but a ready {backend_of(source).name} was "
            "passed: pass backend='auto' to use it as it is, or load from the checkpoint."
        )
    moves = {} if route == "bridge" else {"print_details": False}
    if device is not None:
        source.to(device, **moves)
    if dtype is not None:
        source.to(dtype, **moves)
    return source


def _official_model(
    name: str,
    *,
    device: Any,
    dtype: torch.dtype | None,
    tokenizer: Any,
    processing: dict[str, bool],
    hf_model_kwargs: dict[str, Any],
    **from_pretrained_kwargs: Any,
) -> Model:
    """A TransformerLens official model name, through ``HookedTransformer.from_pretrained_no_processing``."""
    given_tokenizer = _resolve_tokenizer(tokenizer, None)
    try:
        model = HookedTransformer.from_pretrained_no_processing(
            name,
            device=device,
            dtype=dtype or torch.float32,
            tokenizer=given_tokenizer,
            **processing,
            **hf_model_kwargs,
            **from_pretrained_kwargs,
        )
    except OSError as error:  # download failures, missing files, no network
        raise ModelLoadError(f"could not load the TransformerLens model {name!r}: {error}") from error
    if "default_prepend_bos" not in from_pretrained_kwargs:
        tokenizer_kwargs = {k: v for k, v in hf_model_kwargs.items() if k in _TOKENIZER_KWARGS}
        tokenizer_kwargs.pop("local_files_only", None)
        _follow_tokenizer_bos(model, given_tokenizer, tokenizer_kwargs)
    record_processing(model, _applicable(model.cfg, processing))
    return model


def _converted_hf_object(
    source: transformers.PreTrainedModel,
    *,
    device: Any,
    dtype: torch.dtype | None,
    tokenizer: Any,
    processing: dict[str, bool],
    backend: str,
    **conversion_kwargs: Any,
) -> Model:
    """A ``transformers`` model object, converted with its own config (the object is left intact)."""
    name, fallback, device, dtype = _object_defaults(source, device, dtype)
    return _convert(
        copy.deepcopy(source) if backend == "bridge" else source,  # a bridge takes it over
        _resolve_tokenizer(tokenizer, fallback),
        name=name,
        device=device,
        dtype=dtype,
        processing=processing,
        backend=backend,
        **conversion_kwargs,
    )


def _converted_checkpoint(
    source: str | os.PathLike,
    route: str,
    *,
    hf_model_kwargs: dict[str, Any],
    device: Any,
    dtype: torch.dtype | None,
    tokenizer: Any,
    processing: dict[str, bool],
    backend: str,
    **conversion_kwargs: Any,
) -> Model:
    """A local checkpoint directory (``route="local"``) or a hub id, loaded with transformers and converted."""
    dtype = dtype or torch.float32
    if route == "local":
        path = Path(source).expanduser().resolve()
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
            backend=backend,
            **conversion_kwargs,
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

    for source in (pt, ft):  # fail on a bad source before loading anything
        _route(source)
    ft_is_adapter = _route(ft) == "adapter"
    if ft_is_adapter:
        adapters.adapter_info(ft)  # e.g. a prompt-tuning adapter is refused before loading pt
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
        if _route(source) not in ("local", "hub", "official"):
            raise InputError(
                "device_map applies when loading a checkpoint directory or hub id; ready models and "
                "adapters keep their own placement (load them with the same map yourself)"
            )
    pt_model = load_model(pt, backend="bridge", hf_model_kwargs={**hf_kwargs, "device_map": device_map}, **kwargs)
    got = backend_of(pt_model).device_map()
    ft_map = dict(got) if got else device_map  # the map the pre-trained model actually got
    ft_model = load_model(ft, backend="bridge", hf_model_kwargs={**hf_kwargs, "device_map": ft_map}, **kwargs)
    return TuCoPair(pt_model, ft_model)
