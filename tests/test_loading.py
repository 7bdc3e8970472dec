"""Tests of tuco_lens.loading on tiny offline checkpoints (see checkpoints.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from checkpoints import MODEL_VOCAB_SIZE, build_checkpoint, hf_config_for
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tuco_lens import loading
from tuco_lens.backends import HookedTransformer  # None on transformer-lens 4.x
from tuco_lens.backends import recorded_processing
from tuco_lens.compatibility import check_compatible
from tuco_lens.errors import IncompatiblePairError, InputError, InputTypeError, ModelLoadError
from tuco_lens.loading import (
    AdapterDirectory,
    CheckpointDirectory,
    HubId,
    OfficialName,
    PeftModelObject,
    ReadyModel,
    TransformersModel,
    load_model,
    load_pair,
    resolve_dtype,
    resolve_source,
)

pytestmark = pytest.mark.hooked  # tiny HookedTransformers: transformer-lens 3.x only (skipped on 4.x)

HF_CLASS = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "llama3": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "gemma": "GemmaForCausalLM",
    "llama_chatml": "LlamaForCausalLM",
}
NO_PROCESSING = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
}
HAS_PAIR = importlib.util.find_spec("tuco_lens.pair") is not None


def _tokens(batch: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(0, MODEL_VOCAB_SIZE, (batch, length))


def _hf_outputs(directory, tokens):
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens, output_hidden_states=True)


def _assert_matches_hf(model: HookedTransformer, hf_out, tokens) -> None:
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-4, rtol=0)
    for layer in range(model.cfg.n_layers):  # the last hidden state has the final norm applied
        torch.testing.assert_close(
            cache[f"blocks.{layer}.hook_resid_pre"], hf_out.hidden_states[layer], atol=1e-4, rtol=0
        )


def test_local_directory_matches_hugging_face(arch_pair):
    arch, _, ft_dir = arch_pair  # the fine-tuned directory has a misleading name
    tokens = _tokens()
    model = load_model(ft_dir)
    assert model.cfg.original_architecture == HF_CLASS[arch]
    assert model.cfg.device == "cpu" and model.cfg.dtype == torch.float32
    assert recorded_processing(model) == NO_PROCESSING
    assert model.tokenizer is not None
    assert model.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(ft_dir).get_vocab()
    _assert_matches_hf(model, _hf_outputs(ft_dir, tokens), tokens)


def test_fine_tuned_checkpoint_perturbs_decoder_blocks_only(arch_pair):
    _, pt_dir, ft_dir = arch_pair
    pt = AutoModelForCausalLM.from_pretrained(pt_dir).state_dict()
    ft = AutoModelForCausalLM.from_pretrained(ft_dir).state_dict()
    assert pt.keys() == ft.keys()
    for name in pt:
        in_block = re.search(r"\.(layers|h)\.\d+\.", name) is not None
        assert torch.equal(pt[name], ft[name]) != in_block, name


def test_perturb_all_changes_embeddings_too(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama", noise=0.1, perturb="all")
    pt = AutoModelForCausalLM.from_pretrained(pt_dir).state_dict()
    ft = AutoModelForCausalLM.from_pretrained(ft_dir).state_dict()
    assert not any(torch.equal(pt[k], ft[k]) for k in pt)


def test_checkpoints_are_deterministic(tmp_path):
    first = build_checkpoint("qwen2", tmp_path / "a", seed=3)
    second = build_checkpoint("qwen2", tmp_path / "b", seed=3)
    other = build_checkpoint("qwen2", tmp_path / "c", seed=4)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d).state_dict()  # noqa: E731
    a, b, c = load(first), load(second), load(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    norms = [k for k in a if "norm" in k]
    assert norms and not any(torch.all(a[k] == 1.0) for k in norms)  # not left at init


def test_llama3_rope_and_gqa_are_read_from_the_config(checkpoint_pair):
    model = load_model(checkpoint_pair("llama3")[0])
    assert model.cfg.n_key_value_heads == 2
    assert model.cfg.rotary_base == 500000.0
    assert model.cfg.use_NTK_by_parts_rope and model.cfg.NTK_by_parts_factor == 8.0


def test_transformers_model_object(checkpoint_pair):
    pt_dir, _ = checkpoint_pair("mistral")
    hf = AutoModelForCausalLM.from_pretrained(pt_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(pt_dir)
    model = load_model(hf, tokenizer=tokenizer)
    assert model.tokenizer.get_vocab() == tokenizer.get_vocab()
    tokens = _tokens()
    with torch.no_grad():
        _assert_matches_hf(model, hf(tokens, output_hidden_states=True), tokens)
    # without tokenizer=, the tokenizer is found through hf.name_or_path (a directory)
    assert load_model(hf).tokenizer.get_vocab() == tokenizer.get_vocab()
    assert next(hf.parameters()).dtype == torch.float32  # the object is left intact


def test_in_memory_model_and_tokenizer(checkpoint_pair):
    pt_dir, _ = checkpoint_pair("llama")
    saved = AutoTokenizer.from_pretrained(pt_dir)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=saved.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", unk_token="<unk>",
    )
    hf = AutoModelForCausalLM.from_config(hf_config_for("llama", MODEL_VOCAB_SIZE, saved)).eval()
    assert hf.name_or_path == "" and tokenizer.name_or_path == ""
    model = load_model(hf, tokenizer=tokenizer)
    assert model.to_tokens("hello cat").tolist() == [saved("hello cat").input_ids]
    assert model.cfg.tokenizer_name is None
    with pytest.warns(UserWarning, match="no tokenizer found"):
        assert load_model(hf).tokenizer is None  # nothing to find a tokenizer from


def test_unsupported_models_raise_model_load_error():
    gemma2 = transformers.Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )
    with pytest.raises(ModelLoadError, match="Gemma2ForCausalLM.*official name"):
        load_model(transformers.Gemma2ForCausalLM(gemma2))
    llama = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(ModelLoadError, match="LlamaModel has no language-model head"):
        load_model(transformers.LlamaModel(llama))


def test_ready_hooked_transformer_is_returned_as_is(checkpoint_pair, tiny_hooked):
    model = load_model(checkpoint_pair("gpt2")[0])
    assert load_model(model, fold_ln=True) is model
    assert recorded_processing(model) == NO_PROCESSING

    class MyHooked(HookedTransformer):  # e.g. SAE-Lens' HookedSAETransformer
        pass

    custom = MyHooked(tiny_hooked().cfg)
    assert load_model(custom) is custom
    assert load_model(custom, dtype="float64") is custom
    assert custom.cfg.dtype == torch.float64 and custom.W_E.dtype == torch.float64


def test_dtype_string(checkpoint_pair):
    pt_dir, _ = checkpoint_pair("qwen2")
    model = load_model(pt_dir, dtype="bfloat16")
    assert model.cfg.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = _tokens(1, 8)
    reference = _hf_outputs(pt_dir, tokens).logits
    torch.testing.assert_close(model(tokens).float(), reference, atol=0.1, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float16, torch.float16), ("fp16", torch.float16), ("torch.bfloat16", torch.bfloat16),
     ("float32", torch.float32), (None, None)],
)
def test_resolve_dtype(dtype, expected):
    assert resolve_dtype(dtype) == expected


def test_bad_dtype():
    with pytest.raises(InputError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(InputTypeError):
        resolve_dtype(32)


def test_missing_path_raises_model_load_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ModelLoadError, match="no-such-checkpoint") as info:
        load_model(missing)
    assert "config.json" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(missing))
    with pytest.raises(ModelLoadError, match="neither"):
        load_model("not-a-model-name-at-all")


def test_directory_without_config_raises(tmp_path):
    (tmp_path / "empty-llama").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty-llama.*config\.json"):
        load_model(tmp_path / "empty-llama")


def test_hub_like_missing_path_names_both_readings():
    expected = r"'checkpoints/my-run' from the Hugging Face hub.*no local"
    with pytest.raises(ModelLoadError, match=expected):
        load_model("checkpoints/my-run")


@pytest.mark.parametrize("source", [3, ["gpt2"], None, {"name": "gpt2"}, torch.zeros(2)])
def test_wrong_type_raises_input_type_error(source):
    with pytest.raises(InputTypeError, match=type(source).__name__):
        load_model(source)


def test_unknown_keyword_for_conversion(checkpoint_pair):
    with pytest.raises(InputTypeError, match="revision"):
        load_model(checkpoint_pair("gpt2")[0], revision="main")


class _Recorder:
    """Stands in for a loader function: records calls, returns ``result(*args, **kwargs)``."""

    def __init__(self, result):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result(*args, **kwargs)


def _forbidden(*args, **kwargs):
    raise AssertionError(f"unexpected call {args} {kwargs}")


@pytest.mark.parametrize("name", ["gpt2", "meta-llama/Llama-2-7b-hf", "mistral-7b-instruct"])
def test_official_names_use_transformer_lens(monkeypatch, tiny_hooked, name):
    official = _Recorder(lambda *args, **kwargs: tiny_hooked())
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", official)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", _forbidden)
    model = load_model(name, dtype="bfloat16", fold_ln=True, n_ctx=64)
    (args, kwargs), = official.calls
    assert args == (name,)
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["n_ctx"] == 64
    assert kwargs["fold_ln"] is True and kwargs["center_writing_weights"] is False
    assert kwargs["center_unembed"] is False and kwargs["fold_value_biases"] is False
    assert recorded_processing(model)["fold_ln"] is True


def test_hub_ids_load_the_fine_tunes_own_config(monkeypatch, checkpoint_pair):
    # a "vicuna" id served by a Qwen2 checkpoint: the config must come from the checkpoint
    pt_dir, ft_dir = checkpoint_pair("qwen2")
    hub_id = "lmsys/vicuna-7b-v1.5"
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    model_loader = _Recorder(lambda name, **kw: real_model(ft_dir, **kw))
    tokenizer_loader = _Recorder(
        lambda name, **kw: real_tokenizer(ft_dir if name == hub_id else name, **kw)
    )
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", model_loader)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", tokenizer_loader)
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", _forbidden)
    model = load_model(hub_id, hf_model_kwargs={"revision": "v1"})
    (args, kwargs), = model_loader.calls
    assert args == (hub_id,) and kwargs == {"dtype": torch.float32, "revision": "v1"}
    assert tokenizer_loader.calls[0] == ((hub_id,), {"revision": "v1"})
    assert model.cfg.original_architecture == "Qwen2ForCausalLM"
    assert model.cfg.model_name == "vicuna-7b-v1.5"
    tokens = _tokens(1, 16)
    _assert_matches_hf(model, _hf_outputs(ft_dir, tokens), tokens)


def test_unreachable_hub_id_raises_model_load_error():
    with pytest.raises(ModelLoadError, match="tuco-lens-tests/no-such-model"):
        load_model("tuco-lens-tests/no-such-model")


def test_fold_ln_is_recorded_and_refused_against_an_unprocessed_twin(checkpoint_pair):
    pt_dir, _ = checkpoint_pair("gpt2")
    plain = load_model(pt_dir)
    folded = load_model(pt_dir, fold_ln=True)
    assert folded.cfg.normalization_type == "LNPre"
    assert recorded_processing(folded) == {**NO_PROCESSING, "fold_ln": True}
    tokens = _tokens(1, 16)
    with torch.no_grad():  # folding keeps the function and the residual stream
        _assert_matches_hf(folded, _hf_outputs(pt_dir, tokens), tokens)
    with pytest.raises(IncompatiblePairError, match="fold_ln is False .* and True"):
        check_compatible(plain, folded)
    check_compatible(folded, load_model(pt_dir, fold_ln=True))


def test_centering_is_recorded_only_where_it_applies(checkpoint_pair):
    gpt2 = load_model(checkpoint_pair("gpt2")[0], center_writing_weights=True)
    assert recorded_processing(gpt2)["center_writing_weights"] is True
    llama = load_model(checkpoint_pair("llama")[0], center_writing_weights=True)
    assert recorded_processing(llama)["center_writing_weights"] is False  # RMSNorm: a no-op
    check_compatible(llama, load_model(checkpoint_pair("llama")[1]))


@pytest.mark.skipif(not HAS_PAIR, reason="tuco_lens.pair not written yet")
def test_load_pair(checkpoint_pair):
    from tuco_lens.pair import TuCoPair

    pt_dir, ft_dir = checkpoint_pair("mistral")
    pair = load_pair(pt_dir, ft_dir)
    assert isinstance(pair, TuCoPair)


@pytest.mark.skipif(not HAS_PAIR, reason="tuco_lens.pair not written yet")
def test_load_pair_refuses_different_architectures(checkpoint_pair):
    with pytest.raises(IncompatiblePairError, match="positional_embedding_type"):
        load_pair(checkpoint_pair("gpt2")[0], checkpoint_pair("llama")[0])
    with pytest.raises(InputTypeError):
        load_pair(checkpoint_pair("gpt2")[0], 7)


def test_conversion_options_reach_the_config(checkpoint_pair):
    pt_dir, _ = checkpoint_pair("llama")
    model = load_model(str(pt_dir), n_ctx=64, n_devices=1, default_prepend_bos=False)
    assert (model.cfg.n_ctx, model.cfg.n_devices, model.cfg.default_prepend_bos) == (64, 1, False)
    with pytest.raises(InputTypeError, match=r"unexpected keyword argument\(s\) \['fold_everything'\]"):
        load_model(str(pt_dir), fold_everything=True)


def test_resolve_source_gives_each_kind_its_class(monkeypatch, checkpoint_pair, tiny_hooked, tmp_path):
    pt_dir, _ = checkpoint_pair("llama")
    ready = tiny_hooked()
    hf_model = AutoModelForCausalLM.from_pretrained(pt_dir)
    # resolving loads and downloads nothing
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", _forbidden)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", _forbidden)
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", _forbidden)
    assert resolve_source(ready) == ReadyModel(ready)
    assert resolve_source(hf_model) == TransformersModel(hf_model)
    assert resolve_source(pt_dir) == resolve_source(str(pt_dir)) == CheckpointDirectory(Path(pt_dir))
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert resolve_source(adapter) == AdapterDirectory(adapter)
    assert resolve_source("gpt2") == OfficialName("gpt2")
    assert resolve_source("mistral-7b-instruct") == OfficialName("mistral-7b-instruct")  # an alias
    assert resolve_source("lmsys/vicuna-7b-v1.5") == HubId("lmsys/vicuna-7b-v1.5")
    with pytest.raises(InputTypeError, match="cannot load a model from int"):
        resolve_source(3)
    with pytest.raises(ModelLoadError, match="does not exist, and it is neither"):
        resolve_source("not-a-model-name-at-all")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(tmp_path / "no-such-checkpoint")


def test_resolve_source_recognises_a_peft_model(checkpoint_pair):
    peft = pytest.importorskip("peft")
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint_pair("llama")[0])
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(target_modules=["q_proj"]))
    assert resolve_source(peft_model) == PeftModelObject(peft_model)
